/* hybridquant integer kernels (see hq_kernels.h for the conventions). */
#include "hq_kernels.h"

#define HQ_P(p, c) ((p).v[(p).len == 1 ? 0 : (c)])

int32_t hq_weight(const hq_weights *w, int32_t i) {
    if (w->bits == 8) {
        return w->is_signed ? (int32_t)(int8_t)w->data[i] : (int32_t)w->data[i];
    } else { /* a field of fewer than 8 bits: in its byte, or running into the next one */
        int64_t bit = (int64_t)i * w->bits;
        int32_t at = (int32_t)(bit & 7), v;
        uint32_t window = w->data[bit >> 3];
        if (at + w->bits > 8) window |= (uint32_t)w->data[(bit >> 3) + 1] << 8;
        v = (int32_t)((window >> at) & ((1u << w->bits) - 1u));
        if (w->is_signed && v >= (1 << (w->bits - 1))) v -= 1 << w->bits;
        return v;
    }
}

void hq_unpack_row(const hq_weights *w, int64_t first, int32_t count, int16_t *out) {
    int32_t i;
    if (w->bits == 8) {
        const int8_t *p = (const int8_t *)w->data + first;
        if (w->is_signed) {
            for (i = 0; i < count; ++i) out[i] = p[i];
        } else {
            for (i = 0; i < count; ++i) out[i] = w->data[first + i];
        }
        return;
    }
    for (i = 0; i < count; ++i) out[i] = hq_weight(w, (int32_t)(first + i));
}

/* rows x k weights from element `first` on, as int16 rows of `stride` (zeros after k) */
static void hq_unpack_rows(const hq_weights *w, int64_t first, int32_t rows, int32_t k, int32_t stride, int16_t *out) {
    int32_t r, l;
    for (r = 0; r < rows; ++r) {
        hq_unpack_row(w, first + (int64_t)r * k, k, out + (int64_t)r * stride);
        for (l = k; l < stride; ++l) out[(int64_t)r * stride + l] = 0;
    }
}

/* floor(v / 2^k) for k >= 0, v * 2^-k for k < 0 */
int64_t hq_floor_shift(int64_t v, int32_t k) {
    if (k <= 0) return v * ((int64_t)1 << -k);
    return v >= 0 ? v >> k : -((-v - 1) >> k) - 1;
}

int64_t hq_srr(int64_t v, int32_t k) {
    if (k <= 0) return v * ((int64_t)1 << -k);
    return hq_floor_shift(v + ((int64_t)1 << (k - 1)), k);
}

static int32_t hq_clamp(int64_t v, int32_t lo, int32_t hi) {
    return v < lo ? lo : (v > hi ? hi : (int32_t)v);
}

/* srr(v, k) for 1 <= k <= 31 in 32 bits, branch-free (so loops of it vectorise): u = v + 2^31 as unsigned
 * keeps the low 31 bits and is non-negative, so floor(v / 2^k) = (u >> k) - 2^(31-k); bit k-1 rounds half up.
 * No signed shift, no overflow. */
static int32_t hq_srr32_pos(int32_t v, int32_t k) {
    uint32_t u = (uint32_t)v ^ 0x80000000u;
    return (int32_t)(u >> k) - (int32_t)(1u << (31 - k)) + (int32_t)((u >> (k - 1)) & 1u);
}

/* srr in 32 bits for any k: k <= 0 is the exact left shift (the caller's bound keeps it in int32) */
static int32_t hq_srr32(int32_t v, int32_t k) {
    if (k <= 0) return v * (1 << -k);
    if (k > 31) return 0; /* |v| < 2^31 <= 2^(k-1): rounds to 0 */
    return hq_srr32_pos(v, k);
}

/* how many of the n ascending thresholds are at or below t: a binary search without branches (conditional
 * moves), the same steps for every value */
