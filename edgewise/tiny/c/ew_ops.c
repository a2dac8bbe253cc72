/* edgewise tiny training kernels: see ew_ops.h. Each function names the int8_ops.py op it mirrors. */
#include "ew_ops.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

/* int8_ops.round_half_away: sign(x) * floor(|x| + 0.5) in fp32 (not roundf, which differs when
 * |x| + 0.5 rounds up to the next integer, e.g. x = 0.49999997f) */
float ew_round_half_away(float x)
{
    float r = floorf(fabsf(x) + 0.5f);
    return x < 0.0f ? -r : r;
}

/* int8_ops.uniform_hash: lowbias32 (Chris Wellons) of seed * 0x9E3779B9 + counter * 0x85EBCA6B + index,
 * top 24 bits / 2^24 */
float ew_uniform_hash(uint32_t seed, uint32_t counter, uint32_t index)
{
    uint32_t x = index + (seed * 0x9E3779B9u + counter * 0x85EBCA6Bu);
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return (float)(x >> 8) * 0x1p-24f;
}

/* int8_ops.requantize, one element: round(float(acc) * m) + z, clamped, in fp32 */
static int8_t requantize(int32_t acc, float m, int32_t z, int32_t qmin, int32_t qmax)
{
    float v = ew_round_half_away((float)acc * m) + (float)z;
    if (v < (float)qmin) v = (float)qmin;
    if (v > (float)qmax) v = (float)qmax;
    return (int8_t)v;
}

static const int8_t *act_row(const ew_act *a, int c, int r)
{
    return a->data + ((size_t)c * a->rows + r % a->rows) * a->w;
}

static const int8_t *weight_taps(const ew_conv *cv, const ew_weight *w, int o, int ci)
{
    int cg = cv->cin / cv->groups, taps = cv->kh * cv->kw;
    if (ci < w->c_trained) return w->trained + ((size_t)o * w->c_trained + ci) * taps;
    return w->frozen + ((size_t)o * cg + ci) * taps;
}

/* [lo, hi) of output columns whose input column col * s - p + k lies inside [0, n) */
static void valid_cols(int n_out, int n_in, int s, int p, int k, int *lo, int *hi)
{
    int a = p - k, b = n_in - 1 + p - k;
    *lo = a > 0 ? (a + s - 1) / s : 0;
    *hi = b < 0 ? 0 : b / s + 1;
    if (*hi > n_out) *hi = n_out;
}

/* int8_ops.conv2d_int8 for output rows [r0, r1): exact integer sums of (x - zx) * w plus the bias
 * (integer sums, so their order is free), wrapped to int32 as the reference's int64 -> int32 cast
 * does (unsigned arithmetic: no undefined overflow), requantized per output channel. Columns go in tiles of
 * EW_COL_TILE, which bounds the accumulator row on the stack. */
#define EW_COL_TILE 256
#define EW_POINTWISE_CIN 1024

/* A pointwise conv (1x1, stride 1, no padding, groups 1), one output column at a time: the
 * column's shifted inputs are gathered once, then each output channel is one contiguous dot
 * product with its weight row (the trained channels' row in RAM, then the frozen rest in flash). */
static void pointwise_int8(const ew_conv *cv, const ew_act *x, int32_t zx, const ew_weight *w, const int32_t *bias,
                           const float *multiplier, const ew_act *y, int32_t zy, int32_t qmin, int32_t qmax, int r0, int r1)
{
    int16_t col_in[EW_POINTWISE_CIN];
    int cin = cv->cin, ct = w->c_trained;
    size_t x_stride = (size_t)x->rows * x->w, y_stride = (size_t)y->rows * y->w;
    for (int r = r0; r < r1; r++) {
        const int8_t *xr = x->data + (size_t)(r % x->rows) * x->w;
        int8_t *yr = y->data + (size_t)(r % y->rows) * y->w;
        for (int col = 0; col < cv->wout; col++) {
            for (int ci = 0; ci < cin; ci++) col_in[ci] = (int16_t)((int32_t)xr[ci * x_stride + col] - zx);
            for (int o = 0; o < cv->cout; o++) {
                uint32_t acc = (uint32_t)bias[o];
                const int8_t *wt = w->trained + (size_t)o * ct, *wf = w->frozen + (size_t)o * cin;
                for (int ci = 0; ci < ct; ci++) acc += (uint32_t)((int32_t)col_in[ci] * wt[ci]);
                for (int ci = ct; ci < cin; ci++) acc += (uint32_t)((int32_t)col_in[ci] * wf[ci]);
                yr[o * y_stride + col] = requantize((int32_t)acc, multiplier[o], zy, qmin, qmax);
            }
        }
    }
}

