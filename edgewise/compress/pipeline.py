"""`edgewise compress` as a library call: a GGUF in, a smaller standard GGUF out.

1. The plan: a type per tensor (`plan_types`). Vectors (norms, biases) stay as they are; the output
   head (or a tied embedding, which is also the output head) stays at Q6_K or better, as llama.cpp
   keeps it; a matrix whose rows are no whole number of the type's blocks falls back to a 32-element
   format of about the same size (`FALLBACK`); a tensor already in the target type keeps its bytes.
2. Calibration (`calibrate.second_moments`): each linear layer's input statistics on the calibration text.
3. Quantization of each planned tensor from the fp32 dequantization of the source: GPTQ's error-compensating
   rounding under the layer's Hessian (`gptq`), over grids whose scales are searched per block under the
   importance weights (`quantize`); or that search alone; or plain min-max rounding, the baseline.
4. `gguf_write.write_gguf`: the source's metadata, the new tensors, one atomic file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, LlamaFileType, quants

from edgewise.compress.blocks import FORMATS
from edgewise.compress.gguf_write import tensor_bytes, write_gguf
from edgewise.compress.gptq import gptq_quantize
from edgewise.compress.quantize import quantize_matrix
from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile, tensor_nbytes

OUTPUT_TYPE = QT.Q6_K  # the output head's floor (llama.cpp's choice for every type below it)
FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}  # rows not whole super-blocks
FILE_TYPES = {  # general.file_type of a file of one type (the K types' "small" variants are the uniform ones)
    QT.Q8_0: LlamaFileType.MOSTLY_Q8_0, QT.Q5_0: LlamaFileType.MOSTLY_Q5_0, QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: LlamaFileType.MOSTLY_Q4_1, QT.Q6_K: LlamaFileType.MOSTLY_Q6_K, QT.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
    QT.Q4_K: LlamaFileType.MOSTLY_Q4_K_S, QT.Q3_K: LlamaFileType.MOSTLY_Q3_K_S, QT.Q2_K: LlamaFileType.MOSTLY_Q2_K,
}  # fmt: skip


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    source: QT
    target: QT
    why: str  # "" for the requested type, else the rule that chose another

    @property
    def target_bytes(self) -> int:
        return tensor_nbytes(self.target, self.shape)


def output_name(gguf: GGUFFile) -> str:
    return "output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"


def plan_types(gguf: GGUFFile, qtype: QT) -> list[TensorPlan]:
    """The type each tensor of `gguf` gets when compressing to `qtype` (see the module's rules)."""
    if qtype not in FORMATS:
        raise EdgewiseError(f"unknown --type {qtype.name}: edgewise compress writes {', '.join(q.name for q in FORMATS)}")
    plans = []
    head = output_name(gguf)
    for t in gguf.tensors.values():
        target, why = qtype, ""
        if len(t.shape) < 2:
            target, why = t.qtype, "a vector: kept"
        elif t.name == head and FORMATS[qtype].bits_per_weight < FORMATS[OUTPUT_TYPE].bits_per_weight:
            target, why = OUTPUT_TYPE, "output head"
        if target in FORMATS and t.shape[-1] % FORMATS[target].block:
            target, why = FALLBACK[target], f"{t.shape[-1]} columns are no whole {FORMATS[target].block}-blocks"
        if target == t.qtype and not why:
            why = "already this type: bytes kept"
        plans.append(TensorPlan(t.name, t.shape, t.qtype, target, why))
    return plans


def plan_table(plans: list[TensorPlan]) -> str:
    """The plan as a table, tensors of the same role and types grouped (blk.N. dropped)."""
    groups: dict[tuple[str, str, str, str], list[int]] = {}
    for p in plans:
        role = p.name.split(".", 2)[2] if p.name.startswith("blk.") else p.name
        key = (role, p.source.name, p.target.name, p.why)
        groups.setdefault(key, [0, 0])
        groups[key][0] += 1
        groups[key][1] += p.target_bytes
    lines = [f"{'tensor':28s} {'n':>4s} {'from':>6s} {'to':>6s} {'MB':>8s}  note"]
    for (role, src, dst, why), (n, nbytes) in groups.items():
        lines.append(f"{role:28s} {n:4d} {src:>6s} {dst:>6s} {nbytes / 1e6:8.2f}  {why}")
    total = sum(p.target_bytes for p in plans)
    n_weights = sum(int(np.prod(p.shape)) for p in plans)
    lines.append(f"{'total':28s} {len(plans):4d} {'':6s} {'':6s} {total / 1e6:8.2f}  {8 * total / n_weights:.3f} bits per weight")
    return "\n".join(lines)


ROUNDINGS = ("gptq", "search", "plain")  # error-compensating; searched scales, nearest codes; min-max scales, nearest codes


def compress_gguf(
    gguf: GGUFFile,
    out: str | Path,
    qtype: QT,
    moments: dict[str, torch.Tensor] | None = None,
    rounding: str = "search",
    progress: Callable[[int, int], None] | None = None,
) -> list[TensorPlan]:
    """Write `gguf` compressed to `qtype` into `out` (atomically); returns the plan it followed.

    `moments`: tensor name -> its input's second moments (`calibrate.second_moments`): the full Hessian [in, in]
    for "gptq", else (or its diagonal is taken) the mean x^2 per column that weighs the scale search. A tensor
    without them is quantized under plain squared error (GPTQ with H = I is that too). `rounding`: `ROUNDINGS`."""
    if rounding not in ROUNDINGS:
        raise EdgewiseError(f"unknown rounding '{rounding}': choose one of {', '.join(ROUNDINGS)}")
    plans = plan_types(gguf, qtype)
    total = sum(int(np.prod(p.shape)) for p in plans)
    done = 0
    tensors = {}
    for p in plans:
        t = gguf.tensors[p.name]
        if p.target == t.qtype:
            tensors[p.name] = (t.qtype, tensor_bytes(t.raw, t.shape))
        else:
            weight = quants.dequantize(t.raw, t.qtype).reshape(t.shape).astype(np.float32)
            m = (moments or {}).get(p.name)
            if rounding == "gptq" and m is not None and m.dim() == 2:
                raw = gptq_quantize(weight, p.target, m, progress=lambda cols: progress(done + cols * p.shape[0], total) if progress else None)
            else:
                imp = None if m is None or rounding == "plain" else (torch.diagonal(m) if m.dim() == 2 else m).double().numpy()
                raw = quantize_matrix(weight, p.target, imp, search=rounding != "plain")
            tensors[p.name] = (p.target, raw)
        done += int(np.prod(p.shape))
        if progress is not None:
            progress(done, total)
    write_gguf(gguf, out, tensors, metadata={"general.file_type": (int(FILE_TYPES[qtype]), GGUFValueType.UINT32)})
    return plans


@dataclass(frozen=True)
class CompressResult:
    out: Path
    plans: list[TensorPlan]
    source_bytes: int
    out_bytes: int
    calib_tokens: int  # 0: no calibration (plain squared error)

    @property
    def bits_per_weight(self) -> float:
        """Of the tensors' bytes (as llama.cpp counts it; the file adds metadata such as the vocabulary)."""
        return 8 * sum(p.target_bytes for p in self.plans) / sum(int(np.prod(p.shape)) for p in self.plans)


def compress(
    model: str | Path | None,
    out: str | Path,
    qtype: QT,
    calib: str | None = "shakespeare",
    calib_tokens: int = 8192,
    ctx: int = 512,
    rounding: str = "gptq",
    log: Callable[[str], None] = lambda msg: None,
    calib_progress: Callable[[int, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CompressResult:
    """`edgewise compress MODEL OUT --type T`: the model (an embedded name or a GGUF path) quantized to `qtype` by
    `rounding` (`ROUNDINGS`), under statistics from `calib_tokens` tokens of `calib` (a corpus name or a text file;
    None: plain squared error, which "gptq" cannot take)."""
    from edgewise.data.text import load_text
    from edgewise.gguf_io import read_gguf
    from edgewise.lm.tokenizer import TextTokenizer
    from edgewise.models import resolve_model

    if qtype not in FORMATS:
        raise EdgewiseError(f"unknown --type {qtype.name}: edgewise compress writes {', '.join(q.name for q in FORMATS)}")
    if rounding not in ROUNDINGS:
        raise EdgewiseError(f"unknown rounding '{rounding}': choose one of {', '.join(ROUNDINGS)}")
    if rounding == "gptq" and calib is None:
        raise EdgewiseError("GPTQ rounding needs calibration text (--calib); without it, use --rounding search or plain")
    out = Path(out)
    source_path = resolve_model(model)
    if out.is_dir():
        raise EdgewiseError(f"{out} is a directory: give the output GGUF's file name")
    if not out.parent.is_dir():
        raise EdgewiseError(f"{out.parent}: no such folder for the output GGUF")
    if out.exists() and out.resolve() == source_path.resolve():
        raise EdgewiseError(f"{out}: the output would overwrite the source model; give another file name")
    gguf = read_gguf(source_path)
    plans = plan_types(gguf, qtype)
    log(plan_table(plans))
    moments, n_calib = None, 0
    if calib is not None and rounding != "plain":
        from edgewise.compress.calibrate import MIN_CALIB_TOKENS, SINK_WEIGHT, second_moments
        from edgewise.lm.runtime import LanguageModel

        ids = TextTokenizer.from_gguf(gguf).encode(load_text(calib)[: 16 * calib_tokens])[:calib_tokens]  # 16 chars a token is ample
        if len(ids) < MIN_CALIB_TOKENS:
            raise EdgewiseError(f"{calib}: {len(ids)} calibration tokens; the statistics need at least {MIN_CALIB_TOKENS} (a longer text, or --calib-tokens >= {MIN_CALIB_TOKENS})")
        lm = LanguageModel.load(source_path, compile=False)  # the runtime's own forward on the source's weights
        moments = second_moments(lm, ids, ctx, full=rounding == "gptq", sink_weight=SINK_WEIGHT, progress=calib_progress)
        n_calib = len(ids) // min(ctx, lm.cfg.context_length) * min(ctx, lm.cfg.context_length)
        del lm
    compress_gguf(gguf, out, qtype, moments, rounding, progress)
    return CompressResult(out, plans, source_path.stat().st_size, out.stat().st_size, n_calib)