static int32_t hq_count_at_or_below(const int32_t *thresholds, int32_t n, int64_t t) {
    const int32_t *p = thresholds;
    if (n == 0) return 0;
    while (n > 1) { /* the count lies in [p - thresholds, p - thresholds + n] */
        int32_t half = n / 2;
        p = p[half - 1] <= t ? p + half : p;
        n -= half;
    }
    return (int32_t)(p - thresholds) + (p[0] <= t);
}

void hq_requantize(const int32_t *acc, int32_t *out, int32_t count, const hq_requant *rq) {
    int32_t outer, inner = rq->inner, channels = rq->channels, o, c, j;
    if (channels == 1) { /* per tensor: one run over every element */
        inner = count;
    }
    outer = count / (inner * channels);
    if (rq->mode == HQ_REQUANT_SHIFT && inner == 1) {
        /* channels along the last dim: one element per channel, its parameters read along with it; the shifts
         * checked once, so the loop is branch-free and vectorises (variable shifts) */
        int32_t ks = rq->shift.len == 1 ? 0 : 1, zs = rq->zero_point.len == 1 ? 0 : 1, plain = 1;
        for (c = 0; c < channels; ++c) {
            int32_t k = rq->shift.v[c * ks];
            if (k < 1 || k > 31) plain = 0;
        }
        for (o = 0; o < outer; ++o) {
            const int32_t *a_in = acc + (int64_t)o * channels;
            int32_t *q = out + (int64_t)o * channels;
            if (plain) {
                for (c = 0; c < channels; ++c) {
                    int32_t v = hq_srr32_pos(a_in[c], rq->shift.v[c * ks]);
                    int32_t zp = rq->zero_point.v[c * zs], lo = rq->qmin - zp, hi = rq->qmax - zp;
                    q[c] = (v < lo ? lo : (v > hi ? hi : v)) + zp;
                }
            } else {
                for (c = 0; c < channels; ++c) {
                    q[c] = hq_clamp(hq_srr(a_in[c], rq->shift.v[c * ks]) + rq->zero_point.v[c * zs], rq->qmin,
                                    rq->qmax);
                }
            }
        }
        return;
    }
    for (o = 0; o < outer; ++o) {
        for (c = 0; c < channels; ++c) {
            const int32_t *a_in = acc + ((int64_t)o * channels + c) * inner;
            int32_t *q = out + ((int64_t)o * channels + c) * inner;
            int32_t zp = HQ_P(rq->zero_point, c);
            if (rq->mode == HQ_REQUANT_SHIFT) {
                int32_t k = HQ_P(rq->shift, c);
                if (k > 0 && k < 32) {
                    int32_t lo = rq->qmin - zp, hi = rq->qmax - zp;
                    for (j = 0; j < inner; ++j) {
                        int32_t v = hq_srr32_pos(a_in[j], k);
                        q[j] = (v < lo ? lo : (v > hi ? hi : v)) + zp;
                    }
                } else if (k == 0) { /* the identity requantization: saturation only */
                    int32_t lo = rq->qmin - zp, hi = rq->qmax - zp;
                    for (j = 0; j < inner; ++j) {
                        int32_t v = a_in[j];
                        q[j] = (v < lo ? lo : (v > hi ? hi : v)) + zp;
                    }
                } else {
                    for (j = 0; j < inner; ++j) q[j] = hq_clamp(hq_srr(a_in[j], k) + zp, rq->qmin, rq->qmax);
                }
            } else {
                int32_t a = HQ_P(rq->a, c), sign = HQ_P(rq->sign, c), n = HQ_P(rq->n, c);
                int32_t b = sign != 0 ? HQ_P(rq->b, c) : a;
                int32_t low = a < b ? a : b, lift = low < 0 ? -low : 0;
                int64_t ma, mb;
                a += lift;
                b += lift;
                n += lift;
                ma = (int64_t)1 << a;
                mb = sign * ((int64_t)1 << b);
                for (j = 0; j < inner; ++j) {
                    int64_t total = (int64_t)a_in[j] * ma + (int64_t)a_in[j] * mb, v;
                    if (rq->mode == HQ_REQUANT_TWO_TERM) {
                        v = hq_srr(total, n);
                    } else { /* the number of thresholds at or below the floor-shifted value */
                        v = hq_count_at_or_below(rq->thresholds, rq->n_thresholds, hq_floor_shift(total, n));
                    }
                    q[j] = hq_clamp(v + zp, rq->qmin, rq->qmax);
                }
            }
        }
    }
}