void ew_conv2d_int8(const ew_conv *cv, const ew_act *x, int32_t zx, const ew_weight *w, const int32_t *bias,
                    const float *multiplier, const ew_act *y, int32_t zy, int32_t qmin, int32_t qmax, int r0, int r1)
{
    int cg = cv->cin / cv->groups, og = cv->cout / cv->groups;
    if (cv->kh == 1 && cv->kw == 1 && cv->sh == 1 && cv->sw == 1 && cv->ph == 0 && cv->pw == 0 && cv->groups == 1 &&
        cv->cin <= EW_POINTWISE_CIN) {
        pointwise_int8(cv, x, zx, w, bias, multiplier, y, zy, qmin, qmax, r0, r1);
        return;
    }
    uint32_t acc[EW_COL_TILE];
    for (int r = r0; r < r1; r++)
        for (int o = 0; o < cv->cout; o++) {
            int g = o / og;
            int8_t *yr = (int8_t *)act_row(y, o, r);
            for (int c0 = 0; c0 < cv->wout; c0 += EW_COL_TILE) {
                int c1 = c0 + EW_COL_TILE < cv->wout ? c0 + EW_COL_TILE : cv->wout;
                for (int col = c0; col < c1; col++) acc[col - c0] = (uint32_t)bias[o];
                for (int ci = 0; ci < cg; ci++) {
                    const int8_t *taps = weight_taps(cv, w, o, ci);
                    for (int ki = 0; ki < cv->kh; ki++) {
                        int ih = r * cv->sh - cv->ph + ki;
                        if (ih < 0 || ih >= cv->hin) continue;
                        const int8_t *xr = act_row(x, g * cg + ci, ih);
                        for (int kj = 0; kj < cv->kw; kj++) {
                            int32_t wv = taps[ki * cv->kw + kj];
                            int lo, hi, off = kj - cv->pw;
                            valid_cols(cv->wout, cv->win, cv->sw, cv->pw, kj, &lo, &hi);
                            if (lo < c0) lo = c0;
                            if (hi > c1) hi = c1;
                            uint32_t *a = acc - c0;
                            if (cv->sw == 1) {
                                const int8_t *xp = xr + off;
                                for (int col = lo; col < hi; col++) a[col] += (uint32_t)(((int32_t)xp[col] - zx) * wv);
                            } else {
                                for (int col = lo; col < hi; col++) a[col] += (uint32_t)(((int32_t)xr[col * cv->sw + off] - zx) * wv);
                            }
                        }
                    }
                }
                for (int col = c0; col < c1; col++) yr[col] = requantize((int32_t)acc[col - c0], multiplier[o], zy, qmin, qmax);
            }
        }
}

/* A depthwise conv writing its output over its input, channel by channel: each input channel is
 * first copied, padded with its zero point (real 0), into a one-channel scratch buffer. */
void ew_dwconv2d_int8_inplace(const ew_conv *cv, int8_t *buf, int8_t *scratch, int32_t zx, const ew_weight *w,
                              const int32_t *bias, const float *multiplier, int32_t zy, int32_t qmin, int32_t qmax)
{
    int hp = cv->hin + 2 * cv->ph, wp = cv->win + 2 * cv->pw;
    ew_conv one = *cv;
    one.cin = one.cout = one.groups = 1;
    one.hin = hp, one.win = wp, one.ph = one.pw = 0;
    for (int c = 0; c < cv->cin; c++) {
        memset(scratch, (int)(int8_t)zx, (size_t)hp * wp);
        for (int r = 0; r < cv->hin; r++)
            memcpy(scratch + (size_t)(r + cv->ph) * wp + cv->pw, buf + ((size_t)c * cv->hin + r) * cv->win, (size_t)cv->win);
        ew_weight wc = {w->trained ? w->trained + (size_t)c * cv->kh * cv->kw : 0, w->frozen + (size_t)c * cv->kh * cv->kw, w->c_trained};
        ew_act xs = {scratch, 1, hp, wp, hp};
        ew_act ys = {buf + (size_t)c * cv->hout * cv->wout, 1, cv->hout, cv->wout, cv->hout};
        ew_conv2d_int8(&one, &xs, zx, &wc, bias + c, multiplier + c, &ys, zy, qmin, qmax, 0, cv->hout);
    }
}

