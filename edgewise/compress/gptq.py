"""Error-compensating rounding (GPTQ, Frantar et al. 2022, after Optimal Brain Quantization) into GGUF's blocks.

Rounding one weight moves the layer's output; GPTQ rounds the columns of W [rows, in] one at a time and
moves the not-yet-rounded columns to cancel that error, under the calibration loss
    L(Q) = tr((W - Q) H (W - Q)^T),  H = E[x x^T] over calibration inputs,
whose exact one-column update is err_j / U_jj * U_j,(j+1:), with U the upper Cholesky factor of H^-1.

GGUF's blocks fix a grid per (row, block): the block's scales (and mins, and for the K-quants the
super-block's d and dmin). The grid of each block column is fitted (`quantize.fit_grid`, weighted by
diag H) on the weights as GPTQ has updated them when it reaches that column range; inside it, each
column takes its nearest grid point and passes its error on. The bytes are ordinary blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from edgewise.compress.blocks import FORMATS
from edgewise.compress.quantize import fit_grid
from edgewise.errors import EdgewiseError

LAZY = 32  # columns whose updates are applied together (every block size here is a multiple)
DAMP = 0.01  # added to H's diagonal, times its mean: keeps the Cholesky factorization well conditioned


def calibration_loss(weight: np.ndarray, dequantized: np.ndarray, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the mean squared change of the layer's output over the calibration inputs."""
    delta = torch.from_numpy(np.asarray(dequantized, dtype=np.float64) - np.asarray(weight, dtype=np.float64))
    return float(((delta @ hessian.double()) * delta).sum())


def inverse_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U upper-triangular with U^T U = (H + damp * mean(diag H) I)^-1; `dead` marks inputs never active."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True), dead


def gptq_quantize(
    weight: np.ndarray,
    qtype: QT,
    hessian: torch.Tensor,
    search: bool = True,
    damp: float = DAMP,
    progress: Callable[[int], None] | None = None,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> np.ndarray:
    """A float matrix [rows, cols] -> its GGUF bytes in `qtype`, rounded by GPTQ under `hessian` [cols, cols].
    `factor`: `inverse_cholesky(hessian, damp)`, computed once where several types of one matrix are rounded (it
    costs O(cols^3): ~10 s for an 8960-wide Hessian on 2 cores, half of that matrix's GPTQ)."""
    fmt = FORMATS[qtype]
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise EdgewiseError(f"the Hessian is {tuple(hessian.shape)}, expected ({cols}, {cols}) for a matrix of {cols} columns")
    if cols % fmt.block:
        raise EdgewiseError(f"{qtype.name} needs rows of a multiple of {fmt.block} values; this matrix has {cols}")
    u, dead = factor if factor is not None else inverse_cholesky(hessian, damp)
    u = u.numpy()
    imp = torch.diagonal(hessian).double().numpy().copy()
    w = np.array(weight, dtype=np.float64)
    w[:, dead.numpy()] = 0.0
    B, per = fmt.block, fmt.block // fmt.sub
    out = np.empty((rows, cols // B * fmt.type_bytes), dtype=np.uint8)
    for b, i1 in enumerate(range(0, cols, B)):
        i2 = i1 + B
        block = w[:, i1:i2]
        grid = fit_grid(block, np.broadcast_to(imp[i1:i2], block.shape), fmt, search)
        # the block transposed, [B, rows]: each column's values contiguous (a column of w is strided by a whole row)
        bt = np.ascontiguousarray(block.T)
        scale = np.repeat(grid.scale.reshape(rows, per), fmt.sub, 1).T.copy()
        minimum = np.repeat(grid.minimum.reshape(rows, per), fmt.sub, 1).T.copy()
        zero = scale == 0
        safe = np.where(zero, 1.0, scale)
        codes = np.empty((B, rows), dtype=np.int64)
        err = np.empty((B, rows))
        ub = u[i1:i2, i1:i2]
        for c1 in range(0, B, LAZY):  # GPTQ's lazy batches: a column's error reaches the rest of its batch at once,
            c2 = c1 + LAZY  # the block's later columns as one product per batch
            for j in range(c1, c2):
                q = np.where(zero[j], 0, np.clip(np.rint((bt[j] + minimum[j]) / safe[j]), fmt.lo, fmt.hi))
                e = (bt[j] - (scale[j] * q - minimum[j])) / ub[j, j]
                if j + 1 < c2:
                    bt[j + 1 : c2] -= np.outer(ub[j, j + 1 : c2], e)
                codes[j], err[j] = q, e
            if c2 < B:
                bt[c2:] -= ub[c1:c2, c2:].T @ err[c1:c2]
        if i2 < cols:
            w[:, i2:] -= err.T @ u[i1:i2, i2:]
        out[:, b * fmt.type_bytes : (b + 1) * fmt.type_bytes] = grid.pack(codes.T, fmt)
        if progress is not None:
            progress(i2)
    return out