void hq_quantize_input(const uint8_t *pixels, int32_t channels, int32_t pixels_per_channel, const int32_t *table,
                       int32_t *out) {
    /* pixels: interleaved (H, W, C); out: planar (C, H, W) */
    int32_t c, p;
    for (c = 0; c < channels; ++c) {
        for (p = 0; p < pixels_per_channel; ++p) {
            out[c * pixels_per_channel + p] = table[c * 256 + pixels[p * channels + c]];
        }
    }
}

/* [lo, hi): the output columns ox < wo whose input column ox * sw + off lies in [0, w) */
static void hq_inside(int32_t off, int32_t sw, int32_t w, int32_t wo, int32_t *lo, int32_t *hi) {
    *lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
    *hi = (w - 1 - off) < 0 ? 0 : (w - 1 - off) / sw + 1;
    if (*hi > wo) *hi = wo;
    if (*lo > *hi) *lo = *hi;
}

/* out [cols][stride] = x [rows][cols] - zp as int16 (out[c][r], r < rows; zeros up to the stride), by tiles of
 * HQ_TT x HQ_TT (both sides stay in cache) */
#define HQ_TT 8
static void hq_transpose16(const int32_t *x, int32_t zp, int32_t rows, int32_t cols, int32_t stride, int16_t *out) {
    int32_t r0, c0, r, c;
    for (c = 0; c < cols; ++c) {
        for (r = rows; r < stride; ++r) out[(int64_t)c * stride + r] = 0;
    }
    for (r0 = 0; r0 < rows; r0 += HQ_TT) {
        for (c0 = 0; c0 < cols; c0 += HQ_TT) {
            if (r0 + HQ_TT <= rows && c0 + HQ_TT <= cols) { /* a whole tile: fixed trip counts vectorise */
                int16_t t[HQ_TT][HQ_TT];
                for (r = 0; r < HQ_TT; ++r) {
                    for (c = 0; c < HQ_TT; ++c) t[c][r] = (int16_t)(x[(int64_t)(r0 + r) * cols + c0 + c] - zp);
                }
                for (c = 0; c < HQ_TT; ++c) {
                    for (r = 0; r < HQ_TT; ++r) out[(int64_t)(c0 + c) * stride + r0 + r] = t[c][r];
                }
            } else {
                for (r = r0; r < rows && r < r0 + HQ_TT; ++r) {
                    for (c = c0; c < cols && c < c0 + HQ_TT; ++c) {
                        out[(int64_t)c * stride + r] = (int16_t)(x[(int64_t)r * cols + c] - zp);
                    }
                }
            }
        }
    }
}

/* a[0..k) . b[0..k): int16 operands, an int32 sum */
static int32_t hq_dot(const int16_t *a, const int16_t *b, int32_t k) {
    int32_t s = 0, l;
    for (l = 0; l < k; ++l) s += a[l] * b[l];
    return s;
}

#define HQ_BIAS(i, j) ((bias_row ? bias_row[i] : 0) + (bias_col ? bias_col[j] : 0))

/* s[2 r + q] = a_r . b_q for the rows r < 4 of a and q < 2 of b (each k long, k apart): eight sums that share
 * their loads. A function of its own, so the compiler keeps its sums and pointers in registers. */
