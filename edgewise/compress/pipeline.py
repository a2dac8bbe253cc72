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

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, LlamaFileType, quants

from edgewise.compress.blocks import FORMATS
from edgewise.compress.calibrate import SINK_WEIGHT
from edgewise.compress.distill import DISTILL_LR
from edgewise.compress.gguf_write import tensor_bytes, write_gguf
from edgewise.compress.gptq import calibration_loss, gptq_quantize, inverse_cholesky
from edgewise.compress.mixed import SENSITIVITY_TOKENS, KLProbe, Rung, RungStore, choose, mixed_rungs, predict_kl, size_range
from edgewise.compress.quantize import quantize_matrix
from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile, GGUFTensor, read_gguf, tensor_nbytes
from edgewise.lm.config import ModelConfig
from edgewise.sizes import UNITS

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
    kl: float | None = None  # a mixed plan's predicted loss of this choice (`mixed`: KL nats per token)

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
    """The plan as a table, tensors of the same role and types grouped (blk.N. dropped); a mixed plan adds each
    group's predicted KL (nats per token, summed over its tensors)."""
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for p in plans:
        role = p.name.split(".", 2)[2] if p.name.startswith("blk.") else p.name
        key = (role, p.source.name, p.target.name, p.why)
        groups.setdefault(key, [0, 0, 0.0])
        groups[key][0] += 1
        groups[key][1] += p.target_bytes
        groups[key][2] += p.kl or 0.0
    mixed = any(p.kl is not None for p in plans)
    kl_head = f" {'pred. KL':>9s}" if mixed else ""
    lines = [f"{'tensor':28s} {'n':>4s} {'from':>6s} {'to':>6s} {'MB':>8s}{kl_head}  note"]
    for (role, src, dst, why), (n, nbytes, kl) in sorted(groups.items(), key=lambda g: (g[0][0], -g[1][1])) if mixed else groups.items():
        kl_cell = f" {kl:9.5f}" if mixed else ""
        lines.append(f"{role:28s} {n:4d} {src:>6s} {dst:>6s} {nbytes / MB:8.2f}{kl_cell}  {why}")
    total = sum(p.target_bytes for p in plans)
    n_weights = sum(int(np.prod(p.shape)) for p in plans)
    kl_total = f" {sum(p.kl or 0.0 for p in plans):9.5f}" if mixed else ""
    lines.append(f"{'total':28s} {len(plans):4d} {'':6s} {'':6s} {total / MB:8.2f}{kl_total}  {8 * total / n_weights:.3f} bits per weight (MB: 2^20 bytes)")
    return "\n".join(lines)


MB = UNITS["m"]  # sizes as --size counts them (`edgewise.sizes`)
ROUNDINGS = ("gptq", "search", "plain")  # error-compensating; searched scales, nearest codes; min-max scales, nearest codes


def source_weight(t: GGUFTensor) -> np.ndarray:
    """The reference: the source tensor's fp32 dequantization."""
    return quants.dequantize(t.raw, t.qtype).reshape(t.shape).astype(np.float32)


def quantize_tensor(
    weight: np.ndarray, qtype: QT, moment: torch.Tensor | None, rounding: str, progress: Callable[[int], None] | None = None, factor=None
) -> np.ndarray:
    """One matrix's GGUF bytes in `qtype` by `rounding`, under its input's second moments `moment` (the Hessian
    [in, in] for GPTQ, else its diagonal weighs the scale search; None: plain squared error). `factor`: GPTQ's
    `inverse_cholesky(moment)`, where the caller rounds one matrix into several types."""
    if rounding == "gptq" and moment is not None and moment.dim() == 2:
        return gptq_quantize(weight, qtype, moment, progress=progress, factor=factor)
    imp = None if moment is None or rounding == "plain" else (torch.diagonal(moment) if moment.dim() == 2 else moment).double().numpy()
    return quantize_matrix(weight, qtype, imp, search=rounding != "plain")


def rounding_loss(weight: np.ndarray, raw: np.ndarray, qtype: QT, moment: torch.Tensor | None) -> float:
    """The layer's calibration loss tr(dW H dW^T) (with only H's diagonal, or none, the weighted squared error)."""
    deq = quants.dequantize(raw, qtype).reshape(weight.shape)
    if moment is not None and moment.dim() == 2:
        return calibration_loss(weight, deq, moment)
    delta = deq.astype(np.float64) - weight
    return float((delta * delta * (1.0 if moment is None else moment.double().numpy())).sum())


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
            m = (moments or {}).get(p.name)
            raw = quantize_tensor(source_weight(t), p.target, m, rounding, lambda cols: progress(done + cols * p.shape[0], total) if progress else None)
            tensors[p.name] = (p.target, raw)
        done += int(np.prod(p.shape))
        if progress is not None:
            progress(done, total)
    write_gguf(gguf, out, tensors, metadata={"general.file_type": (int(FILE_TYPES[qtype]), GGUFValueType.UINT32)})
    return plans


