"""Quantize a float weight matrix into GGUF blocks, choosing scales (and mins) by importance.

The objective, per row of a weight W [out, in], is the importance-weighted squared error
    sum_i w_i (W_i - Q(W)_i)^2,
where w_i, one per input column, is the mean square of that input over calibration text (llama.cpp's
"importance matrix", `llama-imatrix`): the diagonal of the layer's Hessian X^T X, so the sum is the
expected output error if inputs were uncorrelated. With no calibration, w = 1 (plain squared error).

Per sub-block, a grid search over 2 * STEPS + 1 candidate scales around the min-max one, each
refined by weighted least squares for its codes (scale, and min for the affine formats); the best
is kept. The K-quants then quantize those sub-block scales to small integers times one fp16
super-scale: the same search again, one level up, weighting each sub-block's scale by how much the
error moves with it (sum of w q^2; for a min, sum of w). Codes are finally rounded to the nearest
point of the stored grid, which for a per-element weighted error is optimal given the scales.

`search=False` is plain min-max rounding (each scale from the sub-block's extremes), the baseline
that every improvement here is measured against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgewise.compress.blocks import FORMATS, BlockFormat, pack
from edgewise.errors import EdgewiseError

STEPS = 10  # candidates at t = -1.0, -0.9, ..., +1.0 code steps around the extreme (llama.cpp searches a similar grid)
CHUNK = 1 << 20  # elements quantized at once (bounds the search's temporaries to ~100 MB)


def _symmetric(x: np.ndarray, w: np.ndarray, lo: int, hi: int, search: bool) -> np.ndarray:
    """Per row of x [n, m]: the scale s of x ~ s * q, q integers in [lo, hi], minimising sum w (x - s q)^2.

    The element of largest magnitude goes to the end of the range with more room (-lo for lo < 0 <= hi,
    hi for unsigned codes). Rows of zeros get s = 0."""
    n_ref = max(-lo, hi)
    ref = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]
    sign = -1.0 if -lo > hi else 1.0
    safe = np.where(ref == 0, 1.0, ref)
    best_s = sign * ref / n_ref  # min-max: the extreme maps exactly onto its end of the range
    if not search:
        return np.where(ref == 0, 0.0, best_s)
    best_gain = np.full(x.shape[0], -np.inf)
    for t in np.linspace(-1.0, 1.0, 2 * STEPS + 1):
        inv = sign * (n_ref + t) / safe
        q = np.clip(np.rint(x * inv[:, None]), lo, hi)
        wq = w * q
        sxq, sqq = (wq * x).sum(1), (wq * q).sum(1)
        gain = np.where(sqq > 0, sxq * sxq / np.where(sqq > 0, sqq, 1), -np.inf)  # error = sum w x^2 - gain
        better = gain > best_gain
        best_gain = np.where(better, gain, best_gain)
        best_s = np.where(better, sxq / np.where(sqq > 0, sqq, 1), best_s)
    return np.where(ref == 0, 0.0, best_s)


def _affine(x: np.ndarray, w: np.ndarray, hi: int, search: bool, zero_in_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [n, m]: scale s >= 0 and min m of x ~ s q - m, q integers in [0, hi], minimising
    sum w (x - s q + m)^2. `zero_in_range` keeps m >= 0, as the K-quants store it (an unsigned multiple of dmin)."""
    lo_x = np.minimum(x.min(1), 0.0) if zero_in_range else x.min(1)
    span = x.max(1) - lo_x
    flat = span == 0
    span = np.where(flat, 1.0, span)
    best_s, best_m = span / hi, -lo_x
    if not search:
        return np.where(flat, 0.0, best_s), best_m
    shifted = x - lo_x[:, None]
    best_err = np.full(x.shape[0], np.inf)
    wx = w * x
    sw, swx, swxx = w.sum(1), wx.sum(1), (wx * x).sum(1)
    for t in np.linspace(-1.0, 1.0, 2 * STEPS + 1):
        q = np.clip(np.rint(shifted * ((hi + t) / span)[:, None]), 0, hi)
        wq = w * q
        swq, swqq, swqx = wq.sum(1), (wq * q).sum(1), (q * wx).sum(1)
        det = sw * swqq - swq * swq
        ok = det > 0
        det = np.where(ok, det, 1.0)
        s = (sw * swqx - swq * swx) / det
        b = (swqq * swx - swq * swqx) / det  # x ~ s q + b
        clamp = (b > 0) & zero_in_range  # the min must not go below zero (b <= 0): refit the scale alone with b = 0
        s = np.where(clamp, swqx / np.where(swqq > 0, swqq, 1), s)
        b = np.where(clamp, 0.0, b)
        err = s * s * swqq + 2 * s * b * swq + b * b * sw - 2 * s * swqx - 2 * b * swx + swxx  # sum w (s q + b - x)^2, expanded
        better = ok & (s > 0) & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_s, best_m = np.where(better, s, best_s), np.where(better, -b, best_m)
    return np.where(flat, 0.0, best_s), best_m


def _codes(x: np.ndarray, scale: np.ndarray, minimum: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The nearest grid point of each element, given its sub-block's scale and min ([..., 1] broadcasts)."""
    safe = np.where(scale == 0, 1.0, scale)
    return np.where(scale == 0, 0, np.clip(np.rint((x + minimum) / safe), lo, hi)).astype(np.int64)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float64)