static void hq_dot4x2(const int16_t *a, const int16_t *b, int32_t k, int32_t *s) {
    const int16_t *a1 = a + k, *a2 = a1 + k, *a3 = a2 + k, *b1 = b + k;
    int32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0, s20 = 0, s21 = 0, s30 = 0, s31 = 0, l;
    for (l = 0; l < k; ++l) {
        int32_t x0 = b[l], x1 = b1[l];
        s00 += a[l] * x0;
        s01 += a[l] * x1;
        s10 += a1[l] * x0;
        s11 += a1[l] * x1;
        s20 += a2[l] * x0;
        s21 += a2[l] * x1;
        s30 += a3[l] * x0;
        s31 += a3[l] * x1;
    }
    s[0] = s00;
    s[1] = s01;
    s[2] = s10;
    s[3] = s11;
    s[4] = s20;
    s[5] = s21;
    s[6] = s30;
    s[7] = s31;
}

/* c[i][j] = bias_row[i] + bias_col[j] + sum_l a[i][l] b[j][l] for i < m, j < n, l < k (a bias may be 0). Both
 * operands are int16 rows along l, so every sum is a dot product of two contiguous rows, which the compiler
 * vectorises into pairwise int16 multiply-adds into int32 lanes (pmaddwd on x86), four rows of a by two of b
 * at a time (hq_dot4x2). The callers pad k to HQ_KPAD(k) with zeros, so no row ends in a partial vector. The
 * width analysis bounds each sum within int32 in any order of its terms. */
static void hq_dot_gemm(const int16_t *a, const int16_t *b, const int32_t *bias_row, const int32_t *bias_col,
                        int32_t m, int32_t k, int32_t n, int32_t *c) {
    int32_t i, j, r;
    for (i = 0; i + 4 <= m; i += 4) {
        const int16_t *a0 = a + (int64_t)i * k;
        int32_t *c0 = c + (int64_t)i * n, *c1 = c0 + n, *c2 = c1 + n, *c3 = c2 + n;
        for (j = 0; j + 2 <= n; j += 2) {
            int32_t s[8];
            hq_dot4x2(a0, b + (int64_t)j * k, k, s);
            c0[j] = HQ_BIAS(i, j) + s[0];
            c0[j + 1] = HQ_BIAS(i, j + 1) + s[1];
            c1[j] = HQ_BIAS(i + 1, j) + s[2];
            c1[j + 1] = HQ_BIAS(i + 1, j + 1) + s[3];
            c2[j] = HQ_BIAS(i + 2, j) + s[4];
            c2[j + 1] = HQ_BIAS(i + 2, j + 1) + s[5];
            c3[j] = HQ_BIAS(i + 3, j) + s[6];
            c3[j + 1] = HQ_BIAS(i + 3, j + 1) + s[7];
        }
        for (; j < n; ++j) { /* an odd last column */
            for (r = 0; r < 4; ++r) {
                c[(int64_t)(i + r) * n + j] = HQ_BIAS(i + r, j) + hq_dot(a0 + r * k, b + (int64_t)j * k, k);
            }
        }
    }
    for (; i < m; ++i) { /* the rows after the last group of four */
        for (j = 0; j < n; ++j) {
            c[(int64_t)i * n + j] = HQ_BIAS(i, j) + hq_dot(a + (int64_t)i * k, b + (int64_t)j * k, k);
        }
    }
}

