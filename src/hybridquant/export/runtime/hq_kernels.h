/* hybridquant integer kernels: the C form of the exported program's contract (C99, no malloc, no floating
 * point). Every value is int32 codes or an int32 accumulator in a caller-owned buffer; the matrix products
 * (conv, linear, matmul) multiply tiles of HQ_TR rows of one operand by HQ_TN columns of the other into int32
 * sums whose vector lanes run along the columns (no horizontal sums), their operands centred and unpacked in a
 * caller-owned temp buffer; grouped and depthwise convs add tap by tap over a padded input plane split into
 * its stride phases, so no loop tests a bound. Softmax and LayerNorm compute in int32
 * throughout (one reciprocal per row, then multiplies and shifts); the exporter's width analysis proves every
 * intermediate fits. int64 remains only in index arithmetic and in the general
 * requantization paths (two-term and threshold), whose values the analysis also bounds.
 *
 * Rounding: round half up everywhere. srr(v, k) = floor((v + 2^(k-1)) / 2^k) for k > 0, v * 2^-k for k <= 0;
 * the reciprocals are floor divisions of a power of two. Saturation: codes are clamped to [qmin, qmax].
 * Shifts of negative values are written as multiplications and floor divisions by powers of two, so the
 * results do not depend on the compiler's choice for signed shifts. */
#ifndef HQ_KERNELS_H
#define HQ_KERNELS_H

#include <stdint.h>

/* A per-tensor (len 1) or per-channel (len = channels) parameter. */
typedef struct {
    const int32_t *v;
    int32_t len;
} hq_param;

enum { HQ_REQUANT_SHIFT = 0, HQ_REQUANT_TWO_TERM = 1, HQ_REQUANT_THRESHOLD = 2 };

/* The requantization of an accumulator (the contract's REQUANT_DOC). Element i has channel
 * (i / inner) % channels; per-channel parameters are indexed by it. */
typedef struct {
    int32_t mode;
    int32_t inner, channels;
    hq_param shift, a, b, sign, n, zero_point;
    int32_t qmin, qmax;
    const int32_t *thresholds;
    int32_t n_thresholds;
} hq_requant;

/* Weights: int8 codes (bits 8), or a bit stream of `bits`-bit fields, least significant bit first, sign-extended
 * when is_signed. */
typedef struct {
    const uint8_t *data;
    int32_t bits;
    int32_t is_signed;
} hq_weights;

/* A lookup table stored at its codes' width: `v` points to int8_t, uint8_t, int16_t, uint16_t or int32_t values. */
enum { HQ_I8 = 0, HQ_U8 = 1, HQ_I16 = 2, HQ_U16 = 3, HQ_I32 = 4 };
typedef struct {
    const void *v;
    int32_t type;
} hq_table;

/* the matrix products' tiles: HQ_TR rows of one operand by HQ_TN columns of the other; the row operand is
 * padded with zero rows to HQ_ROWS(m) */
#define HQ_TR 4
#define HQ_TN 16
#define HQ_ROWS(m) (((m) + HQ_TR - 1) / HQ_TR * HQ_TR)
/* the largest conv stride along a row (hq_conv2d) */
#define HQ_MAX_STRIDE 16
/* the reciprocals of softmax (2^30 / S) and LayerNorm (2^30 / r), and LayerNorm's normalised fraction bits */
#define HQ_SOFTMAX_RECIPROCAL_BITS 30
#define HQ_LN_RECIPROCAL_BITS 30
#define HQ_LN_FRAC_BITS 15
/* rows longer than this take the nearest mean and no fraction (rem^2 and rem * 2^30 / r leave int32) */
#define HQ_LN_MAX_ROW 46340

/* A strided view of a contiguous tensor (a layout op): out[i] = in[offset + sum_d idx_d(i) * stride_d]. */
#define HQ_MAX_DIMS 8
typedef struct {
    int32_t ndim;
    int32_t shape[HQ_MAX_DIMS];
    int32_t stride[HQ_MAX_DIMS];
    int32_t offset;
} hq_view;

