"""Structured pruning: a smaller dense model that any runtime runs faster (fewer bytes and multiply-adds a token).

- **FFN neurons.** Neuron j of a layer adds W_down[:, j] * h_j to the residual stream (h = act(gate x) * up x);
  its importance is the expected squared size of that addition, E[h_j^2] * ||W_down[:, j]||^2: Wanda's
  |W| * ||x|| for the columns of ffn_down, summed over each column's rows, from the calibration statistics of
  ffn_down's input. Every layer keeps its `keep` most important neurons (one number for all layers: a GGUF
  states one feed_forward_length).
- **Whole layers.** A block's importance is the KL of the model's next-token distribution when it alone is
  skipped (`KLProbe.kl_skipping`); the least important are dropped and the rest renumbered.

Bytes: gate and up lose whole rows, which are whole blocks, so their bytes are kept. ffn_down loses columns,
which cut through its blocks: it is requantized into its own type (a 32-element type of about the same size
when the kept columns are no whole 256-blocks) by GPTQ under its Hessian restricted to the kept neurons; a
float ffn_down is sliced exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType

from edgewise.compress.blocks import FORMATS
from edgewise.compress.gguf_write import tensor_bytes, write_gguf
from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile

FLOAT_TYPES = (QT.F32, QT.F16)  # sliced exactly


@dataclass(frozen=True)
class PrunePlan:
    keep: dict[int, np.ndarray]  # source layer -> the FFN neurons it keeps, ascending
    drop: tuple[int, ...]  # source layers dropped

    def layers(self, n_layers: int) -> list[int]:
        """The source layers that stay, in order (the pruned model's layer i is the i-th of these)."""
        return [i for i in range(n_layers) if i not in self.drop]


def ffn_importance(gguf: GGUFFile, moments: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """Layer -> each FFN neuron's E[h_j^2] * ||W_down[:, j]||^2 (`moments`: ffn_down's input statistics, the
    Hessian or its diagonal)."""
    from edgewise.compress.pipeline import source_weight

    scores = {}
    for name, t in gguf.tensors.items():
        if not name.endswith(".ffn_down.weight"):
            continue
        if name not in moments:
            raise EdgewiseError(f"{name}: no calibration statistics for its input; pruning needs them")
        m = moments[name]
        h2 = (torch.diagonal(m) if m.dim() == 2 else m).double().numpy()
        w = source_weight(t).astype(np.float64)
        scores[int(name.split(".")[1])] = h2 * (w * w).sum(0)
    return scores


def plan_pruning(scores: dict[int, np.ndarray], keep: int, drop: tuple[int, ...] = ()) -> PrunePlan:
    """Each layer's `keep` highest-scoring neurons (ascending order, as they are stored)."""
    return PrunePlan({i: np.sort(np.argsort(-s, kind="stable")[:keep]) for i, s in scores.items()}, tuple(sorted(drop)))


def prune_gguf(
    gguf: GGUFFile,
    out: str | Path,
    plan: PrunePlan,
    moments: dict[str, torch.Tensor] | None = None,
    rounding: str = "gptq",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the pruned model (`plan`) into `out`, a dense GGUF of the source's architecture (atomically)."""
    from edgewise.compress.pipeline import FALLBACK, quantize_tensor, source_weight
    from edgewise.lm.config import ModelConfig

    cfg = ModelConfig.from_gguf(gguf)
    arch = cfg.arch
    widths = {len(k) for k in plan.keep.values()}
    if len(widths) != 1:
        raise EdgewiseError(f"every layer must keep the same number of FFN neurons (a GGUF states one); the plan keeps {sorted(widths)}")
    keep_n = widths.pop()
    if keep_n % 32 or not 0 < keep_n <= cfg.ffn_dim:
        raise EdgewiseError(f"keep {keep_n} FFN neurons: expected a multiple of 32 in 32..{cfg.ffn_dim} (ffn_down's rows are 32-element blocks)")
    if any(not 0 <= i < cfg.n_layers for i in plan.drop) or len(plan.drop) >= cfg.n_layers:
        raise EdgewiseError(f"drop layers {list(plan.drop)}: expected fewer than {cfg.n_layers} of 0..{cfg.n_layers - 1}")
    layers = plan.layers(cfg.n_layers)
    new_index = {old: new for new, old in enumerate(layers)}
    tensors: dict[str, tuple[QT, np.ndarray]] = {}
    order: list[str] = []
    for step, (name, t) in enumerate(gguf.tensors.items()):
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            layer = int(layer)
            if layer in plan.drop:
                continue
            new_name = f"blk.{new_index[layer]}.{rest}"
            keep = plan.keep[layer]
            if rest in ("ffn_gate.weight", "ffn_up.weight"):
                data = (t.qtype, tensor_bytes(t.raw[keep], (keep_n, *t.shape[1:])))  # whole rows: bytes kept
            elif rest == "ffn_down.weight":
                weight = source_weight(t)[:, keep]
                if t.qtype in FLOAT_TYPES:
                    data = (t.qtype, tensor_bytes(np.ascontiguousarray(weight, dtype=np.float16 if t.qtype == QT.F16 else np.float32), weight.shape))
                else:
                    qtype = t.qtype if t.qtype in FORMATS else QT.Q8_0
                    if keep_n % FORMATS[qtype].block:
                        qtype = FALLBACK[qtype]
                    m = (moments or {}).get(name)
                    if m is not None:
                        m = m[keep][:, keep] if m.dim() == 2 else m[keep]
                    data = (qtype, quantize_tensor(weight, qtype, m, rounding))  # without statistics: plain squared error
            else:
                data = (t.qtype, tensor_bytes(t.raw, t.shape))
            tensors[new_name] = data
            order.append(new_name)
        else:
            tensors[name] = (t.qtype, tensor_bytes(t.raw, t.shape))
            order.append(name)
        if progress is not None:
            progress(step + 1, len(gguf.tensors))
    metadata = {
        f"{arch}.feed_forward_length": (keep_n, GGUFValueType.UINT32),
        f"{arch}.block_count": (len(layers), GGUFValueType.UINT32),
    }
    return write_gguf(gguf, out, tensors, metadata=metadata, order=order)


def parameter_count(gguf: GGUFFile) -> int:
    return sum(int(np.prod(t.shape)) for t in gguf.tensors.values())