void hq_conv2d(const int32_t *x, int32_t zp, int32_t c_in, int32_t h, int32_t w, const hq_weights *wt,
               const int32_t *bias, int32_t c_out, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
               int32_t pw, int32_t dh, int32_t dw, int32_t groups, int32_t ho, int32_t wo, int32_t *acc,
               void *temp) {
    /* temp, dense: the centred patches, int16 [ho * wo][kp] (row = c_in * kh * kw values, zero padding, zeros up
     * to kp = HQ_KPAD(row)), then the weights unpacked to int16 [c_out][kp]; grouped: c_in * h * w centred int32
     * inputs, then one int16 row of weights */
    int32_t cg = c_in / groups, og = c_out / groups, row = cg * kh * kw, n_p = ho * wo;
    int32_t o, ci, ky, kx, oy, ox, i;
    if (groups == 1) { /* a matrix product: acc [c_out][n_p] = W [c_out][row] . patches [n_p][row] */
        int32_t kp = HQ_KPAD(row), l, lo, hi;
        int16_t *cols = (int16_t *)temp, *w16 = cols + (int64_t)n_p * kp;
        if (kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0) { /* pointwise: a transposition */
            hq_transpose16(x, zp, c_in, n_p, kp, cols);
        } else { /* an output row at a time: the reads run along input rows, the row's patches stay in cache while
                  * each of their `row` positions is written */
            for (oy = 0; oy < ho; ++oy) {
                int16_t *blk = cols + (int64_t)oy * wo * kp;
                for (ci = 0, l = 0; ci < c_in; ++ci) {
                    for (ky = 0; ky < kh; ++ky) {
                        int32_t iy = oy * sh - ph + ky * dh;
                        const int32_t *xr = x + ((int64_t)ci * h + (iy < 0 || iy >= h ? 0 : iy)) * w;
                        for (kx = 0; kx < kw; ++kx, ++l) {
                            int16_t *col = blk + l;
                            int32_t off = kx * dw - pw;
                            hq_inside(off, sw, w, wo, &lo, &hi);
                            if (iy < 0 || iy >= h) lo = hi = 0;
                            for (ox = 0; ox < lo; ++ox) col[(int64_t)ox * kp] = 0;
                            for (; ox < hi; ++ox) col[(int64_t)ox * kp] = (int16_t)(xr[ox * sw + off] - zp);
                            for (; ox < wo; ++ox) col[(int64_t)ox * kp] = 0;
                        }
                    }
                }
                for (ox = 0; ox < wo; ++ox) {
                    for (l = row; l < kp; ++l) blk[(int64_t)ox * kp + l] = 0;
                }
            }
        }
        hq_unpack_rows(wt, 0, c_out, row, kp, w16);
        hq_dot_gemm(w16, cols, bias, 0, c_out, kp, n_p, acc);
        return;
    }
    {
        int32_t *xc = (int32_t *)temp;
        int16_t *wrow = (int16_t *)(xc + (int64_t)c_in * h * w);
        for (i = 0; i < c_in * h * w; ++i) xc[i] = x[i] - zp;
        for (o = 0; o < c_out; ++o) { /* grouped and depthwise: tap by tap over the output plane */
            int32_t *plane = acc + (int64_t)o * ho * wo;
            int32_t b = bias ? bias[o] : 0;
            hq_unpack_row(wt, (int64_t)o * row, row, wrow);
            for (i = 0; i < ho * wo; ++i) plane[i] = b;
            for (ci = 0; ci < cg; ++ci) {
                const int32_t *xp = xc + (int64_t)((o / og) * cg + ci) * h * w;
                for (ky = 0; ky < kh; ++ky) {
                    for (kx = 0; kx < kw; ++kx) {
                        int32_t wv = wrow[(ci * kh + ky) * kw + kx];
                        int32_t off = kx * dw - pw, lo, hi;
                        if (wv == 0) continue;
                        hq_inside(off, sw, w, wo, &lo, &hi);
                        for (oy = 0; oy < ho; ++oy) {
                            int32_t iy = oy * sh - ph + ky * dh;
                            const int32_t *xr;
                            int32_t *ar = plane + oy * wo;
                            if (iy < 0 || iy >= h) continue;
                            xr = xp + iy * w;
                            if (sw == 1) {
                                for (ox = lo; ox < hi; ++ox) ar[ox] += wv * xr[ox + off];
                            } else {
                                for (ox = lo; ox < hi; ++ox) ar[ox] += wv * xr[ox * sw + off];
                            }
                        }
                    }
                }
            }
        }
    }
}