def measure_rungs(
    gguf: GGUFFile,
    moments: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]],
    windows: torch.Tensor,
    rounding: str = "gptq",
    progress: Callable[[int, int], None] | None = None,
    sensitivity_progress: Callable[[int, int], None] | None = None,
    store: RungStore | None = None,
) -> dict[str, list[Rung]]:
    """Every tensor's rungs (`mixed_rungs`), each quantized by `rounding` with its calibration loss, and their
    predicted KL: each tensor's lowest rung measured on the calibration `windows` [W, T] (token ids) by `KLProbe`,
    the rest scaled from it (`mixed.predict_kl`). Then `write_mixed` makes a file of any size from them.
    `moments`: the calibration statistics, or a function that computes them (called only if a tensor is still to
    be rounded). `store`: where each step's result is kept as it is made, and taken from on a rerun."""
    rungs = mixed_rungs(gguf)
    todo = [name for name, rs in rungs.items() if len(rs) > 1 and not (store is not None and store.load(name, rs))]
    total = sum(int(np.prod(gguf.tensors[n].shape)) * (len(rungs[n]) - 1) for n in todo)
    done = 0
    if todo and callable(moments):
        moments = moments()
    for name in todo:
        rs, t = rungs[name], gguf.tensors[name]
        weight, m = source_weight(t), moments.get(name)
        factor = inverse_cholesky(m) if rounding == "gptq" and m is not None and m.dim() == 2 and len(rs) > 2 else None  # once for its rungs
        for r in rs[:-1]:
            r.raw = quantize_tensor(weight, r.qtype, m, rounding, lambda cols: progress(done + cols * t.shape[0], total) if progress else None, factor)
            r.proxy = rounding_loss(weight, r.raw, r.qtype, m)
            done += weight.size
            if progress is not None:
                progress(done, total)
        if store is not None:
            store.save(name, rs)
    measured = [name for name, rs in rungs.items() if len(rs) > 1]
    kls = dict(store.kls) if store is not None else {}
    probe = KLProbe(gguf, windows) if any(name not in kls for name in measured) else None
    for i, name in enumerate(measured):
        t, lowest = gguf.tensors[name], rungs[name][0]
        if name not in kls:
            kls[name] = probe.kl(GGUFTensor(name, lowest.qtype, t.shape, lowest.raw))
            if store is not None:
                store.save_kl(name, kls[name])
        predict_kl(rungs[name], kls[name])
        if sensitivity_progress is not None:
            sensitivity_progress(i + 1, len(measured))
    return rungs


def rung_identity(gguf: GGUFFile, rounding: str, ids: list[int], ctx: int, windows: torch.Tensor) -> dict:
    """What a `RungStore` of `measure_rungs` on `gguf` depends on: the source file, the rounding, and the
    calibration (its tokens, window length and the sensitivity windows, by hash)."""
    import hashlib

    return {
        "source": [gguf.path.name, gguf.path.stat().st_size], "rounding": rounding, "ctx": ctx, "sink_weight": SINK_WEIGHT,
        "calibration": hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest(),
        "windows": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest(), "shape": list(windows.shape),
    }


def write_mixed(gguf: GGUFFile, out: str | Path, rungs: dict[str, list[Rung]], budget: int) -> list[TensorPlan]:
    """Write `gguf` into `out` with the rung per tensor that `mixed.choose` picks for `budget` bytes of tensors;
    returns the plan it followed."""
    pick = choose(rungs, budget)  # refuses a budget below the smallest plan
    plans, tensors, weights_of = [], {}, {}
    for name, r in pick.items():
        t = gguf.tensors[name]
        why = "" if not r.is_source else "a vector: kept" if len(t.shape) < 2 else "source bytes kept"
        plans.append(TensorPlan(name, t.shape, t.qtype, r.qtype, why, r.kl if len(rungs[name]) > 1 else None))
        tensors[name] = (r.qtype, tensor_bytes(t.raw, t.shape) if r.is_source else r.raw)
        if len(t.shape) >= 2:
            weights_of[r.qtype] = weights_of.get(r.qtype, 0) + int(np.prod(t.shape))
    main_type = max(weights_of, key=weights_of.get)  # the file's type in general.file_type: the one most weights take
    metadata = {"general.file_type": (int(FILE_TYPES[main_type]), GGUFValueType.UINT32)} if main_type in FILE_TYPES else None
    write_gguf(gguf, out, tensors, metadata=metadata)
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


