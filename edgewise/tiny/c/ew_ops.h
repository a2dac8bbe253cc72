/* edgewise tiny training: the C twin of edgewise/tiny/int8_ops.py.
 *
 * Every kernel here computes exactly what the op of the same name in int8_ops.py computes: the same
 * integer arithmetic, the same fp32 operations in the same order (one rounded multiply and one
 * rounded add per term: compile with -ffp-contract=off), exp/log in double rounded once to float.
 * tests/test_tiny_codegen.py holds the two to bit-for-bit agreement.
 *
 * Layout: batch 1, channel-major. An activation [C][H][W] may be held whole (rows == H) or as a
 * ring buffer of `rows` rows per channel (a streamed conv chain): row r of channel c sits at
 * data + (c * rows + r % rows) * W. No kernel allocates memory; the generated model passes every
 * buffer at its planned arena offset.
 */
#ifndef EW_OPS_H
#define EW_OPS_H

#include <stdint.h>

typedef struct {
    int8_t *data;
    int c, h, w;  /* the whole tensor's shape */
    int rows;     /* rows held per channel: h (whole) or a ring's length */
} ew_act;

typedef struct {
    int cin, hin, win, cout, hout, wout, kh, kw, sh, sw, ph, pw, groups;
} ew_conv;

/* A conv weight [O][CG][KH][KW] whose first `c_trained` input channels are trained: those come from
 * `trained` ([O][c_trained][KH][KW], in RAM), the rest from `frozen` (the whole tensor, in flash). */
typedef struct {
    const int8_t *trained;
    const int8_t *frozen;
    int c_trained;
} ew_weight;

/* A gradient as its reader sees it (the planner's "computed where read"): a stored [C][H*W]
 * gradient, or a per-channel one broadcast over H*W and divided by hw_div (mean_hw_grad); then,
 * with a mask, zeroed where the fused clamp's int8 output clipped (relu_grad, relu6_grad). */
typedef struct {
    const float *g;
    int hw_div;
    const int8_t *mask;
    int32_t qmin, qmax;
} ew_grad;

/* Sub-LSB update rules (int8_ops.UPDATE_RULES). */
enum { EW_RULE_ROUND = 0, EW_RULE_STOCHASTIC = 1, EW_RULE_MASTER16 = 2, EW_RULE_MASTER32 = 3 };

/* The in-place QAS update of a trained tensor: int8 conv weight codes (with the rule), int32 bias
 * codes, or fp32 values (the classifier). `scale` and `qas` are per output channel. */
typedef struct {
    int8_t *q8;
    int32_t *q32;
    float *f32;
    const float *scale, *qas;
    float lr;
    int rule;
    int16_t *master16;
    float *master32;
    uint32_t seed, counter;
} ew_update;

float ew_round_half_away(float x);
float ew_uniform_hash(uint32_t seed, uint32_t counter, uint32_t index);

/* forward, int8 */
void ew_conv2d_int8(const ew_conv *cv, const ew_act *x, int32_t zx, const ew_weight *w, const int32_t *bias,
                    const float *multiplier, const ew_act *y, int32_t zy, int32_t qmin, int32_t qmax, int r0, int r1);
void ew_dwconv2d_int8_inplace(const ew_conv *cv, int8_t *buf, int8_t *scratch, int32_t zx, const ew_weight *w,
                              const int32_t *bias, const float *multiplier, int32_t zy, int32_t qmin, int32_t qmax);
void ew_add_int8(const ew_act *a, int32_t za, float ma, const ew_act *b, int32_t zb, float mb, const ew_act *y,
                 int32_t zy, int r0, int r1);
void ew_mean_hw_int8(const int8_t *x, int c, int hw, int32_t zx, float multiplier, int8_t *y, int32_t zy);
void ew_linear_f32(const int8_t *x, float sx, int32_t zx, int in, const float *w, const float *b, int out, float *y);
float ew_cross_entropy_f32(const float *logits, int n, int label);
void ew_cross_entropy_grad_f32(const float *logits, int n, int label, float *g);

/* A streamed chain of convs (each with its fused clamp), run row by row through ring buffers;
 * optionally closed by a residual add of the chain's input, also row by row. */
typedef struct {
    ew_conv cv;
    ew_weight w;
    const int32_t *bias;
    const float *multiplier;
    int32_t zx, zy, qmin, qmax;
    ew_act x, y;
    int done; /* output rows made so far */
} ew_chain_stage;

typedef struct {
    const ew_act *x; /* the chain's input, added to the last stage's output */
    int32_t zx, zb, zy;
    float mx, mb;
    ew_act y;
} ew_chain_add;

void ew_conv_chain(ew_chain_stage *stages, int n, const ew_chain_add *add);

/* backward, fp32 */
void ew_conv2d_grad_input_f32(const ew_conv *cv, const ew_grad *g, const ew_weight *w, const float *w_scale, float *dx);
void ew_conv2d_grad_weight_f32(const ew_conv *cv, const int8_t *x, int c_x, float sx, int32_t zx, const ew_grad *g,
                               int c_trained, float *out, const ew_update *u);
void ew_sum_positions_f32(const ew_grad *g, int c, int hw, float *out, const ew_update *u);
void ew_linear_grad_input_f32(const float *g, const float *w, int in, int out, float *dx);
void ew_linear_grad_weight_f32(const int8_t *x, float sx, int32_t zx, const float *g, int in, int out, float *dw,
                               const ew_update *u);
void ew_grad_store(const ew_grad *g, int c, int hw, float *out);
void ew_add_grad_f32(const ew_grad *a, const ew_grad *b, int c, int hw, float *y);
void ew_update_from(const float *grad, int n, int per_channel, const ew_update *u);

#endif