void hq_linear(const int32_t *x, hq_param zp, int32_t rows, int32_t k, const hq_weights *wt, const int32_t *bias,
               int32_t n, int32_t *acc, void *temp) {
    /* temp: the centred inputs, int16 [rows][kp] (kp = HQ_KPAD(k), zeros after k), then the weights unpacked to
     * int16 [n][kp] */
    int32_t kp = HQ_KPAD(k), r, i;
    int16_t *xc = (int16_t *)temp, *w16 = xc + (int64_t)rows * kp;
    for (r = 0; r < rows; ++r) {
        for (i = 0; i < k; ++i) xc[(int64_t)r * kp + i] = (int16_t)(x[(int64_t)r * k + i] - HQ_P(zp, i));
        for (; i < kp; ++i) xc[(int64_t)r * kp + i] = 0;
    }
    hq_unpack_rows(wt, 0, n, k, kp, w16);
    hq_dot_gemm(xc, w16, 0, bias, rows, kp, n, acc);
}

void hq_matmul(const int32_t *a, hq_param zpa, const int32_t *b, hq_param zpb, int32_t batch, int32_t m, int32_t k,
               int32_t n, int32_t *acc, void *temp) {
    /* temp: one batch's centred operands, int16 rows of kp = HQ_KPAD(k) (zeros after k): a as [m][kp], then b
     * transposed, [n][kp] */
    int32_t kp = HQ_KPAD(k), t, i, j, l;
    int16_t *a16 = (int16_t *)temp, *bt = a16 + (int64_t)m * kp;
    for (t = 0; t < batch; ++t) {
        const int32_t *at = a + (int64_t)t * m * k, *bb = b + (int64_t)t * k * n;
        for (i = 0; i < m; ++i) {
            for (l = 0; l < k; ++l) a16[(int64_t)i * kp + l] = (int16_t)(at[(int64_t)i * k + l] - HQ_P(zpa, l));
            for (; l < kp; ++l) a16[(int64_t)i * kp + l] = 0;
        }
        for (j = 0; j < n; ++j) {
            for (l = k; l < kp; ++l) bt[(int64_t)j * kp + l] = 0;
        }
        for (l = 0; l < k; ++l) {
            for (j = 0; j < n; ++j) bt[(int64_t)j * kp + l] = (int16_t)(bb[(int64_t)l * n + j] - HQ_P(zpb, j));
        }
        hq_dot_gemm(a16, bt, 0, 0, m, kp, n, acc + (int64_t)t * m * n);
    }
}

void hq_center_shift(const int32_t *x, hq_param zp, int32_t count, int32_t last, hq_param shift, int32_t *out) {
    /* (x - zp) * 2^shift, both along the last dim (length `last`) */
    int32_t i;
    for (i = 0; i < count; ++i) {
        int32_t c = i % last;
        out[i] = (x[i] - HQ_P(zp, c)) * (1 << HQ_P(shift, c));
    }
}

void hq_add(const int32_t *a, hq_param zpa, hq_param sa, const int32_t *b, hq_param zpb, hq_param sb,
            int32_t count, int32_t last, int32_t *acc) {
    /* ((a - zpa) << sa) + ((b - zpb) << sb), parameters along the last dim */
    int32_t i;
    for (i = 0; i < count; ++i) {
        int32_t c = i % last;
        acc[i] = (a[i] - HQ_P(zpa, c)) * (1 << HQ_P(sa, c)) + (b[i] - HQ_P(zpb, c)) * (1 << HQ_P(sb, c));
    }
}

void hq_cat_part(const int32_t *x, hq_param zp, hq_param shift, int32_t outer, int32_t part, int32_t last,
                 int32_t out_row, int32_t out_offset, int32_t *acc) {
    /* one input of a concatenation: `outer` rows of `part` values each, written at out_offset of each output
     * row of out_row values; (x - zp) << shift along x's last dim */
    int32_t o, j;
    for (o = 0; o < outer; ++o) {
        const int32_t *xr = x + (int64_t)o * part;
        int32_t *ar = acc + (int64_t)o * out_row + out_offset;
        for (j = 0; j < part; ++j) {
            int32_t c = ((int32_t)(((int64_t)o * part + j) % last));
            ar[j] = (xr[j] - HQ_P(zp, c)) * (1 << HQ_P(shift, c));
        }
    }
}

