/* hybridquant integer kernels (see hq_kernels.h for the conventions). */
#include "hq_kernels.h"

#define HQ_P(p, c) ((p).v[(p).len == 1 ? 0 : (c)])

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

/* floor(num / den) for den > 0 */
static int64_t hq_floor_div(int64_t num, int64_t den) {
    return num >= 0 ? num / den : -((-num + den - 1) / den);
}

static int32_t hq_clamp(int64_t v, int32_t lo, int32_t hi) {
    return v < lo ? lo : (v > hi ? hi : (int32_t)v);
}

void hq_requantize(const int32_t *acc, int32_t *out, int32_t count, const hq_requant *rq) {
    int32_t outer = count / (rq->inner * rq->channels), o, c, j;
    if (rq->mode == HQ_REQUANT_SHIFT && rq->inner == 1) {
        /* channels along the last dim: one element per channel, its parameters read along with it */
        int32_t ks = rq->shift.len == 1 ? 0 : 1, zs = rq->zero_point.len == 1 ? 0 : 1;
        for (o = 0; o < outer; ++o) {
            const int32_t *a_in = acc + (int64_t)o * rq->channels;
            int32_t *q = out + (int64_t)o * rq->channels;
            for (c = 0; c < rq->channels; ++c) {
                int32_t k = rq->shift.v[c * ks];
                int64_t v;
                if (k >= 1 && k <= 31) { /* the 32-bit rounding shift of the loop below */
                    uint32_t u = (uint32_t)a_in[c] ^ 0x80000000u;
                    v = (int32_t)(u >> k) - (int32_t)(1u << (31 - k)) + (int32_t)((u >> (k - 1)) & 1u);
                } else {
                    v = hq_srr(a_in[c], k);
                }
                q[c] = hq_clamp(v + rq->zero_point.v[c * zs], rq->qmin, rq->qmax);
            }
        }
        return;
    }
    for (o = 0; o < outer; ++o) {
        for (c = 0; c < rq->channels; ++c) {
            const int32_t *a_in = acc + ((int64_t)o * rq->channels + c) * rq->inner;
            int32_t *q = out + ((int64_t)o * rq->channels + c) * rq->inner;
            int32_t zp = HQ_P(rq->zero_point, c);
            if (rq->mode == HQ_REQUANT_SHIFT) {
                int32_t k = HQ_P(rq->shift, c);
                if (k > 0 && k < 32) {
                    /* srr(acc, k) = floor(acc / 2^k) + bit k-1 of acc, in 32 bits: u = acc + 2^31 (as unsigned:
                     * the same low 31 bits, non-negative), floor(acc / 2^k) = (u >> k) - 2^(31-k). No signed shift,
                     * no overflow; vectorises. */
                    int32_t base = (int32_t)(1u << (31 - k)), lo = rq->qmin - zp, hi = rq->qmax - zp;
                    for (j = 0; j < rq->inner; ++j) {
                        uint32_t u = (uint32_t)a_in[j] ^ 0x80000000u;
                        int32_t v = (int32_t)(u >> k) - base + (int32_t)((u >> (k - 1)) & 1u);
                        q[j] = (v < lo ? lo : (v > hi ? hi : v)) + zp;
                    }
                } else if (k == 0) { /* the identity requantization: saturation only */
                    int32_t lo = rq->qmin - zp, hi = rq->qmax - zp;
                    for (j = 0; j < rq->inner; ++j) {
                        int32_t v = a_in[j];
                        q[j] = (v < lo ? lo : (v > hi ? hi : v)) + zp;
                    }
                } else {
                    for (j = 0; j < rq->inner; ++j) q[j] = hq_clamp(hq_srr(a_in[j], k) + zp, rq->qmin, rq->qmax);
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
                for (j = 0; j < rq->inner; ++j) {
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

/* acc[o][p] = bias[o] + sum_k w[o][k] cols[k][p] for o < n_out, k < n_k, p < n_p; four output rows at a time, so
 * each column value is loaded once for four products. wrows: 4 * n_k scratch values. */
static void hq_gemm_rows(const hq_weights *wt, const int32_t *bias, const int32_t *cols, int32_t n_out, int32_t n_k,
                         int32_t n_p, int32_t *acc, int32_t *wrows) {
    int32_t o, k, p, r;
    for (o = 0; o < n_out; o += 4) {
        int32_t rows = n_out - o < 4 ? n_out - o : 4;
        int32_t *a0 = acc + (int64_t)o * n_p, *a1 = a0 + n_p, *a2 = a1 + n_p, *a3 = a2 + n_p;
        for (r = 0; r < 4; ++r) {
            int32_t *ar = a0 + (int64_t)r * n_p;
            if (r < rows) {
                int32_t b = bias ? bias[o + r] : 0;
                hq_unpack_row(wt, (int64_t)(o + r) * n_k, n_k, wrows + r * n_k);
                for (p = 0; p < n_p; ++p) ar[p] = b;
            } else {
                for (k = 0; k < n_k; ++k) wrows[r * n_k + k] = 0;
            }
        }
        if (rows == 4) {
            for (k = 0; k < n_k; ++k) {
                const int32_t *c = cols + (int64_t)k * n_p;
                int32_t w0 = wrows[k], w1 = wrows[n_k + k], w2 = wrows[2 * n_k + k], w3 = wrows[3 * n_k + k];
                for (p = 0; p < n_p; ++p) {
                    int32_t x = c[p];
                    a0[p] += w0 * x;
                    a1[p] += w1 * x;
                    a2[p] += w2 * x;
                    a3[p] += w3 * x;
                }
            }
        } else {
            for (r = 0; r < rows; ++r) {
                int32_t *ar = a0 + (int64_t)r * n_p;
                for (k = 0; k < n_k; ++k) {
                    const int32_t *c = cols + (int64_t)k * n_p;
                    int32_t wv = wrows[r * n_k + k];
                    for (p = 0; p < n_p; ++p) ar[p] += wv * c[p];
                }
            }
        }
    }
}

void hq_conv2d(const int32_t *x, int32_t zp, int32_t c_in, int32_t h, int32_t w, const hq_weights *wt,
               const int32_t *bias, int32_t c_out, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
               int32_t pw, int32_t dh, int32_t dw, int32_t groups, int32_t ho, int32_t wo, int32_t *acc,
               int32_t *temp) {
    /* temp: c_in * h * w centred inputs, then c_in / groups * kh * kw * ho * wo patch columns, then four unpacked
     * weight rows */
    int32_t cg = c_in / groups, og = c_out / groups, row = cg * kh * kw;
    int32_t *xc = temp, *cols = temp + (int64_t)c_in * h * w, *wrow = cols + (int64_t)row * ho * wo;
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
        hq_gemm_rows(wt, bias, cols, c_out, row, ho * wo, acc, wrow);
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
    /* temp: rows * k centred inputs, then one unpacked weight row (k) */
    int32_t *xc = temp, *wrow = temp + (int64_t)rows * k;
    int32_t r, j, i;
    for (r = 0; r < rows; ++r) {
        for (i = 0; i < k; ++i) xc[(int64_t)r * k + i] = x[(int64_t)r * k + i] - HQ_P(zp, i);
    }
    for (j = 0; j < n; ++j) {
        int32_t b = bias ? bias[j] : 0;
        hq_unpack_row(wt, (int64_t)j * k, k, wrow);
        for (r = 0; r < rows; ++r) {
            const int32_t *xr = xc + (int64_t)r * k;
            int32_t s = 0;
            for (i = 0; i < k; ++i) s += xr[i] * wrow[i];
            acc[(int64_t)r * n + j] = s + b;
        }
    }
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

void hq_lut(const int32_t *x, int32_t count, const int32_t *table, int32_t in_qmin, int32_t acc_zp, int32_t *acc) {
    int32_t i;
    for (i = 0; i < count; ++i) acc[i] = table[x[i] - in_qmin] - acc_zp;
}

void hq_channel_lut(const int32_t *x, int32_t count, int32_t inner, int32_t channels, const int32_t *table,
                    int32_t size, int32_t in_qmin, int32_t acc_zp, int32_t *acc) {
    int32_t i;
    for (i = 0; i < count; ++i) acc[i] = table[((i / inner) % channels) * size + x[i] - in_qmin] - acc_zp;
}

void hq_softmax(const int32_t *x, int32_t outer, int32_t len, int32_t inner, const int32_t *exp_table,
                int32_t table_size, int32_t out_exp, int32_t out_qmax, int32_t acc_zp, int32_t *acc) {
    int32_t o, r, j;
    for (o = 0; o < outer; ++o) {
        for (r = 0; r < inner; ++r) {
            const int32_t *xr = x + (int64_t)o * len * inner + r;
            int32_t *ar = acc + (int64_t)o * len * inner + r;
            int32_t mx = xr[0];
            int64_t s = 0;
            for (j = 1; j < len; ++j) if (xr[j * inner] > mx) mx = xr[j * inner];
            for (j = 0; j < len; ++j) s += exp_table[xr[j * inner] - mx + table_size - 1];
            for (j = 0; j < len; ++j) {
                int64_t e = exp_table[xr[j * inner] - mx + table_size - 1];
                int64_t code = (e * ((int64_t)1 << (out_exp + 1)) + s) / (2 * s);
                ar[j * inner] = (int32_t)(code < out_qmax ? code : out_qmax) - acc_zp;
            }
        }
    }
}

int64_t hq_isqrt(int64_t v) {
    /* floor square root, digit by digit (32 steps) */
    int64_t rem = v, res = 0, bit = (int64_t)1 << 62;
    int32_t i;
    for (i = 0; i < 32; ++i) {
        int64_t trial = res + bit;
        if (rem >= trial) {
            rem -= trial;
            res = (res >> 1) + bit;
        } else {
            res >>= 1;
        }
        bit >>= 2;
    }
    return res;
}

void hq_layer_norm(const int32_t *x, int32_t rows, int32_t channels, int32_t in_zp, const int32_t *ptf_shift,
                   int32_t ptf_len, int32_t frac_bits, int32_t sqrt_frac_bits, int64_t eps_q, const int32_t *gamma_q,
                   const int64_t *beta_q, int32_t out_shift, int32_t out_zp, int32_t out_qmin, int32_t out_qmax,
                   int32_t acc_zp, int32_t *acc) {
    int32_t r, j;
    for (r = 0; r < rows; ++r) {
        const int32_t *xr = x + (int64_t)r * channels;
        int32_t *ar = acc + (int64_t)r * channels;
        int64_t s1 = 0, s2 = 0, var, root;
        for (j = 0; j < channels; ++j) {
            int64_t v = (int64_t)(xr[j] - in_zp) * ((int64_t)1 << ptf_shift[ptf_len == 1 ? 0 : j]);
            s1 += v;
            s2 += v * v;
        }
        var = (int64_t)channels * s2 - s1 * s1 + eps_q;
        root = hq_isqrt(var * ((int64_t)1 << (2 * sqrt_frac_bits)));
        if (root < 1) root = 1;
        for (j = 0; j < channels; ++j) {
            int64_t v = (int64_t)(xr[j] - in_zp) * ((int64_t)1 << ptf_shift[ptf_len == 1 ? 0 : j]);
            int64_t y = (int64_t)channels * v - s1;
            int64_t num = y * ((int64_t)1 << (frac_bits + sqrt_frac_bits));
            int64_t nrm = hq_floor_div(2 * num + root, 2 * root);
            ar[j] = hq_clamp(hq_srr(nrm * gamma_q[j] + beta_q[j], out_shift) + out_zp, out_qmin, out_qmax) - acc_zp;
        }
    }
}

void hq_view_copy(const int32_t *in, const hq_view *v, int32_t *out) {
    /* every index but the last one's, then a strided run along the last dim */
    int32_t idx[HQ_MAX_DIMS] = {0};
    int32_t last = v->ndim - 1, d, j, n = v->ndim ? v->shape[last] : 1, step = v->ndim ? v->stride[last] : 0;
    int64_t rows = 1, r;
    for (d = 0; d < last; ++d) rows *= v->shape[d];
    for (r = 0; r < rows; ++r) {
        int64_t src = v->offset;
        for (d = 0; d < last; ++d) src += (int64_t)idx[d] * v->stride[d];
        for (j = 0; j < n; ++j) out[r * n + j] = in[src + (int64_t)j * step];
        for (d = last - 1; d >= 0; --d) {
            if (++idx[d] < v->shape[d]) break;
            idx[d] = 0;
        }
    }
}