/* int8_ops.add_int8 for rows [r0, r1): each input rescaled in fp32, summed, rounded once */
void ew_add_int8(const ew_act *a, int32_t za, float ma, const ew_act *b, int32_t zb, float mb, const ew_act *y,
                 int32_t zy, int r0, int r1)
{
    for (int c = 0; c < y->c; c++)
        for (int r = r0; r < r1; r++) {
            const int8_t *ar = act_row(a, c, r), *br = act_row(b, c, r);
            int8_t *yr = (int8_t *)act_row(y, c, r);
            for (int i = 0; i < y->w; i++) {
                float fa = (float)((int32_t)ar[i] - za) * ma, fb = (float)((int32_t)br[i] - zb) * mb;
                float v = ew_round_half_away(fa + fb) + (float)zy;
                if (v < -128.0f) v = -128.0f;
                if (v > 127.0f) v = 127.0f;
                yr[i] = (int8_t)v;
            }
        }
}

/* int8_ops.mean_hw_int8 */
void ew_mean_hw_int8(const int8_t *x, int c, int hw, int32_t zx, float multiplier, int8_t *y, int32_t zy)
{
    for (int ch = 0; ch < c; ch++) {
        int32_t acc = 0; /* |sum| <= 255 * hw: no overflow */
        for (int i = 0; i < hw; i++) acc += (int32_t)x[(size_t)ch * hw + i] - zx;
        y[ch] = requantize(acc, multiplier, zy, -128, 127);
    }
}

static float dequantize(int8_t q, float s, int32_t z) { return (float)((int32_t)q - z) * s; }

/* int8_ops.linear_f32 on dequantized int8 features: the bias, then each input feature in order */
void ew_linear_f32(const int8_t *x, float sx, int32_t zx, int in, const float *w, const float *b, int out, float *y)
{
    for (int o = 0; o < out; o++) {
        float acc = b[o];
        for (int i = 0; i < in; i++) acc += dequantize(x[i], sx, zx) * w[(size_t)o * in + i];
        y[o] = acc;
    }
}

/* int8_ops._softmax_f64: logits shifted by their max, in double; the sum of exponentials in order */
static double softmax_total(const float *logits, int n, double *max)
{
    *max = (double)logits[0];
    for (int k = 1; k < n; k++)
        if ((double)logits[k] > *max) *max = (double)logits[k];
    double total = 0.0;
    for (int k = 0; k < n; k++) total += exp((double)logits[k] - *max);
    return total;
}

float ew_cross_entropy_f32(const float *logits, int n, int label)
{
    double max, total = softmax_total(logits, n, &max);
    double nll = log(total) - ((double)logits[label] - max);
    return (float)((0.0 + nll) / 1.0);
}

void ew_cross_entropy_grad_f32(const float *logits, int n, int label, float *g)
{
    double max, total = softmax_total(logits, n, &max);
    for (int k = 0; k < n; k++) {
        float p = (float)(exp((double)logits[k] - max) / total);
        g[k] = (p - (k == label ? 1.0f : 0.0f)) / 1.0f;
    }
}

/* Rows are made on demand: row r of stage k first makes the rows of stage k - 1 it reads that do
 * not exist yet, so each ring holds exactly the rows its reader needs. */
static void chain_row(ew_chain_stage *s, int k, int r)
{
    if (k > 0) {
        int hi = r * s[k].cv.sh - s[k].cv.ph + s[k].cv.kh - 1;
        if (hi > s[k].cv.hin - 1) hi = s[k].cv.hin - 1;
        while (s[k - 1].done <= hi) {
            chain_row(s, k - 1, s[k - 1].done);
            s[k - 1].done++;
        }
    }
    ew_conv2d_int8(&s[k].cv, &s[k].x, s[k].zx, &s[k].w, s[k].bias, s[k].multiplier, &s[k].y, s[k].zy, s[k].qmin,
                   s[k].qmax, r, r + 1);
}

void ew_conv_chain(ew_chain_stage *stages, int n, const ew_chain_add *add)
{
    for (int k = 0; k < n; k++) stages[k].done = 0;
    ew_chain_stage *last = &stages[n - 1];
    for (int r = 0; r < last->cv.hout; r++) {
        chain_row(stages, n - 1, r);
        if (add) ew_add_int8(add->x, add->zx, add->mx, &last->y, add->zb, add->mb, &add->y, add->zy, r, r + 1);
    }
}

/* ---- backward ---------------------------------------------------------------------------- */

static float grad_at(const ew_grad *g, int c, int i, int hw)
{
    float v = g->hw_div ? g->g[c] / (float)g->hw_div : g->g[(size_t)c * hw + i];
    if (g->mask) {
        int32_t q = g->mask[(size_t)c * hw + i];
        if (!(q > g->qmin && q < g->qmax)) v = 0.0f;
    }
    return v;
}

