"""Input-side magnitude sparsity on the FFN (TEAL, Liu et al. 2024): the measurement behind issue 16's
ablation of "skip what the token does not need".

A linear layer y = W x needs column c of W only where x[c] != 0. TEAL zeroes the entries of each
projection's input whose magnitude is below a per-layer threshold, chosen on calibration text so that
a target fraction `s` of them falls below it: for the FFN, the block's normalised input x (gate and
up columns) and the gated product h = act(gate x) * up x (down columns). No predictor and no training:
the threshold is a quantile of |x| measured before. A runtime that stores weights channel-major (a
column's bytes contiguous) would then read only the columns of the kept entries.

Here the masks are applied to the dense model (forward pre-hooks that zero the small entries), which
computes exactly what skipping those columns computes; the ablation measures the perplexity this
costs at each `s`, and what reading only the kept columns would cost the disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgewise.errors import EdgewiseError

SAMPLE = 1 << 16  # input magnitudes kept per layer and projection for the quantile (a random sample)


@dataclass(frozen=True)
class Thresholds:
    """Per layer: (threshold on |x| for gate/up, threshold on |h| for down), for target sparsity `sparsity`."""

    sparsity: float
    per_layer: list[tuple[float, float]]


def _ffn_and_down(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    pairs = []
    for i, block in enumerate(model.blocks):
        ffn = block.ffn
        down = getattr(ffn, "down", None)
        if down is None:
            raise EdgewiseError(f"layer {i}'s FFN ({type(ffn).__name__}) has no down projection to mask; TEAL masks apply to the dense model")
        pairs.append((ffn, down))
    return pairs


def calibrate(lm, ids: list[int], sparsities: list[float], ctx: int = 512, seed: int = 0) -> list[Thresholds]:
    """Thresholds for each target sparsity from the input magnitudes seen on `ids` (windows of `ctx` tokens)."""
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        raise EdgewiseError(f"sparsities must lie in [0, 1), got {sparsities}")
    gen = torch.Generator().manual_seed(seed)
    pairs = _ffn_and_down(lm.model)
    seen: list[list[list[torch.Tensor]]] = [[[], []] for _ in pairs]

    def keep(i: int, which: int):
        def hook(_module, inputs):
            a = inputs[0].detach().abs().float().reshape(-1)
            take = torch.randint(0, a.numel(), (min(a.numel(), SAMPLE),), generator=gen)
            seen[i][which].append(a[take])
        return hook

    handles = [m.register_forward_pre_hook(keep(i, which)) for i, pair in enumerate(pairs) for which, m in enumerate(pair)]
    try:
        with torch.inference_mode():
            for at in range(0, len(ids) - ctx + 1, ctx):
                lm.prefill(ids[at : at + ctx], lm.new_cache(ctx), last_only=True)
    finally:
        for h in handles:
            h.remove()
    if not seen[0][0]:
        raise EdgewiseError(f"the calibration text has {len(ids)} tokens, fewer than one window of {ctx}")
    out = []
    for s in sparsities:
        per_layer = []
        for x_seen, h_seen in seen:
            qs = [float(torch.quantile(torch.cat(v)[:SAMPLE * 4], s)) if s > 0 else 0.0 for v in (x_seen, h_seen)]
            per_layer.append((qs[0], qs[1]))
        out.append(Thresholds(s, per_layer))
    return out


class Masked:
    """Within the block, the model computes as if the FFN columns of small inputs were skipped:

        with Masked(lm, thresholds) as mask: ...   # mask.kept() -> fraction of inputs kept (x, h)
    """

    def __init__(self, lm, thresholds: Thresholds):
        self.lm, self.thresholds = lm, thresholds
        self.counts = [[0, 0], [0, 0]]  # [x, h] x [kept, seen]

    def __enter__(self) -> "Masked":
        pairs = _ffn_and_down(self.lm.model)
        if len(pairs) != len(self.thresholds.per_layer):
            raise EdgewiseError(f"thresholds for {len(self.thresholds.per_layer)} layers, the model has {len(pairs)}")

        def mask(which: int, t: float):
            def hook(_module, inputs):
                x = inputs[0]
                keep = x.abs() >= t
                self.counts[which][0] += int(keep.sum())
                self.counts[which][1] += keep.numel()
                return (x * keep,) + tuple(inputs[1:])
            return hook

        self.handles = [m.register_forward_pre_hook(mask(which, t[which]))
                        for pair, t in zip(pairs, self.thresholds.per_layer) for which, m in enumerate(pair)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def kept(self) -> tuple[float, float]:
        return tuple(k / n if n else 1.0 for k, n in self.counts)