@dataclass(frozen=True)
class Grid:
    """The points a block's codes may take, per sub-block: value = scale * q - minimum, q in [lo, hi]; `fields` are
    what the packer stores for it (sub-block scales and mins: integers under d and dmin for the K-quants)."""

    scale: np.ndarray  # [nb * sub-blocks, 1]
    minimum: np.ndarray  # [nb * sub-blocks, 1]
    fields: tuple  # (scales, mins, d, dmin) as `blocks.pack` takes them

    def codes(self, x: np.ndarray, fmt: BlockFormat) -> np.ndarray:
        """The nearest grid point of each element of blocks x [nb, block]."""
        return _codes(x.reshape(-1, fmt.sub), self.scale, self.minimum, fmt.lo, fmt.hi).reshape(x.shape)

    def values(self, codes: np.ndarray, fmt: BlockFormat) -> np.ndarray:
        return (codes.reshape(-1, fmt.sub) * self.scale - self.minimum).reshape(codes.shape)

    def pack(self, codes: np.ndarray, fmt: BlockFormat) -> np.ndarray:
        return pack(fmt, codes, *self.fields)


def fit_grid(x: np.ndarray, w: np.ndarray, fmt: BlockFormat, search: bool = True) -> Grid:
    """The grid of blocks x [nb, block] (float) under importances w (same shape, >= 0)."""
    nb, sub = x.shape[0], fmt.sub
    xs, ws = x.reshape(-1, sub), w.reshape(-1, sub)
    if fmt.affine:
        s, m = _affine(xs, ws, fmt.hi, search, zero_in_range=fmt.super_scaled)
    else:
        s, m = _symmetric(xs, ws, fmt.lo, fmt.hi, search), np.zeros(xs.shape[0])
    per = fmt.block // sub
    if not fmt.super_scaled:  # one fp16 scale (and min) per block
        s, m = _f16(s), _f16(m)
        return Grid(s[:, None], m[:, None], (s.reshape(nb, 1), m.reshape(nb, 1) if fmt.affine else None, None, None))
    # one level up: the sub-block scales (and mins) of a super-block as integers times fp16 d (and dmin)
    q_fit = _codes(xs, s[:, None], m[:, None], fmt.lo, fmt.hi)
    s_weight = (ws * q_fit * q_fit).sum(1).reshape(nb, per) + 1e-30  # d(error)/d(scale)^2 / 2
    s_blocks = s.reshape(nb, per)
    d = _f16(_symmetric(s_blocks, s_weight, fmt.scale_lo, fmt.scale_hi, search))
    sc = _codes(s_blocks, d[:, None], 0.0, fmt.scale_lo, fmt.scale_hi)
    if fmt.affine:
        m_blocks = m.reshape(nb, per)
        dmin = _f16(_symmetric(m_blocks, ws.sum(1).reshape(nb, per) + 1e-30, 0, fmt.scale_hi, search))
        mc = _codes(m_blocks, dmin[:, None], 0.0, 0, fmt.scale_hi)
        minimum = (dmin[:, None] * mc).reshape(-1, 1)
    else:
        dmin, mc, minimum = None, None, np.zeros((xs.shape[0], 1))
    return Grid((d[:, None] * sc).reshape(-1, 1), minimum, (sc, mc, d, dmin))


def quantize_blocks(x: np.ndarray, w: np.ndarray, fmt: BlockFormat, search: bool = True) -> np.ndarray:
    """Blocks x [nb, block] (float) with importances w (same shape, >= 0) -> [nb, type_bytes] bytes."""
    grid = fit_grid(x, w, fmt, search)
    return grid.pack(grid.codes(x, fmt), fmt)


def quantize_matrix(
    weight: np.ndarray,
    qtype: QT,
    importance: np.ndarray | None = None,
    search: bool = True,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """A float matrix [rows, cols] -> its GGUF bytes [rows, cols // block * type_bytes] in `qtype`.

    `importance` [cols]: each input column's weight in the error (mean x^2 over calibration text);
    None weighs every element equally. `progress(rows_done)` is called after each chunk of rows."""
    if qtype not in FORMATS:
        raise EdgewiseError(f"edgewise compress writes {', '.join(q.name for q in FORMATS)}; not {qtype.name}")
    fmt = FORMATS[qtype]
    rows, cols = weight.shape
    if cols % fmt.block:
        raise EdgewiseError(f"{qtype.name} needs rows of a multiple of {fmt.block} values; this matrix has {cols}")
    if importance is None:
        importance = np.ones(cols)
    elif importance.shape != (cols,) or not np.all(np.isfinite(importance)) or importance.min() < 0:
        raise EdgewiseError(f"importance must be {cols} finite values >= 0, one per input column")
    imp = importance.astype(np.float64).reshape(1, cols // fmt.block, fmt.block)
    out = np.empty((rows, cols // fmt.block * fmt.type_bytes), dtype=np.uint8)
    step = max(1, CHUNK // cols)
    for r in range(0, rows, step):
        x = np.asarray(weight[r : r + step], dtype=np.float64)
        n = x.shape[0]
        w = np.broadcast_to(imp, (n, *imp.shape[1:]))
        out[r : r + n] = quantize_blocks(x.reshape(-1, fmt.block), w.reshape(-1, fmt.block), fmt, search).reshape(n, -1)
        if progress is not None:
            progress(r + n)
    return out
