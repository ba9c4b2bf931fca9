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
    int32_t i;
    for (i = 0; i < count; ++i) {
        int32_t c = (i / rq->inner) % rq->channels;
        int64_t v;
        if (rq->mode == HQ_REQUANT_SHIFT) {
            v = hq_srr(acc[i], HQ_P(rq->shift, c));
        } else {
            int32_t a = HQ_P(rq->a, c), sign = HQ_P(rq->sign, c), n = HQ_P(rq->n, c);
            int32_t b = sign != 0 ? HQ_P(rq->b, c) : a;
            int32_t low = a < b ? a : b, lift = low < 0 ? -low : 0;
            int64_t total;
            a += lift;
            b += lift;
            n += lift;
            total = (int64_t)acc[i] * ((int64_t)1 << a) + sign * ((int64_t)acc[i] * ((int64_t)1 << b));
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
        }
        out[i] = hq_clamp(v + HQ_P(rq->zero_point, c), rq->qmin, rq->qmax);
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

void hq_conv2d(const int32_t *x, int32_t zp, int32_t c_in, int32_t h, int32_t w, const hq_weights *wt,
               const int32_t *bias, int32_t c_out, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
               int32_t pw, int32_t dh, int32_t dw, int32_t groups, int32_t ho, int32_t wo, int32_t *acc) {
    int32_t cg = c_in / groups, og = c_out / groups;
    int32_t o, oy, ox, ci, ky, kx;
    for (o = 0; o < c_out; ++o) {
        int32_t g = o / og;
        for (oy = 0; oy < ho; ++oy) {
            for (ox = 0; ox < wo; ++ox) {
                int32_t s = bias ? bias[o] : 0;
                for (ci = 0; ci < cg; ++ci) {
                    const int32_t *plane = x + (int64_t)(g * cg + ci) * h * w;
                    int32_t wbase = (o * cg + ci) * kh * kw;
                    for (ky = 0; ky < kh; ++ky) {
                        int32_t iy = oy * sh - ph + ky * dh;
                        if (iy < 0 || iy >= h) continue;
                        for (kx = 0; kx < kw; ++kx) {
                            int32_t ix = ox * sw - pw + kx * dw;
                            if (ix < 0 || ix >= w) continue;
                            s += (plane[iy * w + ix] - zp) * hq_weight(wt, wbase + ky * kw + kx);
                        }
                    }
                }
                acc[((int64_t)o * ho + oy) * wo + ox] = s;
            }
        }
    }
}

void hq_linear(const int32_t *x, hq_param zp, int32_t rows, int32_t k, const hq_weights *wt, const int32_t *bias,
               int32_t n, int32_t *acc) {
    int32_t r, j, i;
    for (r = 0; r < rows; ++r) {
        const int32_t *xr = x + (int64_t)r * k;
        for (j = 0; j < n; ++j) {
            int32_t s = bias ? bias[j] : 0;
            for (i = 0; i < k; ++i) s += (xr[i] - HQ_P(zp, i)) * hq_weight(wt, j * k + i);
            acc[(int64_t)r * n + j] = s;
        }
    }
}

void hq_matmul(const int32_t *a, hq_param zpa, const int32_t *b, hq_param zpb, int32_t batch, int32_t m, int32_t k,
               int32_t n, int32_t *acc) {
    int32_t t, i, j, l;
    for (t = 0; t < batch; ++t) {
        const int32_t *at = a + (int64_t)t * m * k, *bt = b + (int64_t)t * k * n;
        int32_t *ct = acc + (int64_t)t * m * n;
        for (i = 0; i < m; ++i) {
            for (j = 0; j < n; ++j) {
                int32_t s = 0;
                for (l = 0; l < k; ++l) s += (at[i * k + l] - HQ_P(zpa, l)) * (bt[l * n + j] - HQ_P(zpb, j));
                ct[i * n + j] = s;
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

void hq_lut(const int32_t *x, int32_t count, const int32_t *table, int32_t size, int32_t in_qmin, int32_t acc_zp,
            int32_t *acc) {
    int32_t i;
    (void)size;
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
    int32_t idx[HQ_MAX_DIMS] = {0};
    int64_t count = 1, i;
    int32_t d;
    for (d = 0; d < v->ndim; ++d) count *= v->shape[d];
    for (i = 0; i < count; ++i) {
        int64_t src = v->offset;
        for (d = 0; d < v->ndim; ++d) src += (int64_t)idx[d] * v->stride[d];
        out[i] = in[src];
        for (d = v->ndim - 1; d >= 0; --d) { /* next index, last dim fastest */
            if (++idx[d] < v->shape[d]) break;
            idx[d] = 0;
        }
    }
}
