"""Structured pruning: a smaller dense model that any runtime runs faster (fewer bytes and multiply-adds a token).

- **FFN neurons.** Neuron j of a layer adds W_down[:, j] * h_j to the residual stream (h = act(gate x) * up x);
  its importance is the expected squared size of that addition, E[h_j^2] * ||W_down[:, j]||^2: Wanda's
  |W| * ||x|| for the columns of ffn_down, summed over each column's rows, from the calibration statistics of
  ffn_down's input. Every layer keeps its `keep` most important neurons (one number for all layers: a GGUF
  states one feed_forward_length).
- **Attention heads.** Query head h adds W_o[:, cols(h)] z_h to the residual stream (z_h: its attention output,
  cols(h) its head_dim columns of attn_output); its importance is the expected squared size of that addition,
  tr(W_o[:, cols] H[cols, cols] W_o[:, cols]^T) with attn_output's input Hessian H (with only H's diagonal, the
  Wanda-style sum of E[z_j^2] * ||W_o[:, j]||^2). Heads share K/V heads in groups (GQA: query head h reads KV head
  h // group); every group of every layer keeps the same number of its most important query heads (a GGUF states
  one head_count), so the K/V heads all stay. head_dim is written explicitly (attention.key_length), since
  dim / head_count no longer gives it.
- **Whole layers.** A block's importance is the KL of the model's next-token distribution when it alone is
  skipped (`KLProbe.kl_skipping`); the least important are dropped and the rest renumbered.

Bytes: gate, up and attn_q lose whole rows, which are whole blocks, so their bytes are kept. ffn_down and
attn_output lose columns, which cut through their blocks: each is requantized into its own type (a 32-element type
of about the same size when the kept columns are no whole 256-blocks) by GPTQ under its Hessian restricted to the
kept columns; a float matrix is sliced exactly.
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
    heads: dict[int, np.ndarray] | None = None  # source layer -> the query heads it keeps, ascending (None: all)

    def layers(self, n_layers: int) -> list[int]:
        """The source layers that stay, in order (the pruned model's layer i is the i-th of these)."""
        return [i for i in range(n_layers) if i not in self.drop]


def _calibrated(gguf: GGUFFile, moments: dict[str, torch.Tensor], matrix: str):
    """(layer, weight fp64 [out, in], its input's statistics: the Hessian or its diagonal) for every block's
    `matrix` (e.g. "ffn_down")."""
    from edgewise.compress.pipeline import source_weight

    for name, t in gguf.tensors.items():
        if name.startswith("blk.") and name.endswith(f".{matrix}.weight"):
            if name not in moments:
                raise EdgewiseError(f"{name}: no calibration statistics for its input; pruning needs them")
            yield int(name.split(".")[1]), source_weight(t).astype(np.float64), moments[name]


def ffn_importance(gguf: GGUFFile, moments: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """Layer -> each FFN neuron's E[h_j^2] * ||W_down[:, j]||^2 (`moments`: ffn_down's input statistics, the
    Hessian or its diagonal)."""
    return {i: (torch.diagonal(m) if m.dim() == 2 else m).double().numpy() * (w * w).sum(0) for i, w, m in _calibrated(gguf, moments, "ffn_down")}


def head_importance(gguf: GGUFFile, moments: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """Layer -> each query head's E[|W_o[:, cols(h)] z_h|^2] (`moments`: attn_output's input statistics; with the
    whole Hessian the trace form, with its diagonal the per-column sum)."""
    from edgewise.lm.config import ModelConfig

    hd = ModelConfig.from_gguf(gguf).head_dim
    scores = {}
    for i, w, m in _calibrated(gguf, moments, "attn_output"):  # w: [dim, heads * head_dim]
        m = m.double().numpy()
        per_head = []
        for h in range(w.shape[1] // hd):
            cols = slice(h * hd, (h + 1) * hd)
            wc = w[:, cols]
            per_head.append(float(((wc @ m[cols, cols]) * wc).sum()) if m.ndim == 2 else float(m[cols] @ (wc * wc).sum(0)))
        scores[i] = np.array(per_head)
    return scores


def heads_kept(group: int, fraction: float) -> int:
    """Query heads each KV group keeps when `fraction` of them are pruned (at least one)."""
    return max(1, int(round(group * (1 - fraction))))


def plan_pruning(
    scores: dict[int, np.ndarray], keep: int, drop: tuple[int, ...] = (), head_scores: dict[int, np.ndarray] | None = None,
    kv_heads: int = 1, heads_per_group: int | None = None,
) -> PrunePlan:
    """Each layer's `keep` highest-scoring neurons (ascending order, as they are stored) and, with `head_scores`,
    the `heads_per_group` highest-scoring query heads of each of its `kv_heads` groups."""
    neurons = {i: np.sort(np.argsort(-s, kind="stable")[:keep]) for i, s in scores.items()}
    heads = None
    if head_scores is not None and heads_per_group is not None:
        heads = {}
        for i, s in head_scores.items():
            group = len(s) // kv_heads
            heads[i] = np.sort(np.concatenate([g * group + np.argsort(-s[g * group : (g + 1) * group], kind="stable")[:heads_per_group] for g in range(kv_heads)]))
    return PrunePlan(neurons, tuple(sorted(drop)), heads)


def prune_gguf(
    gguf: GGUFFile,
    out: str | Path,
    plan: PrunePlan,
    moments: dict[str, torch.Tensor] | None = None,
    rounding: str = "gptq",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the pruned model (`plan`) into `out`, a dense GGUF of the source's architecture (atomically)."""
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
    hd = cfg.head_dim
    heads = plan.heads or {i: np.arange(cfg.n_heads) for i in range(cfg.n_layers)}
    layers = plan.layers(cfg.n_layers)
    n_heads = _heads_a_layer(heads, layers, cfg.n_heads, cfg.n_kv_heads)
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
            q_rows = (np.asarray(heads[layer])[:, None] * hd + np.arange(hd)).reshape(-1)  # kept heads' rows of attn_q
            if rest in ("ffn_gate.weight", "ffn_up.weight"):
                data = (t.qtype, tensor_bytes(t.raw[keep], (keep_n, *t.shape[1:])))  # whole rows: bytes kept
            elif rest == "attn_q.weight":
                data = (t.qtype, tensor_bytes(t.raw[q_rows], (len(q_rows), *t.shape[1:])))
            elif rest == "attn_q.bias":
                data = (t.qtype, tensor_bytes(np.ascontiguousarray(t.raw[q_rows]), (len(q_rows),)))
            elif rest in ("ffn_down.weight", "attn_output.weight"):
                data = _cut_columns(t, keep if rest == "ffn_down.weight" else q_rows, (moments or {}).get(name), rounding)
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
        f"{arch}.attention.head_count": (n_heads, GGUFValueType.UINT32),
        f"{arch}.attention.key_length": (hd, GGUFValueType.UINT32),  # dim / head_count no longer gives it
        f"{arch}.attention.value_length": (hd, GGUFValueType.UINT32),
    }
    return write_gguf(gguf, out, tensors, metadata=metadata, order=order)


def _heads_a_layer(heads: dict[int, np.ndarray], layers: list[int], n_heads: int, n_kv: int) -> int:
    """The query heads every layer keeps, after checking that each kept layer keeps the same number of distinct
    heads from each KV group (GQA's groups must stay whole and equal: a GGUF states one head_count)."""
    group = n_heads // n_kv
    shapes = set()
    for i in layers:
        h = np.asarray(heads.get(i, []))
        if len(h) == 0 or len(np.unique(h)) != len(h) or h.min() < 0 or h.max() >= n_heads:
            shapes.add(None)
        else:
            shapes.add(tuple(np.bincount(h // group, minlength=n_kv)))
    if len(shapes) != 1 or None in shapes or len(set(next(iter(shapes)))) != 1:
        raise EdgewiseError(f"every layer must keep the same number of query heads from each of its {n_kv} KV groups (heads 0..{n_heads - 1}, "
                            f"{group} a group; a GGUF states one head_count); the plan keeps {[list(map(int, heads.get(i, []))) for i in layers]}")
    return int(sum(next(iter(shapes))))


def _cut_columns(t, cols: np.ndarray, moment: torch.Tensor | None, rounding: str) -> tuple[QT, np.ndarray]:
    """A matrix with only its columns `cols`: a float one sliced exactly; a quantized one requantized into its own
    type (or, where the kept width is no whole number of its blocks, a 32-element type of about its size) under
    its input statistics restricted to the kept columns (without statistics: plain squared error)."""
    from edgewise.compress.pipeline import FALLBACK, quantize_tensor, source_weight

    weight = source_weight(t)[:, cols]
    if t.qtype in FLOAT_TYPES:
        return t.qtype, tensor_bytes(np.ascontiguousarray(weight, dtype=np.float16 if t.qtype == QT.F16 else np.float32), weight.shape)
    qtype = t.qtype if t.qtype in FORMATS else QT.Q8_0
    if len(cols) % FORMATS[qtype].block:
        qtype = FALLBACK[qtype]
    if moment is not None:
        moment = moment[cols][:, cols] if moment.dim() == 2 else moment[cols]
    return qtype, quantize_tensor(weight, qtype, moment, rounding)


def parameter_count(gguf: GGUFFile) -> int:
    return sum(int(np.prod(t.shape)) for t in gguf.tensors.values())