int32_t hq_weight(const hq_weights *w, int32_t i);
void hq_unpack_row(const hq_weights *w, int64_t first, int32_t count, int32_t *out);
int64_t hq_srr(int64_t v, int32_t k);
int64_t hq_floor_shift(int64_t v, int32_t k);

void hq_requantize(const int32_t *acc, int32_t *out, int32_t count, const hq_requant *rq);
void hq_quantize_input(const uint8_t *pixels, int32_t channels, int32_t pixels_per_channel, const int32_t *table,
                       int32_t *out);
void hq_conv2d(const int32_t *x, int32_t zp, int32_t c_in, int32_t h, int32_t w, const hq_weights *wt,
               const int32_t *bias, int32_t c_out, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
               int32_t pw, int32_t dh, int32_t dw, int32_t groups, int32_t ho, int32_t wo, int32_t *acc,
               void *temp);
void hq_linear(const int32_t *x, hq_param zp, int32_t rows, int32_t k, const hq_weights *wt, const int32_t *bias,
               int32_t n, int32_t *acc, void *temp);
void hq_matmul(const int32_t *a, hq_param zpa, const int32_t *b, hq_param zpb, int32_t batch, int32_t m, int32_t k,
               int32_t n, int32_t *acc, void *temp);
void hq_center_shift(const int32_t *x, hq_param zp, int32_t count, int32_t last, hq_param shift, int32_t *out);
void hq_add(const int32_t *a, hq_param zpa, hq_param sa, const int32_t *b, hq_param zpb, hq_param sb,
            int32_t count, int32_t last, int32_t *acc);
void hq_cat_part(const int32_t *x, hq_param zp, hq_param shift, int32_t outer, int32_t part, int32_t last,
                 int32_t out_row, int32_t out_offset, int32_t *acc);
void hq_mul(const int32_t *a, hq_param zpa, const int32_t *b, hq_param zpb, int32_t count, int32_t last,
            int32_t *acc);
void hq_upsample_bilinear(const int32_t *x, int32_t zp, int32_t channels, int32_t h, int32_t w, int32_t fh,
                          int32_t fw, int32_t *acc);
void hq_add_const(const int32_t *x, int32_t zp, const int32_t *v, int32_t count, int32_t *acc);
void hq_mul_bcast(const int32_t *a, int32_t zpa, const int32_t *b, int32_t zpb, int32_t outer, int32_t mid,
                  int32_t inner, int32_t *acc);
void hq_sum_axis(const int32_t *x, int32_t zp, int32_t outer, int32_t n, int32_t inner, int32_t *acc);
void hq_lut(const int32_t *x, int32_t count, hq_table table, int32_t in_qmin, int32_t acc_zp, int32_t *acc);
void hq_channel_lut(const int32_t *x, int32_t count, int32_t inner, int32_t channels, hq_table table,
                    int32_t size, int32_t in_qmin, int32_t acc_zp, int32_t *acc);
void hq_softmax(const int32_t *x, int32_t outer, int32_t len, int32_t inner, const int32_t *exp_table,
                int32_t table_size, int32_t out_exp, int32_t out_qmax, int32_t acc_zp, int32_t *acc);
void hq_layer_norm(const int32_t *x, int32_t rows, int32_t channels, int32_t in_zp, const int32_t *ptf_shift,
                   int32_t ptf_len, int32_t eps_q, const int32_t *gamma_q, const int32_t *beta_q, int32_t out_shift,
                   int32_t out_zp, int32_t out_qmin, int32_t out_qmax, int32_t acc_zp, int32_t *acc);
void hq_group_norm(const int32_t *x, int32_t batch, int32_t groups, int32_t channels, int32_t positions,
                   int32_t in_zp, int32_t in_shift, int32_t sq_shift, int32_t eps_q, const int32_t *gamma_q, const int32_t *beta_q,
                   int32_t out_shift, int32_t out_zp, int32_t out_qmin, int32_t out_qmax, int32_t acc_zp,
                   int32_t *acc);
void hq_view_copy(const int32_t *in, const hq_view *v, int32_t *out);
int32_t hq_isqrt(int32_t v);

#endif