/* acc[i] += grad(c, start + i) * wv for i < n: grad_at over a contiguous run, without its per-element tests */
static void add_grad_run(const ew_grad *g, int c, int start, int hw, int n, float wv, float *acc)
{
    if (g->hw_div) {
        for (int i = 0; i < n; i++) acc[i] += grad_at(g, c, start + i, hw) * wv;
        return;
    }
    const float *gp = g->g + (size_t)c * hw + start;
    if (!g->mask) {
        for (int i = 0; i < n; i++) acc[i] += gp[i] * wv;
        return;
    }
    const int8_t *mp = g->mask + (size_t)c * hw + start;
    for (int i = 0; i < n; i++) {
        int32_t q = mp[i];
        acc[i] += (q > g->qmin && q < g->qmax ? gp[i] : 0.0f) * wv;
    }
}

static void update_at(const ew_update *u, int idx, int o, float grad)
{
    if (u->f32) { /* the fp32 classifier: p - g * lr */
        u->f32[idx] = u->f32[idx] - grad * u->lr;
        return;
    }
    float step = ((grad * u->scale[o]) * u->qas[o]) * u->lr; /* int8_ops.code_step */
    if (u->q32) {                                            /* int8_ops.update_int32_bias */
        float r = ew_round_half_away(step);
        if (r > 0x1p62f) r = 0x1p62f;
        if (r < -0x1p62f) r = -0x1p62f;
        int64_t v = (int64_t)u->q32[idx] - (int64_t)r;
        u->q32[idx] = (int32_t)(v > INT32_MAX ? INT32_MAX : v < INT32_MIN ? INT32_MIN : v);
        return;
    }
    float q = (float)u->q8[idx], nv; /* int8_ops.update_int8_weight */
    if (u->rule == EW_RULE_ROUND) {
        nv = q - ew_round_half_away(step);
    } else if (u->rule == EW_RULE_STOCHASTIC) {
        nv = q - floorf(step + ew_uniform_hash(u->seed, u->counter, (uint32_t)idx));
    } else if (u->rule == EW_RULE_MASTER16) {
        float d = ew_round_half_away(step * 256.0f);
        if (d > 0x1p24f) d = 0x1p24f;
        if (d < -0x1p24f) d = -0x1p24f;
        int32_t m = (int32_t)u->master16[idx] - (int32_t)d;
        if (m > 127 * 256) m = 127 * 256;
        if (m < -127 * 256) m = -127 * 256;
        u->master16[idx] = (int16_t)m;
        nv = ew_round_half_away((float)m * 0x1p-8f);
    } else {
        float m = u->master32[idx] - step;
        if (m < -127.0f) m = -127.0f;
        if (m > 127.0f) m = 127.0f;
        u->master32[idx] = m;
        nv = ew_round_half_away(m);
    }
    if (nv < -127.0f) nv = -127.0f;
    if (nv > 127.0f) nv = 127.0f;
    u->q8[idx] = (int8_t)nv;
}

/* int8_ops.conv2d_grad_input_f32: each input element adds its terms in the order (output channel
 * of its group, kernel row, kernel column), from 0, one multiply and one add per term */
void ew_conv2d_grad_input_f32(const ew_conv *cv, const ew_grad *g, const ew_weight *w, const float *w_scale, float *dx)
{
    int cg = cv->cin / cv->groups, og = cv->cout / cv->groups, hw_out = cv->hout * cv->wout;
    for (int ch = 0; ch < cv->cin; ch++) {
        int gi = ch / cg, ci = ch % cg;
        for (int ih = 0; ih < cv->hin; ih++) {
            float *acc = dx + ((size_t)ch * cv->hin + ih) * cv->win;
            for (int iw = 0; iw < cv->win; iw++) acc[iw] = 0.0f;
            for (int j = 0; j < og; j++) {
                int o = gi * og + j;
                const int8_t *taps = weight_taps(cv, w, o, ci);
                for (int ki = 0; ki < cv->kh; ki++) {
                    int t = ih + cv->ph - ki;
                    if (t < 0 || t % cv->sh) continue;
                    int oh = t / cv->sh;
                    if (oh >= cv->hout) continue;
                    for (int kj = 0; kj < cv->kw; kj++) {
                        float wv = (float)taps[ki * cv->kw + kj] * w_scale[o]; /* int8_ops.dequantize_weight */
                        const int row = oh * cv->wout;
                        if (cv->sw == 1) { /* ow = iw + pw - kj */
                            int lo = kj - cv->pw > 0 ? kj - cv->pw : 0, hi = cv->wout + kj - cv->pw;
                            if (hi > cv->win) hi = cv->win;
                            add_grad_run(g, o, row + lo + cv->pw - kj, hw_out, hi - lo, wv, acc + lo);
                            continue;
                        }
                        for (int iw = 0; iw < cv->win; iw++) {
                            int u = iw + cv->pw - kj;
                            if (u < 0 || u % cv->sw) continue;
                            int ow = u / cv->sw;
                            if (ow >= cv->wout) continue;
                            acc[iw] += grad_at(g, o, row + ow, hw_out) * wv;
                        }
                    }
                }
            }
        }
    }
}

