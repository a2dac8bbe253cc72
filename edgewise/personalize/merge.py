"""`tune --merge`: an adapter folded into its base, as a standalone GGUF that any runtime loads.

- A norm gain or a bias: the GGUF's F32 vector plus the delta, exact.
- A LoRA or a rows term: the projection's fp32 dequantization plus the delta (B A scaled, or the row deltas), mapped
  from the runtime's row order back to the GGUF's, then requantized to the tensor's own type (the importance-free
  scale search of `edgewise compress`). A rows term changes only its rows: every other row keeps its bytes.

The requantization rounds the trained deltas, which are small against a quantization step: some of what was learned
is lost. `benchmarks/personalize.py` measures the held-out perplexity of the adapter against its merged GGUF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgewise.errors import EdgewiseError


@dataclass(frozen=True)
class MergeResult:
    out: Path
    exact: int  # tensors changed exactly (F32 vectors)
    requantized: int  # matrices requantized
    rows_requantized: int

    def line(self) -> str:
        return f"merged = {self.out} exact_tensors = {self.exact} requantized_tensors = {self.requantized} requantized_rows = {self.rows_requantized}"


def merge(adapter: str | Path, out: str | Path, model: str | Path | None = None, progress: Callable[[int, int], None] | None = None) -> MergeResult:
    from edgewise.compress.gguf_write import tensor_bytes, write_gguf
    from edgewise.compress.pipeline import quantize_tensor, source_weight
    from edgewise.gguf_io import read_gguf
    from edgewise.lm.config import ModelConfig
    from edgewise.lm.weights import rope_row_order
    from edgewise.models import model_sha256, resolve_model
    from edgewise.personalize.adapter import LORA_SCALE, check_base, load_adapter
    from edgewise.personalize.plan import Plan

    adapter, out = Path(adapter), Path(out)
    header, tensors = load_adapter(adapter)
    path = resolve_model(model)
    check_base(header, adapter, path, model_sha256(path))
    if out.resolve() == path.resolve():
        raise EdgewiseError(f"{out} is the base model itself: give another output path")
    gguf = read_gguf(path)
    cfg = ModelConfig.from_gguf(gguf)
    plan = Plan.from_json(header.plan)
    orders = {}
    if cfg.traits.rope_permuted:
        orders = {"attn_q": rope_row_order(cfg.n_heads, cfg.head_dim), "attn_k": rope_row_order(cfg.n_kv_heads, cfg.head_dim)}
    written: dict[str, tuple[QT, np.ndarray]] = {}
    exact = requantized = rows_done = 0
    for n, term in enumerate(plan.terms):
        key = term.name
        proj = term.target.split(".")[-1]
        order = orders.get(proj)
        if term.kind in ("norm", "bias"):
            name = f"{term.target}.{'weight' if term.kind == 'norm' else 'bias'}"
            t = gguf.tensor(name)
            value = source_weight(t).reshape(-1).copy()
            delta = tensors[f"param/{key}"].numpy()
            if order is not None:
                value[order] += delta
            else:
                value += delta
            written[name] = (QT.F32, tensor_bytes(value.astype(np.float32), value.shape))
            exact += 1
        else:
            name = f"{term.target}.weight"
            t = gguf.tensor(name)
            w = source_weight(t)
            if term.kind == "lora":
                delta_rt = (tensors[f"param/{key}.B"] @ tensors[f"param/{key}.A"]).numpy() * LORA_SCALE
                rows_rt = np.arange(delta_rt.shape[0])
            else:
                delta_rt = tensors[f"param/{key}"].numpy()
                rows_rt = np.asarray(plan.rows[key])
            rows = order[rows_rt] if order is not None else rows_rt  # runtime row r is GGUF row order[r]
            w[rows] += delta_rt
            raw = np.array(tensor_bytes(t.raw, t.shape), copy=True)
            if t.qtype in (QT.F32, QT.F16, QT.BF16):
                written[name] = (QT.F32, tensor_bytes(w.astype(np.float32), w.shape))
            else:
                changed = np.sort(rows)
                raw[changed] = quantize_tensor(w[changed], t.qtype, None, "search").reshape(len(changed), -1)
                written[name] = (t.qtype, raw)
            requantized += 1
            rows_done += len(rows)
        if progress is not None:
            progress(n + 1, len(plan.terms))
    for name, t in gguf.tensors.items():  # every other tensor as it is
        written.setdefault(name, (t.qtype, tensor_bytes(t.raw, t.shape)))
    write_gguf(gguf, out, written)
    return MergeResult(out, exact, requantized, rows_done)