def file_overhead(gguf: GGUFFile) -> int:
    """Bytes of a file beyond its tensors' (header, metadata such as the vocabulary, alignment), with a margin for
    the alignment of tensors whose sizes change: what a --size budget leaves for tensors is the size less this."""
    return gguf.path.stat().st_size - sum(t.nbytes for t in gguf.tensors.values()) + 32 * len(gguf.tensors)


def tensor_budget(gguf: GGUFFile, size: int | None = None, bpw: float | None = None) -> int:
    """The tensors' bytes for a target file `size` or bits per weight `bpw`; refused, with the reachable range,
    when no mixed plan reaches it or the source is already that small."""
    low, high = size_range(gguf)
    n_weights = sum(int(np.prod(t.shape)) for t in gguf.tensors.values())
    overhead = file_overhead(gguf)
    reach = (f"reachable from {gguf.path.name}: --size {(low + overhead) / MB:.2f}MB to {(high + overhead) / MB:.2f}MB, "
             f"--bpw {8 * low / n_weights:.3f} to {8 * high / n_weights:.3f} (every matrix at its smallest type; the source)")
    budget = size - overhead if size is not None else int(bpw * n_weights / 8)
    if budget < low or budget >= high:
        asked = f"--size {size / MB:.2f}MB" if size is not None else f"--bpw {bpw}"
        raise EdgewiseError(f"{asked} is out of range: {reach}")
    return budget


def ffn_keep(ffn_dim: int, fraction: float) -> int:
    """FFN neurons kept when `fraction` of them are pruned: a multiple of 256 (the K-quants' rows) where the width
    allows, else of 32, and at least one such block."""
    step = 256 if ffn_dim % 256 == 0 and ffn_dim >= 512 else 32
    return max(step, int(round(ffn_dim * (1 - fraction) / step)) * step)