/* int8_ops.conv2d_grad_weight_f32 from the real input x (its first c_x channels): terms in
 * (output row, output column) order; each element is stored to `out` or applied by `u` at once */
void ew_conv2d_grad_weight_f32(const ew_conv *cv, const int8_t *x, int c_x, float sx, int32_t zx, const ew_grad *g,
                               int c_trained, float *out, const ew_update *u)
{
    int cg = cv->cin / cv->groups, og = cv->cout / cv->groups, hw_out = cv->hout * cv->wout;
    (void)c_x;
    for (int o = 0; o < cv->cout; o++) {
        int gi = o / og;
        for (int ci = 0; ci < c_trained; ci++) {
            const int8_t *xc = x + (size_t)(gi * cg + ci) * cv->hin * cv->win;
            for (int ki = 0; ki < cv->kh; ki++)
                for (int kj = 0; kj < cv->kw; kj++) {
                    float acc = 0.0f;
                    for (int oh = 0; oh < cv->hout; oh++) {
                        int ih = oh * cv->sh - cv->ph + ki;
                        if (ih < 0 || ih >= cv->hin) continue; /* zero padding adds +-0: nothing */
                        for (int ow = 0; ow < cv->wout; ow++) {
                            int iw = ow * cv->sw - cv->pw + kj;
                            if (iw < 0 || iw >= cv->win) continue;
                            acc += grad_at(g, o, oh * cv->wout + ow, hw_out) * dequantize(xc[(size_t)ih * cv->win + iw], sx, zx);
                        }
                    }
                    int idx = ((o * c_trained + ci) * cv->kh + ki) * cv->kw + kj;
                    if (out) out[idx] = acc;
                    else update_at(u, idx, o, acc);
                }
        }
    }
}

/* int8_ops.sum_positions_f32 (a bias gradient), stored or applied at once */
void ew_sum_positions_f32(const ew_grad *g, int c, int hw, float *out, const ew_update *u)
{
    for (int ch = 0; ch < c; ch++) {
        float acc = 0.0f;
        for (int i = 0; i < hw; i++) acc += grad_at(g, ch, i, hw);
        if (out) out[ch] = acc;
        else update_at(u, ch, ch, acc);
    }
}

/* int8_ops.linear_grad_input_f32: terms in output-feature order */
void ew_linear_grad_input_f32(const float *g, const float *w, int in, int out, float *dx)
{
    for (int i = 0; i < in; i++) {
        float acc = 0.0f;
        for (int k = 0; k < out; k++) acc += g[k] * w[(size_t)k * in + i];
        dx[i] = acc;
    }
}

/* int8_ops.linear_grad_weight_f32 (batch 1: 0 + g * x), stored or applied at once */
void ew_linear_grad_weight_f32(const int8_t *x, float sx, int32_t zx, const float *g, int in, int out, float *dw,
                               const ew_update *u)
{
    for (int o = 0; o < out; o++)
        for (int i = 0; i < in; i++) {
            float acc = 0.0f;
            acc += g[o] * dequantize(x[i], sx, zx);
            int idx = o * in + i;
            if (dw) dw[idx] = acc;
            else update_at(u, idx, o, acc);
        }
}

/* materialize a gradient as its reader sees it (mean_hw_grad, relu_grad when they are stored) */
void ew_grad_store(const ew_grad *g, int c, int hw, float *out)
{
    for (int ch = 0; ch < c; ch++)
        for (int i = 0; i < hw; i++) out[(size_t)ch * hw + i] = grad_at(g, ch, i, hw);
}

/* the sum of two gradient contributions of one value (may write over either) */
void ew_add_grad_f32(const ew_grad *a, const ew_grad *b, int c, int hw, float *y)
{
    for (int ch = 0; ch < c; ch++)
        for (int i = 0; i < hw; i++) y[(size_t)ch * hw + i] = grad_at(a, ch, i, hw) + grad_at(b, ch, i, hw);
}

/* sgd_update from a stored gradient: element idx belongs to output channel idx / per_channel */
void ew_update_from(const float *grad, int n, int per_channel, const ew_update *u)
{
    for (int i = 0; i < n; i++) update_at(u, i, i / per_channel, grad[i]);
}
