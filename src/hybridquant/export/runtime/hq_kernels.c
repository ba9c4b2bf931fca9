/* hybridquant integer kernels (see hq_kernels.h for the conventions). */
#include "hq_kernels.h"

#define HQ_P(p, c) ((p).v[(p).len == 1 ? 0 : (c)])
/* pixels per register tile of the matrix product */
#define HQ_TILE 16

int32_t hq_weight(const hq_weights *w, int32_t i) {
    if (w->bits == 8) {
        return w->is_signed ? (int32_t)(int8_t)w->data[i] : (int32_t)w->data[i];
    } else {
        int64_t bit = (int64_t)i * w->bits;
        int32_t v = 0, j;
        for (j = 0; j < w->bits; ++j, ++bit) {
            v |= ((w->data[bit >> 3] >> (bit & 7)) & 1) << j;
        }
        if (w->is_signed && v >= (1 << (w->bits - 1))) v -= 1 << w->bits;
        return v;
    }
}

void hq_unpack_row(const hq_weights *w, int64_t first, int32_t count, int32_t *out) {
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
                    uint32_t k = (uint32_t)rq->shift.v[c * ks], u = (uint32_t)a_in[c] ^ 0x80000000u;
                    int32_t v = (int32_t)(u >> k) - (int32_t)(1u << (31 - k)) + (int32_t)((u >> (k - 1)) & 1u);
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
                    /* srr(acc, k) = floor(acc / 2^k) + bit k-1 of acc, in 32 bits: u = acc + 2^31 (as unsigned:
                     * the same low 31 bits, non-negative), floor(acc / 2^k) = (u >> k) - 2^(31-k). No signed shift,
                     * no overflow; vectorises. */
                    int32_t base = (int32_t)(1u << (31 - k)), lo = rq->qmin - zp, hi = rq->qmax - zp;
                    for (j = 0; j < inner; ++j) {
                        uint32_t u = (uint32_t)a_in[j] ^ 0x80000000u;
                        int32_t v = (int32_t)(u >> k) - base + (int32_t)((u >> (k - 1)) & 1u);
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
                        int64_t t = hq_floor_shift(total, n);
                        int32_t lo = 0, hi = rq->n_thresholds;
                        while (lo < hi) {
                            int32_t mid = lo + (hi - lo) / 2;
                            if (rq->thresholds[mid] <= t) lo = mid + 1; else hi = mid;
                        }
                        v = lo;
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

/* c[i][j] = bias_row[i] + bias_col[j] + sum_l a[i][l] b[l][j] for i < m, l < k, j < n (a bias may be 0). Four
 * rows by HQ_TILE columns of c stay in registers while l runs; the fixed-width inner loops vectorise. (Reading
 * 8-bit weights in place instead of unpacking them once per call measured twice the instructions.) */
static void hq_gemm(const int32_t *a, const int32_t *b, const int32_t *bias_row, const int32_t *bias_col, int32_t m,
                 int32_t k, int32_t n, int32_t *c) {
    int32_t i, j, l, t;
    for (i = 0; i < m; ++i) {
        for (j = 0; j < n; ++j) c[(int64_t)i * n + j] = (bias_row ? bias_row[i] : 0) + (bias_col ? bias_col[j] : 0);
    }
    for (i = 0; i + 4 <= m; i += 4) {
        const int32_t *a0 = a + (int64_t)i * k, *a1 = a0 + k, *a2 = a1 + k, *a3 = a2 + k;
        int32_t *c0 = c + (int64_t)i * n, *c1 = c0 + n, *c2 = c1 + n, *c3 = c2 + n;
        for (j = 0; j + HQ_TILE <= n; j += HQ_TILE) {
            int32_t t0[HQ_TILE], t1[HQ_TILE], t2[HQ_TILE], t3[HQ_TILE];
            for (t = 0; t < HQ_TILE; ++t) {
                t0[t] = c0[j + t];
                t1[t] = c1[j + t];
                t2[t] = c2[j + t];
                t3[t] = c3[j + t];
            }
            for (l = 0; l < k; ++l) {
                const int32_t *bl = b + (int64_t)l * n + j;
                int32_t w0 = a0[l], w1 = a1[l], w2 = a2[l], w3 = a3[l];
                for (t = 0; t < HQ_TILE; ++t) {
                    t0[t] += w0 * bl[t];
                    t1[t] += w1 * bl[t];
                    t2[t] += w2 * bl[t];
                    t3[t] += w3 * bl[t];
                }
            }
            for (t = 0; t < HQ_TILE; ++t) {
                c0[j + t] = t0[t];
                c1[j + t] = t1[t];
                c2[j + t] = t2[t];
                c3[j + t] = t3[t];
            }
        }
        for (l = 0; l < k && j < n; ++l) { /* the columns after the last whole tile */
            const int32_t *bl = b + (int64_t)l * n;
            int32_t w0 = a0[l], w1 = a1[l], w2 = a2[l], w3 = a3[l], q;
            for (q = j; q < n; ++q) {
                c0[q] += w0 * bl[q];
                c1[q] += w1 * bl[q];
                c2[q] += w2 * bl[q];
                c3[q] += w3 * bl[q];
            }
        }
    }
    for (; i < m; ++i) { /* the rows after the last group of four */
        for (l = 0; l < k; ++l) {
            const int32_t *bl = b + (int64_t)l * n;
            int32_t w0 = a[(int64_t)i * k + l];
            for (j = 0; j < n; ++j) c[(int64_t)i * n + j] += w0 * bl[j];
        }
    }
}

void hq_conv2d(const int32_t *x, int32_t zp, int32_t c_in, int32_t h, int32_t w, const hq_weights *wt,
               const int32_t *bias, int32_t c_out, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
               int32_t pw, int32_t dh, int32_t dw, int32_t groups, int32_t ho, int32_t wo, int32_t *acc,
               int32_t *temp) {
    /* temp: c_in * h * w centred inputs, then row = c_in / groups * kh * kw by ho * wo patch columns, then the
     * unpacked weights: one row (grouped), c_out rows (dense), or, with fewer than HQ_TILE output pixels, the
     * weights exported transposed ([row][c_out]) followed by the transposed patches and product */
    int32_t cg = c_in / groups, og = c_out / groups, row = cg * kh * kw, n_p = ho * wo;
    int32_t *xc = temp, *cols = temp + (int64_t)c_in * h * w, *wrow = cols + (int64_t)row * n_p;
    int32_t o, ci, ky, kx, oy, ox, i;
    for (i = 0; i < c_in * h * w; ++i) xc[i] = x[i] - zp;
    if (groups == 1) { /* a matrix product: [c_out, K] x [K, ho * wo], the patches as columns (zero padding) */
        if (kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0) {
            cols = xc;
        } else {
            for (ci = 0; ci < c_in; ++ci) {
                for (ky = 0; ky < kh; ++ky) {
                    for (kx = 0; kx < kw; ++kx) {
                        int32_t *c = cols + ((int64_t)(ci * kh + ky) * kw + kx) * ho * wo;
                        for (oy = 0; oy < ho; ++oy) {
                            int32_t iy = oy * sh - ph + ky * dh;
                            for (ox = 0; ox < wo; ++ox) {
                                int32_t ix = ox * sw - pw + kx * dw;
                                c[oy * wo + ox] = (iy < 0 || iy >= h || ix < 0 || ix >= w)
                                                      ? 0 : xc[((int64_t)ci * h + iy) * w + ix];
                            }
                        }
                    }
                }
            }
        }
        if (n_p >= HQ_TILE) { /* acc [c_out][n_p] = W [c_out][row] cols [row][n_p] */
            hq_unpack_row(wt, 0, c_out * row, wrow);
            hq_gemm(wrow, cols, bias, 0, c_out, row, n_p, acc);
        } else { /* few pixels: the product transposed, so the vectors run along the output channels */
            int32_t *cols_t = wrow + (int64_t)row * c_out, *prod = cols_t + (int64_t)n_p * row, p;
            for (i = 0; i < row; ++i) {
                for (p = 0; p < n_p; ++p) cols_t[(int64_t)p * row + i] = cols[(int64_t)i * n_p + p];
            }
            hq_unpack_row(wt, 0, c_out * row, wrow); /* exported transposed: [row][c_out] */
            hq_gemm(cols_t, wrow, 0, bias, n_p, row, c_out, prod);
            for (o = 0; o < c_out; ++o) {
                for (p = 0; p < n_p; ++p) acc[(int64_t)o * n_p + p] = prod[(int64_t)p * c_out + o];
            }
        }
        return;
    }
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
                    /* the output columns whose input column ox * sw + off lies in [0, w) */
                    lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
                    hi = (w - 1 - off) < 0 ? 0 : (w - 1 - off) / sw + 1;
                    if (hi > wo) hi = wo;
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

void hq_linear(const int32_t *x, hq_param zp, int32_t rows, int32_t k, const hq_weights *wt, const int32_t *bias,
               int32_t n, int32_t *acc, int32_t *temp) {
    /* temp: rows * k centred inputs, then the weights (exported transposed, [k][n]) unpacked */
    int32_t *xc = temp, *wcols = temp + (int64_t)rows * k;
    int32_t r, i;
    for (r = 0; r < rows; ++r) {
        for (i = 0; i < k; ++i) xc[(int64_t)r * k + i] = x[(int64_t)r * k + i] - HQ_P(zp, i);
    }
    hq_unpack_row(wt, 0, k * n, wcols);
    hq_gemm(xc, wcols, 0, bias, rows, k, n, acc);
}

void hq_matmul(const int32_t *a, hq_param zpa, const int32_t *b, hq_param zpb, int32_t batch, int32_t m, int32_t k,
               int32_t n, int32_t *acc, int32_t *temp) {
    /* temp: batch * k * n centred right operand */
    int32_t t, i, j, l;
    for (t = 0; t < batch; ++t) {
        for (l = 0; l < k; ++l) {
            for (j = 0; j < n; ++j) {
                int64_t at = ((int64_t)t * k + l) * n + j;
                temp[at] = b[at] - HQ_P(zpb, j);
            }
        }
    }
    for (t = 0; t < batch; ++t) {
        const int32_t *at = a + (int64_t)t * m * k, *bt = temp + (int64_t)t * k * n;
        int32_t *ct = acc + (int64_t)t * m * n;
        for (i = 0; i < m; ++i) {
            int32_t *cr = ct + (int64_t)i * n;
            for (j = 0; j < n; ++j) cr[j] = 0;
            for (l = 0; l < k; ++l) {
                int32_t av = at[(int64_t)i * k + l] - HQ_P(zpa, l);
                const int32_t *br = bt + (int64_t)l * n;
                if (av == 0) continue;
                for (j = 0; j < n; ++j) cr[j] += av * br[j];
            }
        }
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

/* srr in 32 bits: k > 0 rounds half up without overflow (u = v + 2^31 as unsigned, floor(v / 2^k) =
 * (u >> k) - 2^(31-k)); k <= 0 is the exact left shift (the caller's bound keeps it in int32) */
static int32_t hq_srr32(int32_t v, int32_t k) {
    uint32_t u;
    if (k <= 0) return v * (1 << -k);
    if (k > 31) return 0; /* |v| < 2^31 <= 2^(k-1): rounds to 0 */
    u = (uint32_t)v ^ 0x80000000u;
    return (int32_t)(u >> k) - (int32_t)(1u << (31 - k)) + (int32_t)((u >> (k - 1)) & 1u);
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