void hq_mul(const int32_t *a, hq_param zpa, const int32_t *b, hq_param zpb, int32_t count, int32_t last,
            int32_t *acc) {
    int32_t i;
    for (i = 0; i < count; ++i) acc[i] = (a[i] - HQ_P(zpa, i % last)) * (b[i] - HQ_P(zpb, i % last));
}

void hq_sum_hw(const int32_t *x, hq_param zp, int32_t channels, int32_t hw, int32_t *acc) {
    int32_t c, p;
    for (c = 0; c < channels; ++c) {
        int32_t s = 0;
        for (p = 0; p < hw; ++p) s += x[c * hw + p] - HQ_P(zp, c);
        acc[c] = s;
    }
}

/* out[i] = t[idx[i]] - zp for a table of any stored width: one loop per width, the switch outside it */
#define HQ_GATHER(ctype) do { \
        const ctype *t_ = (const ctype *)table.v + base; \
        for (i = 0; i < n; ++i) out[i] = (int32_t)t_[idx[i]] - zp; \
    } while (0)
static void hq_gather(const int32_t *idx, int32_t n, hq_table table, int64_t base, int32_t zp, int32_t *out) {
    int32_t i;
    switch (table.type) {
    case HQ_I8: HQ_GATHER(int8_t); break;
    case HQ_U8: HQ_GATHER(uint8_t); break;
    case HQ_I16: HQ_GATHER(int16_t); break;
    case HQ_U16: HQ_GATHER(uint16_t); break;
    default: HQ_GATHER(int32_t); break;
    }
}

void hq_lut(const int32_t *x, int32_t count, hq_table table, int32_t in_qmin, int32_t acc_zp, int32_t *acc) {
    hq_gather(x, count, table, -(int64_t)in_qmin, acc_zp, acc);
}

void hq_channel_lut(const int32_t *x, int32_t count, int32_t inner, int32_t channels, hq_table table,
                    int32_t size, int32_t in_qmin, int32_t acc_zp, int32_t *acc) {
    int32_t outer = count / (inner * channels), o, c;
    for (o = 0; o < outer; ++o) {
        for (c = 0; c < channels; ++c) {
            int64_t at = ((int64_t)o * channels + c) * inner;
            hq_gather(x + at, inner, table, (int64_t)c * size - in_qmin, acc_zp, acc + at);
        }
    }
}

void hq_softmax(const int32_t *x, int32_t outer, int32_t len, int32_t inner, const int32_t *exp_table,
                int32_t table_size, int32_t out_exp, int32_t out_qmax, int32_t acc_zp, int32_t *acc) {
    /* S = sum E < 2^31, R = 2^30 / S, E R <= 2^30: one division per row, all in int32 */
    int32_t o, r, j, shift = HQ_SOFTMAX_RECIPROCAL_BITS - out_exp;
    for (o = 0; o < outer; ++o) {
        for (r = 0; r < inner; ++r) {
            const int32_t *xr = x + (int64_t)o * len * inner + r;
            int32_t *ar = acc + (int64_t)o * len * inner + r;
            int32_t mx = xr[0], s = 0, rec;
            for (j = 1; j < len; ++j) if (xr[j * inner] > mx) mx = xr[j * inner];
            for (j = 0; j < len; ++j) s += exp_table[xr[j * inner] - mx + table_size - 1];
            rec = ((1 << HQ_SOFTMAX_RECIPROCAL_BITS) + s / 2) / s;
            for (j = 0; j < len; ++j) {
                int32_t code = hq_srr32(exp_table[xr[j * inner] - mx + table_size - 1] * rec, shift);
                ar[j * inner] = (code < out_qmax ? code : out_qmax) - acc_zp;
            }
        }
    }
}