def shape_model(
    gguf: GGUFFile,
    ids: list[int],
    work: Path,
    ctx: int,
    rounding: str,
    prune_ffn: float = 0.0,
    drop_layers: int = 0,
    distill_steps: int = 0,
    distill_lr: float = DISTILL_LR,
    checkpoint: Path | None = None,
    prune_heads: float = 0.0,
    sensitivity_tokens: int = SENSITIVITY_TOKENS,
    log: Callable[[str], None] = lambda msg: None,
    calib_progress: Callable[[int, int], None] | None = None,
    distill_progress: Callable[[int, int, float], None] | None = None,
    teacher_progress: Callable[[int, int], None] | None = None,
) -> GGUFFile:
    """The source made smaller before quantization: `prune_ffn` of every FFN's neurons, `prune_heads` of every
    layer's query heads (as many from each KV group) and the `drop_layers` least important layers pruned (`prune`), then `distill_steps` of distillation against the source (`distill`). Files
    go to `work` (a folder the caller removes). Returns the student."""
    from edgewise.compress.calibrate import second_moments
    from edgewise.compress.distill import DISTILL_CTX, distill
    from edgewise.compress.prune import ffn_importance, head_importance, heads_kept, parameter_count, plan_pruning, prune_gguf
    from edgewise.lm.runtime import LanguageModel

    cfg = ModelConfig.from_gguf(gguf)
    group = cfg.n_heads // cfg.n_kv_heads
    per_group = heads_kept(group, prune_heads)
    if prune_heads > 0 and per_group == group:
        raise EdgewiseError(
            f"--prune-heads {prune_heads} removes no head of {gguf.path.name}: each of its {cfg.n_kv_heads} K/V heads serves {group} query heads and at least one stays"
            + (" (a head with its own K/V head cannot be pruned here)" if group == 1 else f"; give more than {0.5 / group:.3g}")
        )
    student = gguf
    if prune_ffn > 0 or prune_heads > 0 or drop_layers > 0:
        lm = LanguageModel.load(gguf.path, compile=False)
        moments = second_moments(lm, ids, ctx, full=rounding == "gptq", sink_weight=SINK_WEIGHT, progress=calib_progress)
        del lm
        drop: tuple[int, ...] = ()
        if drop_layers:
            width = min(ctx, sensitivity_tokens)
            probe = KLProbe(gguf, torch.tensor(ids[: max(1, sensitivity_tokens // width) * width]).reshape(-1, width))
            kls = [probe.kl_skipping(i) for i in range(cfg.n_layers)]
            del probe
            drop = tuple(sorted(int(i) for i in np.argsort(kls)[:drop_layers]))
            log("KL when each layer alone is skipped (nats per token): " + " ".join(f"{i}:{kl:.3f}" for i, kl in enumerate(kls)))
            log(f"dropping layers {list(drop)}")
        keep = ffn_keep(cfg.ffn_dim, prune_ffn)
        plan = plan_pruning(ffn_importance(gguf, moments), keep, drop, head_importance(gguf, moments) if per_group < group else None, cfg.n_kv_heads, per_group)
        pruned = prune_gguf(gguf, work / "pruned.gguf", plan, moments, rounding)
        student = read_gguf(pruned)
        log(f"pruned: FFN {cfg.ffn_dim} -> {keep} neurons a layer, {cfg.n_heads} -> {per_group * cfg.n_kv_heads} query heads a layer, "
            f"{cfg.n_layers} -> {cfg.n_layers - len(drop)} layers, "
            f"{parameter_count(gguf) / 1e6:.1f}M -> {parameter_count(student) / 1e6:.1f}M parameters")
    if distill_steps:
        result = distill(gguf, student, work / "distilled.gguf", ids, distill_steps, ctx=min(ctx, DISTILL_CTX), lr=distill_lr, checkpoint=checkpoint, progress=distill_progress,
                         teacher_progress=teacher_progress)
        log(f"distilled {result.steps} steps{f' (resumed at {result.resumed_at})' if result.resumed_at else ''}: "
            f"KL {result.first_kl:.3f} -> {result.last_kl:.3f} nats per token (the run's first step; its last tenth)")
        student = read_gguf(result.out)
    return student


def compress(
    model: str | Path | None,
    out: str | Path,
    qtype: QT | None = None,
    calib: str | None = "shakespeare",
    calib_tokens: int = 8192,
    ctx: int = 512,
    rounding: str = "gptq",
    size: int | None = None,
    bpw: float | None = None,
    sensitivity_tokens: int = SENSITIVITY_TOKENS,
    prune_ffn: float = 0.0,
    drop_layers: int = 0,
    distill_steps: int = 0,
    distill_lr: float = DISTILL_LR,
    prune_heads: float = 0.0,
    log: Callable[[str], None] = lambda msg: None,
    calib_progress: Callable[[int, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    sensitivity_progress: Callable[[int, int], None] | None = None,
    distill_progress: Callable[[int, int, float], None] | None = None,
    teacher_progress: Callable[[int, int], None] | None = None,
) -> CompressResult:
    """`edgewise compress MODEL OUT --type T | --size S | --bpw B`: the model (an embedded name or a GGUF path)
    quantized to `qtype`, or to a type per matrix chosen for a file of `size` bytes or `bpw` bits per weight
    (`measure_rungs`, `write_mixed`: sensitivity measured on `sensitivity_tokens` of the calibration text), rounded by
    `rounding` (`ROUNDINGS`) under statistics from `calib_tokens` tokens of `calib` (a corpus name or a text file;
    None: plain squared error, which "gptq" and a mixed plan cannot take).

    First, optionally (`shape_model`): `prune_ffn` of every FFN's neurons, `prune_heads` of its query heads and
    `drop_layers` layers pruned, and
    `distill_steps` of distillation against the source (checkpointed beside `out`, so a rerun resumes); the
    quantization then calibrates on that student. Pruning alone may skip the quantization (types kept)."""
    import shutil

    from edgewise.data.text import load_text
    from edgewise.lm.tokenizer import TextTokenizer
    from edgewise.models import resolve_model

    targets = (qtype is not None) + (size is not None) + (bpw is not None)
    shaping = prune_ffn > 0 or prune_heads > 0 or drop_layers > 0 or distill_steps > 0
    if targets > 1 or (targets == 0 and not shaping):
        raise EdgewiseError("give exactly one of --type, --size or --bpw (or only pruning: --prune-ffn, --prune-heads, --drop-layers)")
    if distill_steps and not targets:
        raise EdgewiseError("distillation trains the matrices in fp32: give --type, --size or --bpw to quantize them")
    if not 0 <= prune_ffn < 1 or not 0 <= prune_heads < 1 or drop_layers < 0 or distill_steps < 0:
        raise EdgewiseError(f"--prune-ffn and --prune-heads must be in [0, 1) (got {prune_ffn}, {prune_heads}); --drop-layers and --distill-steps at least 0")
    if shaping and calib is None:
        raise EdgewiseError("pruning and distillation need calibration text (--calib): importance and the teacher's answers come from it")
    if qtype is not None and qtype not in FORMATS:
        raise EdgewiseError(f"unknown --type {qtype.name}: edgewise compress writes {', '.join(q.name for q in FORMATS)}")
    if rounding not in ROUNDINGS:
        raise EdgewiseError(f"unknown rounding '{rounding}': choose one of {', '.join(ROUNDINGS)}")
    mixed = size is not None or bpw is not None
    if mixed and calib is None:
        raise EdgewiseError("a plan for --size or --bpw measures each tensor's sensitivity on calibration text: give --calib")
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
    ids: list[int] = []
    if calib is not None and (rounding != "plain" or mixed or shaping):
        from edgewise.compress.calibrate import MIN_CALIB_TOKENS

        ids = TextTokenizer.from_gguf(gguf).encode(load_text(calib)[: 16 * calib_tokens])[:calib_tokens]  # 16 chars a token is ample
        if len(ids) < MIN_CALIB_TOKENS:
            raise EdgewiseError(f"{calib}: {len(ids)} calibration tokens; the statistics need at least {MIN_CALIB_TOKENS} (a longer text, or --calib-tokens >= {MIN_CALIB_TOKENS})")
    if targets and not shaping:
        return _quantize(gguf, out, qtype, size, bpw, ids, ctx, rounding, sensitivity_tokens, log, calib_progress, progress, sensitivity_progress,
                         store=out.parent / f"{out.name}.rungs")
    work = out.parent / f".tmp-{os.getpid()}-shape-{out.name}"
    work.mkdir()
    try:
        student = shape_model(gguf, ids, work, min(ctx, ModelConfig.from_gguf(gguf).context_length), rounding, prune_ffn=prune_ffn, prune_heads=prune_heads,
                              drop_layers=drop_layers, distill_steps=distill_steps, distill_lr=distill_lr, checkpoint=out.parent / f"{out.name}.distill",
                              sensitivity_tokens=sensitivity_tokens, log=log, calib_progress=calib_progress, distill_progress=distill_progress,
                              teacher_progress=teacher_progress)
        if targets:
            result = _quantize(student, out, qtype, size, bpw, ids, ctx, rounding, sensitivity_tokens, log, calib_progress, progress, sensitivity_progress)
        else:
            os.replace(student.path, out)
            plans = [TensorPlan(t.name, t.shape, t.qtype, t.qtype, "pruned") for t in read_gguf(out).tensors.values()]
            result = CompressResult(out, plans, gguf.path.stat().st_size, out.stat().st_size, len(ids))
        (out.parent / f"{out.name}.distill").unlink(missing_ok=True)
        return dataclasses.replace(result, source_bytes=gguf.path.stat().st_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quantize(gguf: GGUFFile, out: Path, qtype: QT | None, size: int | None, bpw: float | None, ids: list[int], ctx: int, rounding: str,
              sensitivity_tokens: int, log, calib_progress, progress, sensitivity_progress, store: Path | None = None) -> CompressResult:
    """`compress`'s quantization of `gguf` (the source, or the student `shape_model` made) into `out`. `store`: a
    mixed plan's measurement is kept in this folder as it goes (`RungStore`), so a rerun resumes; removed once
    `out` is written."""
    import shutil

    mixed = qtype is None
    if mixed:
        budget = tensor_budget(gguf, size, bpw)
    else:
        plans = plan_types(gguf, qtype)
        log(plan_table(plans))
    ctx = min(ctx, ModelConfig.from_gguf(gguf).context_length)
    n_calib = len(ids) // ctx * ctx if ids else 0

    def calibrate() -> dict[str, torch.Tensor]:
        from edgewise.compress.calibrate import second_moments
        from edgewise.lm.runtime import LanguageModel

        if not ids:
            return {}
        lm = LanguageModel.load(gguf.path, compile=False)  # the runtime's own forward on the source's weights
        return second_moments(lm, ids, ctx, full=rounding == "gptq", sink_weight=SINK_WEIGHT, progress=calib_progress)

    if mixed:
        width = min(ctx, sensitivity_tokens)
        windows = torch.tensor(ids[: max(1, min(len(ids), sensitivity_tokens) // width) * width]).reshape(-1, width)
        rung_store = None if store is None else RungStore(store, rung_identity(gguf, rounding, ids, ctx, windows))
        if rung_store is not None and rung_store.started:
            log(f"resuming the measurement kept in {store}")
        rungs = measure_rungs(gguf, calibrate, windows, rounding, progress, sensitivity_progress, rung_store)
        plans = write_mixed(gguf, out, rungs, budget)
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
        log(plan_table(plans))
    else:
        compress_gguf(gguf, out, qtype, calibrate() if ids else None, rounding, progress)
    return CompressResult(out, plans, gguf.path.stat().st_size, out.stat().st_size, n_calib)
