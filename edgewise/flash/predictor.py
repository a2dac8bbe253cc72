"""Sparsity predictors, the neuron order on flash, and the operating point, all from calibration text.

The quantity predicted is |h| with h = silu(gate . x) * (up . x), the SwiGLU hidden activation:
zeroing the smallest |h| is what costs least perplexity (SwiGLU has no exact zeros to find, so
predicting "the neurons that matter" replaces the paper's ReLU "neurons that fire").

- **Predictor** (one per layer): a low-rank linear map x -> |h|, s = B (A x) + c, rank r. It is
  fitted by reduced-rank regression, the exact least-squares optimum under the rank constraint:
  ordinary least squares, then projected onto the top-r principal directions of its fitted values.
- **Neuron order**: neurons are grouped into units (one aligned read) with the neurons they are most
  often co-active with, and units are ordered along the Fiedler vector of their co-activation
  graph, so the units one token needs tend to be neighbours (which coalescing then reads together).
- **Operating point**: the fraction of units a token computes, chosen as the smallest fraction whose
  perplexity on held-out calibration text stays within a tolerance of the dense model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgewise.lm.layerwise import LayerWalk
from edgewise.lm.model import Block


class _Capture(nn.Module):
    def __init__(self, ffn: nn.Module, xs: list, hs: list):
        super().__init__()
        self.ffn, self.xs, self.hs = ffn, xs, hs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffn.hidden(x)
        self.xs.append(x.float().clone())
        self.hs.append(h.abs().to(torch.float16))
        return self.ffn.down(h.to(x.dtype))


def capture_block(walk: LayerWalk, block: Block, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every window of the stream h [W, T, D] through the dense `block`, recording its FFN's inputs x [W T, D] (fp32)
    and hidden activations |h| [W T, F] (fp16); returns (the next stream, x, |h|)."""
    xs: list[torch.Tensor] = []
    hs: list[torch.Tensor] = []
    ffn = block.ffn
    block.ffn = _Capture(ffn, xs, hs)
    try:
        h = walk.run_block(block, h)
    finally:
        block.ffn = ffn
    return h, torch.cat(xs), torch.cat(hs)


@dataclass
class Predictor:
    """s = B (A x) + c over neurons in their original order; A [r, D], B [F, r], c [F]."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.a.float().T) @ self.b.float().T + self.c.float()


def fit_predictor(x: torch.Tensor, h_abs: torch.Tensor, rank: int, ridge: float = 1e-3, chunk: int = 1024) -> Predictor:
    """Reduced-rank least squares of |h| on x (with an intercept), in float64.

    Only the moments enter the fit (the centred Gram matrix of x and its cross-product with |h|), so they are
    summed over `chunk` rows at a time: float64 copies of the whole x [T, D] and |h| [T, F] would be the
    largest allocation of a flash convert (300 MB for SmolLM2's 8192 calibration tokens)."""
    x_mean, y_mean = x.double().mean(0), h_abs.double().mean(0)
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    cross = torch.zeros(x.shape[1], h_abs.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk].double() - x_mean
        gram += xc.T @ xc
        cross += xc.T @ (h_abs[start : start + chunk].double() - y_mean)
    w = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype), cross)  # [D, F], OLS
    _, vectors = torch.linalg.eigh(w.T @ gram @ w)  # the fitted values' covariance, [F, F]
    v = vectors[:, -rank:].flip(1)  # [F, r]: their top principal directions
    a = (w @ v).T  # [r, D]
    c = y_mean - (x_mean @ w @ v) @ v.T
    return Predictor(a.float().contiguous(), v.float().contiguous(), c.float())