int32_t hq_isqrt(int32_t v) {
    /* floor square root of v >= 0, digit by digit (16 steps) */
    int32_t rem = v, res = 0, bit = 1 << 30, i;
    for (i = 0; i < 16; ++i) {
        if (rem >= res + bit) {
            rem -= res + bit;
            res = (res >> 1) + bit;
        } else {
            res >>= 1;
        }
        bit >>= 2;
    }
    return res;
}

/* floor(num / den) for den > 0, in int32 */
static int32_t hq_floor_div32(int32_t num, int32_t den) {
    int32_t q = num / den;
    return (num % den != 0 && num < 0) ? q - 1 : q;
}

void hq_layer_norm(const int32_t *x, int32_t rows, int32_t channels, int32_t in_zp, const int32_t *ptf_shift,
                   int32_t ptf_len, int32_t eps_q, const int32_t *gamma_q, const int32_t *beta_q, int32_t out_shift,
                   int32_t out_zp, int32_t out_qmin, int32_t out_qmax, int32_t acc_zp, int32_t *acc) {
    /* every intermediate in int32 (the bounds are the program's width analysis); acc holds d, then the codes */
    int32_t r, j;
    for (r = 0; r < rows; ++r) {
        const int32_t *xr = x + (int64_t)r * channels;
        int32_t *ar = acc + (int64_t)r * channels;
        int32_t sum = 0, mean, rem, v = 0, bits = 0, p, w, t, root, rec, frac;
        for (j = 0; j < channels; ++j) {
            ar[j] = (xr[j] - in_zp) * (1 << ptf_shift[ptf_len == 1 ? 0 : j]);
            sum += ar[j];
        }
        mean = hq_floor_div32(sum, channels);
        rem = sum - mean * channels;
        for (j = 0; j < channels; ++j) {
            ar[j] -= mean;
            v += ar[j] * ar[j];
        }
        v = v - rem * rem / channels + eps_q;
        while (bits < 31 && (v >> bits) != 0) ++bits;
        p = (31 - bits) / 2;
        if (p > HQ_LN_RECIPROCAL_BITS - HQ_LN_FRAC_BITS) p = HQ_LN_RECIPROCAL_BITS - HQ_LN_FRAC_BITS;
        w = v * (1 << (2 * p));
        t = hq_isqrt(w);
        root = t + (w - t * t > t ? 1 : 0);
        if (root < 1) root = 1;
        rec = (1 << HQ_LN_RECIPROCAL_BITS) / root;
        frac = (rem * rec + channels / 2) / channels;
        for (j = 0; j < channels; ++j) {
            int32_t n = hq_srr32(ar[j] * rec - frac, HQ_LN_RECIPROCAL_BITS - HQ_LN_FRAC_BITS - p);
            int32_t code = hq_srr32(n * gamma_q[j] + beta_q[j], out_shift) + out_zp;
            ar[j] = (code < out_qmin ? out_qmin : (code > out_qmax ? out_qmax : code)) - acc_zp;
        }
    }
}

void hq_view_copy(const int32_t *in, const hq_view *v, int32_t *out) {
    /* every index but the last one's, then a strided run along the last dim; the source offset follows the
     * index incrementally */
    int32_t idx[HQ_MAX_DIMS] = {0};
    int32_t last = v->ndim - 1, d, j, n = v->ndim ? v->shape[last] : 1, step = v->ndim ? v->stride[last] : 0;
    int64_t rows = 1, r, src = v->offset;
    for (d = 0; d < last; ++d) rows *= v->shape[d];
    for (r = 0; r < rows; ++r) {
        const int32_t *p = in + src;
        int32_t *q = out + r * n;
        if (step == 1) {
            for (j = 0; j < n; ++j) q[j] = p[j];
        } else {
            for (j = 0; j < n; ++j) q[j] = p[(int64_t)j * step];
        }
        for (d = last - 1; d >= 0; --d) {
            src += v->stride[d];
            if (++idx[d] < v->shape[d]) break;
            src -= (int64_t)v->shape[d] * v->stride[d];
            idx[d] = 0;
        }
    }
}
