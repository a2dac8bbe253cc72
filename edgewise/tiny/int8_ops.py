"""The one definition of each int8 op: the reference executor runs these, and the C generator will
emit the same arithmetic (same rounding, same fp32 operation order).

Conventions (TFLite/TinyEngine style):
- an int8 tensor q with scale s and zero point z stands for s * (q - z), q in [-128, 127];
- weights are symmetric per output channel (zero point 0, codes in [-127, 127]);
- accumulators are exact int32 sums of (q_x - z_x) * q_w plus an int32 bias quantized with
  scale s_x * s_w[o]; integer convolutions run as float64 convolutions of integer-valued
  tensors, exact because every partial sum stays far below 2**53;
- requantization is fp32: `float(acc) * multiplier` with the fp32 multiplier s_x * s_w / s_y
  precomputed, rounded half away from zero (C's roundf), plus z_y, clamped (ReLU and ReLU6 are
  this clamp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QMIN, QMAX = -128, 127


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: ties go away from zero (torch.round would send them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: int, qmin: int = QMIN, qmax: int = QMAX) -> torch.Tensor:
    """int32 accumulators [N, C, ...] -> int8, with an fp32 multiplier per channel (dim 1) or a scalar one."""
    m = multiplier.to(torch.float32)
    if m.dim() == 1:
        m = m.view(1, -1, *([1] * (acc.dim() - 2)))
    scaled = acc.to(torch.float32) * m  # one fp32 multiply, as in C
    return (round_half_away(scaled) + zero_point).clamp(qmin, qmax).to(torch.int8)


EXACT_F32_TERMS = 512  # products of int8 codes (|x - z_x| <= 255, |w| <= 127): 512 of them sum below 2**24


def conv2d_int32(x: torch.Tensor, q_w: torch.Tensor, stride, padding, groups: int) -> torch.Tensor:
    """The exact integer convolution of zero-point-shifted codes x (integers, any dtype) with int8
    weights, as int64. It runs as fp32 matrix products over chunks of at most EXACT_F32_TERMS
    products, where every partial sum is an integer below 2**24 and so exact in any order."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = q_w.shape
    x, w = x.to(torch.float32), q_w.to(torch.float32)
    if (kh, kw) == (1, 1) and tuple(padding) == (0, 0):
        x = x[:, :, :: stride[0], :: stride[1]]
        ho, wo = x.shape[2:]
        patches = x.reshape(n, groups, cg, ho * wo)
    else:
        ho, wo = ((h + 2 * padding[0] - kh) // stride[0] + 1, (wd + 2 * padding[1] - kw) // stride[1] + 1)
        patches = F.unfold(x, (kh, kw), padding=padding, stride=stride).view(n, groups, cg * kh * kw, ho * wo)
    w = w.view(groups, o // groups, cg * kh * kw)
    k = patches.shape[2]
    if groups == c and o == c:  # depthwise: kh * kw products per output, elementwise
        acc = (patches * w.view(1, groups, k, 1)).sum(2).to(torch.int64)
        return acc.view(n, o, ho, wo)
    acc = torch.zeros(n, groups, o // groups, ho * wo, dtype=torch.int64)
    for lo in range(0, k, EXACT_F32_TERMS):
        hi = min(k, lo + EXACT_F32_TERMS)
        acc += torch.matmul(w[None, :, :, lo:hi], patches[:, :, lo:hi]).to(torch.int64)
    return acc.view(n, o, ho, wo)


def conv2d_int8(q_x, z_x: int, q_w, bias_i32, stride, padding, groups: int, multiplier, z_y: int, qmin: int = QMIN, qmax: int = QMAX) -> torch.Tensor:
    """int8 conv: exact int32 accumulation of (q_x - z_x) * q_w + bias, then requantize to int8.
    Padding is with real zeros, i.e. z_x in the quantized domain (done by shifting first)."""
    acc = conv2d_int32(q_x.to(torch.int32) - z_x, q_w, stride, padding, groups) + bias_i32.to(torch.int64).view(1, -1, 1, 1)
    return requantize(acc.to(torch.int32), multiplier, z_y, qmin, qmax)


def add_int8(q_a, z_a: int, m_a: float, q_b, z_b: int, m_b: float, z_y: int, qmin: int = QMIN, qmax: int = QMAX) -> torch.Tensor:
    """int8 residual add: each input rescaled to the output scale in fp32 (m = s_in / s_y), summed, rounded once."""
    a = (q_a.to(torch.int32) - z_a).to(torch.float32) * torch.tensor(m_a, dtype=torch.float32)
    b = (q_b.to(torch.int32) - z_b).to(torch.float32) * torch.tensor(m_b, dtype=torch.float32)
    return (round_half_away(a + b) + z_y).clamp(qmin, qmax).to(torch.int8)


def mean_hw_int8(q_x, z_x: int, multiplier: float, z_y: int) -> torch.Tensor:
    """Global average pooling: the int32 sum of (q - z) over H, W, times s_x / (H * W * s_y) in fp32."""
    acc = (q_x.to(torch.int32) - z_x).sum((2, 3), dtype=torch.int32)
    return requantize(acc, torch.tensor(multiplier, dtype=torch.float32), z_y)


def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.to(torch.int32) - zero_point).to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


def quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (round_half_away(x.to(torch.float32) / torch.tensor(scale, dtype=torch.float32)) + zero_point).clamp(QMIN, QMAX).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# The int8 training step's backward and update (the paper's real quantized graph).
#
# Gradients are fp32 values of dL/d(real tensor), as in TTE: the forward is int8, the backward
# reads int8 activations and weights (dequantized per element) and keeps fp32 gradients. So that
# the C backend can match the reference bit for bit, every fp32 reduction here runs in one stated
# order, one rounded multiply and one rounded add per term (C: `acc += a * b` with
# -ffp-contract=off); elementwise ops are single IEEE operations; exp/log run in float64 and are
# rounded to fp32 once.
# ---------------------------------------------------------------------------------------------

F32 = torch.float32


def dequantize_weight(q_w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Real conv weights from int8 codes and a per-output-channel scale: one fp32 multiply each."""
    return q_w.to(F32) * scale.to(F32).view(-1, *([1] * (q_w.dim() - 1)))


def conv2d_grad_input_f32(g: torch.Tensor, w: torch.Tensor, stride, padding, groups: int, input_shape) -> torch.Tensor:
    """dL/dx of a conv, fp32. Terms are added to each input element in the order
    (output channel of its group, kernel row, kernel column)."""
    n, c, h, wd = input_shape
    o, cg, kh, kw = w.shape
    og = o // groups
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = g.shape[2:]
    acc = torch.zeros(n, c, h + 2 * ph + sh, wd + 2 * pw + sw, dtype=F32)  # padded, room for the last stride
    if (kh, kw, sh, sw, groups) == (1, 1, 1, 1, 1):  # pointwise: the same order, without the strided views
        acc, term = torch.zeros(n, c, h, wd, dtype=F32), torch.empty(n, c, h, wd, dtype=F32)
        for g_j, w_j in zip(g.unsqueeze(2).unbind(1), w.reshape(o, 1, c, 1, 1).unbind(0)):
            torch.mul(g_j, w_j, out=term)
            acc.add_(term)
        return acc
    for j in range(og):  # output channel j of every group at once: one term per input element
        g_j = g[:, j::og]  # [N, groups, Ho, Wo]
        for ki in range(kh):
            for kj in range(kw):
                w_j = w[j::og, :, ki, kj]  # [groups, C/groups]
                term = g_j[:, :, None] * w_j[None, :, :, None, None]  # [N, groups, C/groups, Ho, Wo]
                rows, cols = slice(ki, ki + sh * ho, sh), slice(kj, kj + sw * wo, sw)
                acc[:, :, rows, cols] += term.reshape(n, c, ho, wo)
    return acc[:, :, ph : ph + h, pw : pw + wd].contiguous()


def conv2d_grad_weight_f32(x: torch.Tensor, g: torch.Tensor, stride, padding, groups: int, weight_shape) -> torch.Tensor:
    """dL/dw of a conv, fp32, from the real input x (its first C channels for a partial weight).
    Terms are added in the order (batch, output row, output column)."""
    o, cg, kh, kw = weight_shape
    n = x.shape[0]
    patches = F.unfold(x, (kh, kw), padding=padding, stride=stride).view(n, groups, cg * kh * kw, -1)  # zero padding is real 0
    grads = g.reshape(n, groups, o // groups, -1)
    acc = torch.zeros(groups, o // groups, cg * kh * kw, dtype=F32)
    for b in range(n):
        for pos in range(patches.shape[-1]):
            acc += grads[b, :, :, pos, None] * patches[b, :, None, :, pos]
    return acc.reshape(weight_shape)


def sum_positions_f32(g: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but 1 ([N, C, ...] -> [C]), terms in (batch, row, column) order."""
    flat = g.transpose(0, 1).reshape(g.shape[1], -1)
    acc = torch.zeros(g.shape[1], dtype=F32)
    for pos in range(flat.shape[1]):
        acc += flat[:, pos]
    return acc


def mean_hw_grad_f32(g: torch.Tensor, input_shape) -> torch.Tensor:
    return (g / torch.tensor(float(input_shape[2] * input_shape[3]), dtype=F32))[:, :, None, None].expand(input_shape).contiguous()


def linear_f32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ w.T + b, fp32, input features added in order after the bias."""
    acc, term = b.to(F32).expand(x.shape[0], -1).clone(), torch.empty(x.shape[0], w.shape[0], dtype=F32)
    for x_i, w_i in zip(x.unsqueeze(2).unbind(1), w.t().unsqueeze(1).unbind(0)):
        torch.mul(x_i, w_i, out=term)
        acc.add_(term)
    return acc


def linear_grad_input_f32(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(g.shape[0], w.shape[1], dtype=F32)
    for k in range(w.shape[0]):
        acc += g[:, k, None] * w[None, k]
    return acc


def linear_grad_weight_f32(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(g.shape[1], x.shape[1], dtype=F32)
    for b in range(x.shape[0]):
        acc += g[b, :, None] * x[b, None, :]
    return acc


def _softmax_f64(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.to(torch.float64)
    z = z - z.max(-1, keepdim=True).values
    e = z.exp()
    total = torch.zeros(z.shape[0], dtype=torch.float64)
    for k in range(z.shape[1]):  # ordered, as in C
        total += e[:, k]
    return z, total


def cross_entropy_f32(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of log-sum-exp minus the label's logit, in float64, rounded to fp32."""
    z, total = _softmax_f64(logits)
    nll = total.log() - z.gather(1, label.view(-1, 1)).squeeze(1)
    acc = torch.zeros((), dtype=torch.float64)
    for b in range(len(nll)):
        acc += nll[b]
    return (acc / len(nll)).to(F32)


def cross_entropy_grad_f32(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(softmax - onehot) / N: softmax in float64 rounded to fp32, then fp32 ops."""
    z, total = _softmax_f64(logits)
    p = (z.exp() / total[:, None]).to(F32)
    onehot = F.one_hot(label, logits.shape[-1]).to(F32)
    return (p - onehot) / torch.tensor(float(logits.shape[0]), dtype=F32)


def clamp_mask_grad(g: torch.Tensor, q_y: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The straight-through gradient of a fused clamp (ReLU/ReLU6 in codes): g where the output
    code was not clipped, else 0."""
    passed = (q_y.to(torch.int32) > qmin) & (q_y.to(torch.int32) < qmax)
    return torch.where(passed, g, torch.zeros((), dtype=F32))


# ---------------------------------------------------------------------------------------------
# Updates. A trained int8 weight W = s_w * q (per output channel) is updated in code units:
#   step = lr * (G * s_w) * qas,  qas = s_w^-2 with QAS, 1 without (the paper's eq. 3),
# i.e. with QAS the code moves by lr * G / s_w: real-space SGD. Most steps are far below one code
# (sub-LSB); what happens to them is the rule:
#   "round"       q -= round(step): sub-LSB steps vanish (what TTE's reference code does);
#   "stochastic"  q -= floor(step + u), u uniform in [0, 1) from a counter-based hash, so the
#                 expected move is exact and C reproduces the same draws;
#   "master16"    an int16 copy m of the trained slice in 1/256 code units; m -= round(256 * step),
#                 q = round(m / 256) (2 more bytes per trained weight);
#   "master32"    an fp32 copy m in code units; m -= step, q = round(m) (4 more bytes per trained weight).
# int32 biases (scale s_x * s_w) take step = lr * (G_b * s_x s_w) * qas_b with qas_b = (s_x s_w)^-2
# under QAS, and q_b -= round(step): their code unit is tiny, so no master copy is needed.
# ---------------------------------------------------------------------------------------------

UPDATE_RULES = ("round", "stochastic", "master16", "master32")
MASTER_BYTES = {"round": 0, "stochastic": 0, "master16": 2, "master32": 4}
WEIGHT_QMAX = 127


def code_step(g: torch.Tensor, scale: torch.Tensor, qas: torch.Tensor, lr: float) -> torch.Tensor:
    """The update of int8 codes in code units for real gradient g (fp32, per output channel scale)."""
    view = (-1, *([1] * (g.dim() - 1)))
    return (g * scale.to(F32).view(view)) * qas.to(F32).view(view) * torch.tensor(lr, dtype=F32)


def uniform_hash(seed: int, counter: int, n: int) -> torch.Tensor:
    """n floats in [0, 1) from a 32-bit integer hash of (seed, counter, index): the same draws in C
    (`lowbias32` by Chris Wellons, then the top 24 bits / 2^24)."""
    mask = 0xFFFFFFFF
    x = (torch.arange(n, dtype=torch.int64) + ((seed * 0x9E3779B9 + counter * 0x85EBCA6B) & mask)) & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    x = x ^ (x >> 16)
    return (x >> 8).to(F32) * torch.tensor(2.0**-24, dtype=F32)


def update_int8_weight(q: torch.Tensor, step: torch.Tensor, rule: str, master: torch.Tensor | None = None, seed: int = 0, counter: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply `step` (code units, shaped like q's trained slice) to int8 codes q; returns (q, master)."""
    if rule == "round":
        new = q.to(F32) - round_half_away(step)
    elif rule == "stochastic":
        u = uniform_hash(seed, counter, step.numel()).view(step.shape)
        new = q.to(F32) - torch.floor(step + u)
    elif rule == "master16":
        m = master.to(torch.int32) - round_half_away(step * torch.tensor(256.0, dtype=F32)).to(torch.int32)
        master = m.clamp(-WEIGHT_QMAX * 256, WEIGHT_QMAX * 256).to(torch.int16)
        new = round_half_away(master.to(F32) * torch.tensor(1 / 256, dtype=F32))
    elif rule == "master32":
        master = (master - step).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
        new = round_half_away(master)
    else:
        raise ValueError(f"unknown update rule '{rule}'; expected one of {', '.join(UPDATE_RULES)}")
    return new.clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8), master


def initial_master(q: torch.Tensor, rule: str) -> torch.Tensor | None:
    if rule == "master16":
        return q.to(torch.int16) * 256
    if rule == "master32":
        return q.to(F32)
    return None


def update_int32_bias(q_b: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return (q_b.to(torch.int64) - round_half_away(step).to(torch.int64)).clamp(-(2**31), 2**31 - 1).to(torch.int32)
