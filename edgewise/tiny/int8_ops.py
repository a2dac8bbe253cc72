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


def conv2d_int8(q_x, z_x: int, q_w, bias_i32, stride, padding, groups: int, multiplier, z_y: int, qmin: int = QMIN, qmax: int = QMAX) -> torch.Tensor:
    """int8 conv: exact int32 accumulation of (q_x - z_x) * q_w + bias, then requantize to int8.
    Padding is with real zeros, i.e. z_x in the quantized domain (done by shifting first)."""
    x = q_x.to(torch.float64) - z_x
    acc = F.conv2d(x, q_w.to(torch.float64), bias_i32.to(torch.float64), stride=stride, padding=padding, groups=groups)
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
