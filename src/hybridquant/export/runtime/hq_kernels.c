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

/* out[i] for i < count (returned: the fields written) from field `first` on, as groups of g fields of `bits`
 * filling nb whole bytes (one 64-bit word a group, low bits first); the fields before the first whole group by
 * hq_weight, the ones after the last left to the caller */
static int32_t hq_unpack_groups(const hq_weights *w, int64_t first, int32_t count, int32_t *out, int32_t bits,
                                int32_t g, int32_t nb) {
    int32_t i, f, b;
    uint32_t mask = (1u << bits) - 1u, half = 1u << (bits - 1);
    for (i = 0; i < count && (first + i) % g != 0; ++i) out[i] = hq_weight(w, (int32_t)(first + i));
    for (; i + g <= count; i += g) {
        const uint8_t *p = w->data + (first + i) / g * nb;
        uint64_t word = 0;
        for (b = 0; b < nb; ++b) word |= (uint64_t)p[b] << (8 * b);
        for (f = 0; f < g; ++f) {
            uint32_t v = (uint32_t)(word >> (f * bits)) & mask;
            out[i + f] = w->is_signed ? (int32_t)(v ^ half) - (int32_t)half : (int32_t)v;
        }
    }
    return i;
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
    i = 0;
    if (w->bits == 4) { /* two fields a byte, low nibble first: whole bytes in a loop that vectorises */
        const uint8_t *p;
        int32_t pairs, j, flip = w->is_signed ? 8 : 0; /* (v ^ 8) - 8 sign-extends a 4-bit field */
        if ((first & 1) && count > 0) {
            out[0] = hq_weight(w, (int32_t)first);
            i = 1;
        }
        p = w->data + ((first + i) >> 1);
        pairs = (count - i) / 2;
        for (j = 0; j < pairs; ++j) {
            out[i + 2 * j] = ((p[j] & 15) ^ flip) - flip;
            out[i + 2 * j + 1] = ((p[j] >> 4) ^ flip) - flip;
        }
        i += 2 * pairs;
    } else { /* groups of fields that fill whole bytes; constant sizes, so each case's loops unroll */
        switch (w->bits) {
        case 2: i = hq_unpack_groups(w, first, count, out, 2, 4, 1); break;
        case 6: i = hq_unpack_groups(w, first, count, out, 6, 4, 3); break;
        default: i = hq_unpack_groups(w, first, count, out, w->bits, 8, w->bits); break;
        }
    }
    for (; i < count; ++i) out[i] = hq_weight(w, (int32_t)(first + i));
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

/* clamp(srr(v, k), lo, hi) in 32 bits, branch-free for -29 <= k <= 31 with lo, hi within +-2^29: k <= 0, the
 * exact left shift by -k, is a left shift by 1 - k then a rounding shift by 1; a value whose shifted magnitude
 * would pass 2^30 saturates either way, so it is clamped first (and the shift cannot overflow) */
static int32_t hq_requant32(int32_t v, int32_t k, int32_t lo, int32_t hi) {
    int32_t s = k > 0 ? 0 : 1 - k, b = (int32_t)(0x7fffffffu >> s);
    v = v < -b ? -b : (v > b ? b : v);
    v = hq_srr32_pos(v * (1 << s), k > 0 ? k : 1);
    return v < lo ? lo : (v > hi ? hi : v);
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
            if (k < -29 || k > 31) plain = 0;
        }
        for (o = 0; o < outer; ++o) {
            const int32_t *a_in = acc + (int64_t)o * channels;
            int32_t *q = out + (int64_t)o * channels;
            if (plain) {
                for (c = 0; c < channels; ++c) {
                    int32_t zp = rq->zero_point.v[c * zs];
                    q[c] = hq_requant32(a_in[c], rq->shift.v[c * ks], rq->qmin - zp, rq->qmax - zp) + zp;
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
                if (k >= -29 && k <= 31) {
                    int32_t lo = rq->qmin - zp, hi = rq->qmax - zp;
                    for (j = 0; j < inner; ++j) q[j] = hq_requant32(a_in[j], k, lo, hi) + zp;
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
    if (sw == 1) { /* no division */
        *lo = off >= 0 ? 0 : -off;
        *hi = w - off < 0 ? 0 : w - off;
    } else {
        *lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
        *hi = (w - 1 - off) < 0 ? 0 : (w - 1 - off) / sw + 1;
    }
    if (*hi > wo) *hi = wo;
    if (*lo > *hi) *lo = *hi;
}

/* t[r HQ_TN + j] = sum_l a[r][l] (b[l][j] - zp) for r < HQ_TR, j < HQ_TN: HQ_TR rows of a (k long, k apart) by HQ_TN
 * columns of b (rows ldb apart). Each segment of a row of b is loaded once and multiplied into HQ_TR
 * accumulators whose lanes run along j: the compiler keeps them in vector registers (vpmulld with a broadcast
 * operand on x86), and no sum is horizontal. */
static void hq_tile(const int32_t *a, const int32_t *b, int64_t ldb, int32_t zp, int32_t k,
                    int32_t *restrict t) {
    int32_t t0[HQ_TN] = {0}, t1[HQ_TN] = {0}, t2[HQ_TN] = {0}, t3[HQ_TN] = {0}, l, j;
    const int32_t *a1 = a + k, *a2 = a1 + k, *a3 = a2 + k;
    for (l = 0; l < k; ++l) {
        const int32_t *br = b + l * ldb;
        for (j = 0; j < HQ_TN; ++j) {
            int32_t v = br[j] - zp;
            t0[j] += a[l] * v;
            t1[j] += a1[l] * v;
            t2[j] += a2[l] * v;
            t3[j] += a3[l] * v;
        }
    }
    for (j = 0; j < HQ_TN; ++j) {
        t[j] = t0[j];
        t[HQ_TN + j] = t1[j];
        t[2 * HQ_TN + j] = t2[j];
        t[3 * HQ_TN + j] = t3[j];
    }
}

/* c[i * ci + j * cj] = bias_row[i] + bias_col[j] + sum_l a[i][l] (b[l][j] - zp) for i < m, j < n, l < k (a
 * bias may be 0): a holds HQ_ROWS(m) rows (zeros after m), b rows of ldb. By tiles of HQ_TR x HQ_TN (hq_tile);
 * the last columns, fewer than HQ_TN, are copied to `tail` ([k][HQ_TN], padded with zp). The width analysis
 * bounds every sum within int32 in any order of its terms. */
static void hq_gemm(const int32_t *a, int32_t m, int32_t k, const int32_t *b, int64_t ldb, int32_t zp, int32_t n,
                    const int32_t *bias_row, const int32_t *bias_col, int32_t *c, int64_t ci, int64_t cj,
                    int32_t *tail) {
    int32_t t[HQ_TR * HQ_TN], i0, j0, l, j, r;
    for (j0 = 0; j0 < n; j0 += HQ_TN) {
        int32_t nj = n - j0 < HQ_TN ? n - j0 : HQ_TN;
        const int32_t *bt = b + j0;
        int64_t ld = ldb;
        if (nj < HQ_TN) {
            for (l = 0; l < k; ++l) {
                for (j = 0; j < HQ_TN; ++j) tail[l * HQ_TN + j] = j < nj ? b[l * ldb + j0 + j] : zp;
            }
            bt = tail;
            ld = HQ_TN;
        }
        for (i0 = 0; i0 < m; i0 += HQ_TR) {
            hq_tile(a + (int64_t)i0 * k, bt, ld, zp, k, t);
            for (r = 0; r < HQ_TR && i0 + r < m; ++r) { /* the sums with their biases, out along j */
                int32_t *cr = c + (i0 + r) * ci + j0 * cj, *tr = t + r * HQ_TN;
                int32_t br = bias_row ? bias_row[i0 + r] : 0;
                if (bias_col) {
                    for (j = 0; j < nj; ++j) tr[j] += bias_col[j0 + j];
                }
                if (cj == 1) {
                    for (j = 0; j < nj; ++j) cr[j] = br + tr[j];
                } else {
                    for (j = 0; j < nj; ++j) cr[j * cj] = br + tr[j];
                }
            }
        }
    }
}

/* c[i * ci + j * cj] = bias_col[j] + sum_l a[i][l] w[l][j] (as hq_gemm) for weights stored in column blocks
 * ([n / HQ_TN][k][HQ_TN], the last [k][n % HQ_TN]; the exporter's column_blocks): one block unpacked at a time
 * into blk ([k][HQ_TN], then a tail [k][HQ_TN]) */
static void hq_gemm_blocks(const int32_t *a, int32_t m, int32_t k, const hq_weights *wt, int32_t n,
                           const int32_t *bias_col, int32_t *c, int64_t ci, int64_t cj, int32_t *blk) {
    int32_t j0;
    for (j0 = 0; j0 < n; j0 += HQ_TN) {
        int32_t nj = n - j0 < HQ_TN ? n - j0 : HQ_TN;
        hq_unpack_row(wt, (int64_t)j0 * k, nj * k, blk);
        hq_gemm(a, m, k, blk, nj, 0, nj, 0, bias_col ? bias_col + j0 : 0, c + j0 * cj, ci, cj,
                blk + (int64_t)k * HQ_TN);
    }
}

/* the rows of a ([.][k]) from m up to HQ_ROWS(m): zeros */
static void hq_zero_rows(int32_t *a, int32_t m, int32_t k) {
    int64_t i;
    for (i = (int64_t)m * k; i < (int64_t)HQ_ROWS(m) * k; ++i) a[i] = 0;
}

/* y[i] += a * x[i] for i < n (the arrays do not overlap) */
static void hq_axpy(int32_t *restrict y, const int32_t *restrict x, int32_t a, int32_t n) {
    int32_t i;
    for (i = 0; i < n; ++i) y[i] += a * x[i];
}

/* the sh x sw stride phases of one input plane (h x w) padded with zeros: phase (py, px) holds, at [y'][x'] for
 * y' < hq, x' < wq, the padded plane's row y' sh + py and column x' sw + px (padded row y = input row y - ph,
 * column x = input column x - pw). A tap (ky, kx) of the output pixel (oy, ox) then reads phase
 * (ky dh % sh, kx dw % sw) at [oy + ky dh / sh][ox + kx dw / sw]: fixed offsets, no bounds. Writes the input's
 * positions only: the caller zeroes the sh sw hq wq values once, and the padding stays zero from plane to
 * plane. */
static void hq_phases(const int32_t *xp, int32_t zp, int32_t h, int32_t w, int32_t sh, int32_t sw, int32_t ph,
                      int32_t pw, int32_t hq, int32_t wq, int32_t *phases) {
    int32_t iy, py = ph % sh, yq = ph / sh, px, ox, lo[HQ_MAX_STRIDE], hi[HQ_MAX_STRIDE];
    for (px = 0; px < sw; ++px) hq_inside(px - pw, sw, w, wq, &lo[px], &hi[px]);
    for (iy = 0; iy < h && yq < hq; ++iy) { /* input row iy: padded row iy + ph = yq sh + py */
        const int32_t *xr = xp + (int64_t)iy * w;
        for (px = 0; px < sw; ++px) {
            int32_t *q = phases + ((int64_t)(py * sw + px) * hq + yq) * wq, off = px - pw;
            if (sw == 1) {
                for (ox = lo[px]; ox < hi[px]; ++ox) q[ox] = xr[ox + off] - zp;
            } else if (sw == 2) { /* a constant stride: the loop vectorises */
                for (ox = lo[px]; ox < hi[px]; ++ox) q[ox] = xr[ox * 2 + off] - zp;
            } else {
                for (ox = lo[px]; ox < hi[px]; ++ox) q[ox] = xr[ox * sw + off] - zp;
            }
        }
        if (++py == sh) {
            py = 0;
            ++yq;
        }
    }
}

/* the centred patches of a dense conv as rows [row][n_p] (row l = c kh kw + ky kw + kx): each a tap's window of
 * an input plane's stride phases (hq_phases, into `phases`) */
static void hq_patches(const int32_t *x, int32_t zp, int32_t c_in, int32_t h, int32_t w, int32_t kh, int32_t kw,
                       int32_t sh, int32_t sw, int32_t ph, int32_t pw, int32_t dh, int32_t dw, int32_t ho,
                       int32_t wo, int32_t hq, int32_t wq, int32_t *phases, int32_t *cols) {
    int32_t ci, ky, kx, oy, ox, n_p = ho * wo, i;
    for (i = 0; i < sh * sw * hq * wq; ++i) phases[i] = 0;
    for (ci = 0; ci < c_in; ++ci) {
        hq_phases(x + (int64_t)ci * h * w, zp, h, w, sh, sw, ph, pw, hq, wq, phases);
        for (ky = 0; ky < kh; ++ky) {
            for (kx = 0; kx < kw; ++kx) {
                const int32_t *src = phases + ((int64_t)(ky * dh % sh * sw + kx * dw % sw) * hq + ky * dh / sh) * wq
                                     + kx * dw / sw;
                int32_t *col = cols + ((int64_t)(ci * kh + ky) * kw + kx) * n_p;
                for (oy = 0; oy < ho; ++oy) {
                    for (ox = 0; ox < wo; ++ox) col[oy * wo + ox] = src[oy * wq + ox];
                }
            }
        }
    }
}

void hq_conv2d(const int32_t *x, int32_t zp, int32_t c_in, int32_t h, int32_t w, const hq_weights *wt,
               const int32_t *bias, int32_t c_out, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
               int32_t pw, int32_t dh, int32_t dw, int32_t groups, int32_t ho, int32_t wo, int32_t *acc,
               void *temp) {
    /* wt: [c_out][row] (row = c_in / groups * kh * kw), but [row][c_out] in column blocks (hq_gemm_blocks) for
     * a dense conv of fewer than HQ_TN output pixels. temp (int32), with the phases of one input plane
     * P = [sh * sw][hq][wq] (hq_phases; hq, wq below): dense with n_p >= HQ_TN, HQ_TR rows of weights
     * [HQ_TR][row], a tail [row][HQ_TN], the centred patches [row][n_p] and P (none of these two for a pointwise
     * conv, which reads x); dense with fewer pixels, the patches [HQ_ROWS(n_p)][row], a block of weights
     * [row][HQ_TN], a tail [row][HQ_TN]; grouped, P, the flat output [ho][wq], one row of weights [row] */
    int32_t cg = c_in / groups, og = c_out / groups, row = cg * kh * kw, n_p = ho * wo;
    int32_t hq = ((ho - 1) * sh + (kh - 1) * dh + 1 + sh - 1) / sh, wq = ((wo - 1) * sw + (kw - 1) * dw + sw) / sw;
    int32_t o, ci, ky, kx, oy, ox, i, l;
    int32_t *t32 = (int32_t *)temp;
    if (groups == 1) { /* a matrix product: acc [c_out][n_p] = W [c_out][row] . patches [row][n_p] */
        if (n_p >= HQ_TN) { /* lanes along the pixels */
            int32_t *w4 = t32, *tail = w4 + (int64_t)HQ_TR * row, *cols = tail + (int64_t)row * HQ_TN;
            int32_t *phases = cols + (int64_t)row * n_p;
            const int32_t *b = x;
            int32_t bzp = zp;
            if (!(kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0)) { /* pointwise: x itself */
                hq_patches(x, zp, c_in, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, hq, wq, phases, cols);
                b = cols;
                bzp = 0;
            }
            for (o = 0; o < c_out; o += HQ_TR) { /* HQ_TR rows of weights at a time, unpacked while in cache */
                int32_t rows = c_out - o < HQ_TR ? c_out - o : HQ_TR;
                hq_unpack_row(wt, (int64_t)o * row, rows * row, w4);
                hq_zero_rows(w4, rows, row);
                hq_gemm(w4, rows, row, b, n_p, bzp, n_p, bias ? bias + o : 0, 0, acc + (int64_t)o * n_p, n_p, 1,
                        tail);
            }
        } else { /* few pixels: lanes along the output channels, acc written transposed */
            int32_t *patches = t32, *blk = patches + (int64_t)HQ_ROWS(n_p) * row;
            for (oy = 0; oy < ho; ++oy) {
                for (ox = 0; ox < wo; ++ox) {
                    int32_t *pr = patches + (int64_t)(oy * wo + ox) * row;
                    for (ci = 0, l = 0; ci < c_in; ++ci) {
                        for (ky = 0; ky < kh; ++ky) {
                            int32_t iy = oy * sh - ph + ky * dh;
                            for (kx = 0; kx < kw; ++kx, ++l) {
                                int32_t ix = ox * sw - pw + kx * dw;
                                pr[l] = iy < 0 || iy >= h || ix < 0 || ix >= w
                                            ? 0 : x[((int64_t)ci * h + iy) * w + ix] - zp;
                            }
                        }
                    }
                }
            }
            hq_zero_rows(patches, n_p, row);
            hq_gemm_blocks(patches, n_p, row, wt, c_out, bias, acc, 1, n_p, blk);
        }
        return;
    }
    { /* grouped and depthwise: every tap reads the phases at a fixed offset, so the output plane is one flat
       * run (its rows wq apart; the wq - wo columns between them are computed and dropped): straight loops
       * that vectorise */
        int32_t nq = (ho - 1) * wq + wo;
        int32_t *phases = t32, *flat = phases + (int64_t)sh * sw * hq * wq, *wrow = flat + (int64_t)ho * wq;
        for (i = 0; i < sh * sw * hq * wq; ++i) phases[i] = 0;
        for (o = 0; o < c_out; ++o) {
            int32_t *plane = acc + (int64_t)o * n_p;
            int32_t b = bias ? bias[o] : 0;
            hq_unpack_row(wt, (int64_t)o * row, row, wrow);
            for (i = 0; i < nq; ++i) flat[i] = b;
            for (ci = 0; ci < cg; ++ci) {
                hq_phases(x + (int64_t)((o / og) * cg + ci) * h * w, zp, h, w, sh, sw, ph, pw, hq, wq, phases);
                for (ky = 0; ky < kh; ++ky) {
                    for (kx = 0; kx < kw; ++kx) {
                        int32_t wv = wrow[(ci * kh + ky) * kw + kx];
                        if (wv != 0) {
                            hq_axpy(flat, phases + ((int64_t)(ky * dh % sh * sw + kx * dw % sw) * hq
                                                    + ky * dh / sh) * wq + kx * dw / sw, wv, nq);
                        }
                    }
                }
            }
            for (oy = 0; oy < ho; ++oy) {
                for (ox = 0; ox < wo; ++ox) plane[oy * wo + ox] = flat[oy * wq + ox];
            }
        }
    }
}

void hq_linear(const int32_t *x, hq_param zp, int32_t rows, int32_t k, const hq_weights *wt, const int32_t *bias,
               int32_t n, int32_t *acc, void *temp) {
    /* wt: [k][n] in column blocks (hq_gemm_blocks). temp (int32): the centred inputs [HQ_ROWS(rows)][k], a block
     * of weights [k][HQ_TN], a tail [k][HQ_TN] */
    int32_t *xc = (int32_t *)temp, r, i;
    for (r = 0; r < rows; ++r) {
        for (i = 0; i < k; ++i) xc[(int64_t)r * k + i] = x[(int64_t)r * k + i] - HQ_P(zp, i);
    }
    hq_zero_rows(xc, rows, k);
    hq_gemm_blocks(xc, rows, k, wt, n, bias, acc, n, 1, xc + (int64_t)HQ_ROWS(rows) * k);
}

void hq_matmul(const int32_t *a, hq_param zpa, const int32_t *b, hq_param zpb, int32_t batch, int32_t m, int32_t k,
               int32_t n, int32_t *acc, void *temp) {
    /* temp (int32), per batch: a centred [HQ_ROWS(m)][k], b centred [k][n], a tail [k][HQ_TN] */
    int32_t *ac = (int32_t *)temp, *bc = ac + (int64_t)HQ_ROWS(m) * k, t, i, j, l;
    for (t = 0; t < batch; ++t) {
        const int32_t *at = a + (int64_t)t * m * k, *bt = b + (int64_t)t * k * n;
        for (i = 0; i < m; ++i) {
            for (l = 0; l < k; ++l) ac[(int64_t)i * k + l] = at[(int64_t)i * k + l] - HQ_P(zpa, l);
        }
        hq_zero_rows(ac, m, k);
        for (l = 0; l < k; ++l) {
            for (j = 0; j < n; ++j) bc[(int64_t)l * n + j] = bt[(int64_t)l * n + j] - HQ_P(zpb, j);
        }
        hq_gemm(ac, m, k, bc, n, 0, n, 0, 0, acc + (int64_t)t * m * n, n, 1, bc + (int64_t)k * n);
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

/* taps of one dim of a bilinear upsampling by f (half-pixel centres): sources and weights in units of 1/(2f) */
static void hq_bilinear_taps(int32_t o, int32_t n, int32_t f, int32_t *i0, int32_t *i1, int32_t *w0, int32_t *w1) {
    int32_t p = 2 * o + 1 - f;
    if (p < 0) p = 0;
    *i0 = p / (2 * f);
    *w1 = p - *i0 * 2 * f;
    *w0 = 2 * f - *w1;
    *i1 = *i0 + 1 < n ? *i0 + 1 : n - 1;
}

void hq_upsample_bilinear(const int32_t *x, int32_t zp, int32_t channels, int32_t h, int32_t w, int32_t fh,
                          int32_t fw, int32_t *acc) {
    int32_t c, oy, ox, ho = h * fh, wo = w * fw;
    for (c = 0; c < channels; ++c) {
        const int32_t *xc = x + (int64_t)c * h * w;
        for (oy = 0; oy < ho; ++oy) {
            int32_t y0, y1, a0, a1;
            hq_bilinear_taps(oy, h, fh, &y0, &y1, &a0, &a1);
            for (ox = 0; ox < wo; ++ox) {
                int32_t x0, x1, b0, b1;
                hq_bilinear_taps(ox, w, fw, &x0, &x1, &b0, &b1);
                acc[((int64_t)c * ho + oy) * wo + ox] =
                    a0 * (b0 * (xc[y0 * w + x0] - zp) + b1 * (xc[y0 * w + x1] - zp)) +
                    a1 * (b0 * (xc[y1 * w + x0] - zp) + b1 * (xc[y1 * w + x1] - zp));
            }
        }
    }
}

void hq_add_const(const int32_t *x, int32_t zp, const int32_t *v, int32_t count, int32_t *acc) {
    int32_t i;
    for (i = 0; i < count; ++i) acc[i] = x[i] - zp + v[i];
}

void hq_mul_bcast(const int32_t *a, int32_t zpa, const int32_t *b, int32_t zpb, int32_t outer, int32_t mid,
                  int32_t inner, int32_t *acc) {
    /* a [outer, mid, inner] times b [outer, 1, inner], broadcast along mid */
    int32_t o, m, i;
    for (o = 0; o < outer; ++o) {
        const int32_t *bo = b + (int64_t)o * inner;
        for (m = 0; m < mid; ++m) {
            int64_t base = ((int64_t)o * mid + m) * inner;
            for (i = 0; i < inner; ++i) acc[base + i] = (a[base + i] - zpa) * (bo[i] - zpb);
        }
    }
}

void hq_sum_axis(const int32_t *x, int32_t zp, int32_t outer, int32_t n, int32_t inner, int32_t *acc) {
    /* x [outer, n, inner] summed over n: acc [outer, inner] */
    int32_t o, k, i;
    for (o = 0; o < outer; ++o) {
        int32_t *ao = acc + (int64_t)o * inner;
        for (i = 0; i < inner; ++i) ao[i] = -n * zp;
        for (k = 0; k < n; ++k) {
            const int32_t *xk = x + ((int64_t)o * n + k) * inner;
            for (i = 0; i < inner; ++i) ao[i] += xk[i];
        }
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

/* one row of a LayerNorm or GroupNorm: ar holds its count centred, shifted values and receives its codes less
 * acc_zp; gamma_q/beta_q entries each cover run consecutive values (1: LayerNorm; positions: GroupNorm); the
 * squares are rounded down by sq_shift bits (even; 0 for LayerNorm) before their sum. Every intermediate in
 * int32 (the bounds are the program's width analysis). */
static void hq_norm_row(int32_t *ar, int32_t count, int32_t sq_shift, int32_t eps_q, const int32_t *gamma_q,
                        const int32_t *beta_q, int32_t run, int32_t out_shift, int32_t out_zp, int32_t out_qmin,
                        int32_t out_qmax, int32_t acc_zp) {
    int32_t sum = 0, mean, rem, v = 0, bits = 0, p, w, t, root, rec, frac, down, c, j, k;
    /* rows past HQ_LN_MAX_ROW values: the mean's fraction from rem and count shifted down by t (rem^2 and
     * rem * rec would leave int32; the rem^2 / count term, below one squared code per value, is 0), and the
     * normalised values keep extra fraction bits (their typical size falls as 2^15 / sqrt(count)) */
    int32_t fs = 0, extra = 0, short_count;
    while ((count >> fs) > HQ_LN_MAX_ROW) ++fs;
    short_count = count >> fs;
    if (fs > 0) {
        while (extra < 31 && (count >> (2 * extra + 2)) != 0) ++extra; /* floor(log2(count) / 2) */
        extra = extra > 4 ? extra - 4 : 0;
    }
    for (j = 0; j < count; ++j) sum += ar[j];
    mean = hq_floor_div32(sum, count);
    rem = sum - mean * count;
    for (j = 0; j < count; ++j) {
        ar[j] -= mean;
        v += hq_srr32(ar[j] * ar[j], sq_shift);
    }
    v = v - (fs == 0 ? hq_srr32(rem * rem / count, sq_shift) : 0) + hq_srr32(eps_q, sq_shift);
    while (bits < 31 && (v >> bits) != 0) ++bits;
    p = (31 - bits) / 2;
    if (p > HQ_LN_RECIPROCAL_BITS - HQ_LN_FRAC_BITS) p = HQ_LN_RECIPROCAL_BITS - HQ_LN_FRAC_BITS;
    w = v * (1 << (2 * p));
    t = hq_isqrt(w);
    root = t + (w - t * t > t ? 1 : 0);
    if (root < 1) root = 1;
    rec = (1 << (HQ_LN_RECIPROCAL_BITS - sq_shift / 2)) / root;
    frac = ((rem >> fs) * rec + short_count / 2) / short_count;
    down = HQ_LN_RECIPROCAL_BITS - HQ_LN_FRAC_BITS - extra - p;
    for (c = 0, j = 0; j < count; ++c) {
        for (k = 0; k < run; ++k, ++j) {
            int32_t n = hq_srr32(ar[j] * rec - frac, down);
            int32_t code = hq_srr32(n * gamma_q[c] + beta_q[c], out_shift) + out_zp;
            ar[j] = (code < out_qmin ? out_qmin : (code > out_qmax ? out_qmax : code)) - acc_zp;
        }
    }
}

void hq_layer_norm(const int32_t *x, int32_t rows, int32_t channels, int32_t in_zp, const int32_t *ptf_shift,
                   int32_t ptf_len, int32_t eps_q, const int32_t *gamma_q, const int32_t *beta_q, int32_t out_shift,
                   int32_t out_zp, int32_t out_qmin, int32_t out_qmax, int32_t acc_zp, int32_t *acc) {
    int32_t r, j;
    for (r = 0; r < rows; ++r) {
        const int32_t *xr = x + (int64_t)r * channels;
        int32_t *ar = acc + (int64_t)r * channels;
        for (j = 0; j < channels; ++j) ar[j] = (xr[j] - in_zp) * (1 << ptf_shift[ptf_len == 1 ? 0 : j]);
        hq_norm_row(ar, channels, 0, eps_q, gamma_q, beta_q, 1, out_shift, out_zp, out_qmin, out_qmax, acc_zp);
    }
}

void hq_group_norm(const int32_t *x, int32_t batch, int32_t groups, int32_t channels, int32_t positions,
                   int32_t in_zp, int32_t in_shift, int32_t sq_shift, int32_t eps_q, const int32_t *gamma_q, const int32_t *beta_q,
                   int32_t out_shift, int32_t out_zp, int32_t out_qmin, int32_t out_qmax, int32_t acc_zp,
                   int32_t *acc) {
    /* [B, C, positions] in rows of one group: C / groups channels at every position */
    int32_t per = channels / groups, count = per * positions, r, j;
    for (r = 0; r < batch * groups; ++r) {
        const int32_t *xr = x + (int64_t)r * count;
        int32_t *ar = acc + (int64_t)r * count;
        int32_t first = (r % groups) * per;
        for (j = 0; j < count; ++j) ar[j] = (xr[j] - in_zp) * (1 << in_shift);
        hq_norm_row(ar, count, sq_shift, eps_q, gamma_q + first, beta_q + first, positions, out_shift, out_zp,
                    out_qmin, out_qmax, acc_zp);
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