def order_neurons(h_abs: torch.Tensor, bundles_per_unit: int, active_fraction: float = 0.5) -> np.ndarray:
    """The neuron at each bundle position of the FFN file ([n_units * bundles_per_unit], -1 pads).

    Co-activation is measured on the top-`active_fraction` |h| sets: greedy grouping puts each
    most-often-active unassigned neuron with the unassigned neurons most correlated with it; the
    units are then sorted by the Fiedler vector of the unit co-activation graph."""
    t, n = h_abs.shape
    k = max(1, int(round(n * active_fraction)))
    active = torch.zeros(t, n, dtype=torch.float32).scatter_(1, h_abs.float().topk(k, dim=1).indices, 1.0)
    freq = active.mean(0)
    centred = active - freq
    cov = centred.T @ centred / t
    std = cov.diagonal().clamp(min=1e-12).sqrt()
    corr = (cov / std[:, None] / std[None, :]).numpy()
    unassigned = np.ones(n, dtype=bool)
    units: list[list[int]] = []
    for seed in np.argsort(-freq.numpy(), kind="stable"):
        if not unassigned[seed]:
            continue
        unassigned[seed] = False
        partners = np.where(unassigned)[0]
        chosen = partners[np.argsort(-corr[seed, partners], kind="stable")[: bundles_per_unit - 1]]
        unassigned[chosen] = False
        units.append([int(seed), *map(int, chosen)])
    member = np.zeros((len(units), n), dtype=np.float32)
    for u, neurons in enumerate(units):
        member[u, neurons] = 1.0
    unit_active = (active.numpy() @ member.T > 0).astype(np.float64)  # [T, units]
    co = unit_active.T @ unit_active
    np.fill_diagonal(co, 0.0)
    laplacian = np.diag(co.sum(1)) - co
    _, vectors = np.linalg.eigh(laplacian)
    ordering = np.argsort(vectors[:, 1], kind="stable") if len(units) > 2 else np.arange(len(units))
    order = np.full(len(units) * bundles_per_unit, -1, dtype=np.int32)
    for position, u in enumerate(ordering):
        order[position * bundles_per_unit : position * bundles_per_unit + len(units[u])] = units[u]
    return order


def unit_score_matrix(order: np.ndarray, bundles_per_unit: int, d_ff: int) -> torch.Tensor:
    """[n_units, F] 0/1: unit u's score is the sum of its neurons' predicted |h|."""
    n_units = len(order) // bundles_per_unit
    m = torch.zeros(n_units, d_ff)
    positions = np.nonzero(order >= 0)[0]
    m[torch.from_numpy(positions // bundles_per_unit), torch.from_numpy(order[positions].astype(np.int64))] = 1.0
    return m


def unit_predictor(pred: Predictor, order: np.ndarray, bundles_per_unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The predictor folded onto units: unit scores = B_u (A x) + c_u with B_u [n_units, r]."""
    m = unit_score_matrix(order, bundles_per_unit, pred.b.shape[0])
    return pred.a.clone(), m @ pred.b, m @ pred.c


class SelectedFFN(nn.Module):
    """A dense FFN whose h is kept only on the top-k units by predicted score: what the flash engine
    computes when its cache holds exactly the active set. Used to choose the operating point."""

    def __init__(self, ffn: nn.Module, a: torch.Tensor, b_units: torch.Tensor, c_units: torch.Tensor, neuron_unit: torch.Tensor, k_units: int):
        super().__init__()
        self.ffn, self.a, self.b_units, self.c_units, self.neuron_unit, self.k_units = ffn, a, b_units, c_units, neuron_unit, k_units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffn.hidden(x)
        scores = (x.float() @ self.a.T) @ self.b_units.T + self.c_units
        keep = torch.zeros_like(scores).scatter_(1, scores.topk(self.k_units, dim=1).indices, 1.0)
        return self.ffn.down((h * keep[:, self.neuron_unit]).to(x.dtype))


def neuron_unit_index(order: np.ndarray, bundles_per_unit: int, d_ff: int) -> torch.Tensor:
    index = np.zeros(d_ff, dtype=np.int64)
    positions = np.nonzero(order >= 0)[0]
    index[order[positions]] = positions // bundles_per_unit
    return torch.from_numpy(index)


def recall_precision(pred_units: torch.Tensor, h_abs: torch.Tensor, neuron_unit: torch.Tensor, k_units: int, bundles_per_unit: int) -> tuple[float, float]:
    """Neuron-level recall and precision of the predicted units against the true top-|h| neurons
    (as many neurons as the predicted units hold), averaged over tokens."""
    k_neurons = min(h_abs.shape[1], k_units * bundles_per_unit)
    truth = torch.zeros(h_abs.shape, dtype=torch.bool).scatter_(1, h_abs.float().topk(k_neurons, dim=1).indices, True)
    chosen_units = torch.zeros(pred_units.shape, dtype=torch.bool).scatter_(1, pred_units.topk(k_units, dim=1).indices, True)
    chosen = chosen_units[:, neuron_unit]
    hit = (truth & chosen).sum(1).float()
    return float((hit / truth.sum(1)).mean()), float((hit / chosen.sum(1)).mean())
