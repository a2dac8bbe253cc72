"""edgewise compress against llama.cpp's own quantizer, at equal types and at equal sizes, on the same source and
calibration text.

For each --types entry (edgewise's block type, and llama.cpp's file type of the same name or its uniform "_S"
variant), files from the same source GGUF:
- llama.cpp: `llama-quantize --allow-requantize SRC OUT TYPE`, without and with an importance matrix from
  `llama-imatrix` on the calibration text; and with the matrix and the output head (a tied embedding) lowered to
  the type too (`--output-tensor-type`, `--token-embedding-type`: llama.cpp's smallest file of that type);
- edgewise: `compress(..., rounding=plain|search|gptq)` on the same text (plain takes none);
- edgewise-mixed: a type per matrix (`measure_rungs` once, then `write_mixed`), one file at the size of each
  llama.cpp-imatrix file that a mixed plan can reach (equal size or smaller). The measurement is kept in
  WORK/MODEL.rungs/ as it goes (over two hours on Qwen2.5-Coder-1.5B on 2 cores): an interrupted run resumes it;
- edgewise-pruned, edgewise-pruned+distilled: the model pruned once (`compress` with pruning alone), quantized as it is and after
  `distill` against the source (checkpointed, so an interrupted run resumes).
Each file's decode speed on edgewise's runtime (eager, 2 threads, median of 3 runs of 48 tokens) is reported too.
Each file's held-out perplexity is measured twice on the same text file: by edgewise's runtime (windows of --ctx,
every position scored) and by `llama-perplexity` (its own rule: windows of --ctx, the second half of each scored),
so each column ranks the files by one rule. The reference for every loss is the source GGUF, dequantized: the
sources are already quantized (SmolLM2-135M is Q4_1, Qwen2.5-Coder-1.5B Q4_K_M); its own perplexity is row 1.

Needs llama.cpp's tools: `scripts/build-llama-tools.sh` (about 9 minutes on 2 cores, once).

    python benchmarks/compress.py                        # SmolLM2-135M: Q4_0 and Q2_K (about 40 minutes)
    python benchmarks/compress.py --model qwen2.5-coder-1.5b --types Q3_K --no-mixed --prune none --eval-chars 8000   # ~45 min

Writes benchmarks/results/compress[_MODEL].md and a PNG of perplexity against file size (MiB). Its last lines:
`ratio ppl edgewise/llama.cpp-imatrix [TYPE] [MODEL] = X` per type (below 1: edgewise's file is better), then
`ratio ppl edgewise/llama.cpp-imatrix at B bpw [MODEL] = X` for B = 3.5 and 4.5: the llama.cpp-imatrix file
nearest B bits per weight (within 0.3), against the best edgewise quantization of the whole model (search, gptq or mixed) of equal or smaller size; where neither
tool can make a file that small, the line says so and why.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch starts its threads, as the CLI does: idle-waiting workers decode slower

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from edgewise.cli.args import progress_bar
from edgewise.compress.calibrate import SINK_WEIGHT, second_moments
from edgewise.compress.mixed import SENSITIVITY_TOKENS, size_range
from edgewise.compress.blocks import FORMATS
from edgewise.compress.mixed import RungStore
from edgewise.compress.distill import DISTILL_CTX, DISTILL_LR, distill
from edgewise.compress.pipeline import FALLBACK, MB, compress, compress_gguf, measure_rungs, rung_identity, tensor_budget, write_mixed
from edgewise.data.text import load_text
from edgewise.errors import EdgewiseError
from edgewise.files import write_text_atomic
from edgewise.gguf_io import read_gguf
from edgewise.lm.runtime import LanguageModel
from edgewise.lm.tokenizer import TextTokenizer
from edgewise.metrics.perplexity import perplexity
from edgewise.metrics.speed import median_decode_tok_s
from edgewise.models import resolve_model

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "build" / "llama-tools" / "bin"
LLAMA_TYPES = {QT.Q4_0: "Q4_0", QT.Q4_1: "Q4_1", QT.Q5_0: "Q5_0", QT.Q8_0: "Q8_0", QT.Q6_K: "Q6_K", QT.Q5_K: "Q5_K_S", QT.Q4_K: "Q4_K_S", QT.Q3_K: "Q3_K_S", QT.Q2_K: "Q2_K"}


def run(cmd: list[str], log: Path) -> str:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(proc.stdout)
    if proc.returncode:
        sys.exit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")
    return proc.stdout


def edgewise_ppl(path: Path, text: str, ctx: int, check: bool = False) -> tuple[float, float]:
    """Held-out perplexity on edgewise's runtime: every position scored, and by llama-perplexity's rule (second halves),
    both from one forward pass per window (tokenizers that add no BOS see the same windows under both rules).
    `check`: score the second rule again with `perplexity(scoring="llama.cpp")` and require the same number."""
    lm = LanguageModel.load(path, compile=False)
    cache = lm.new_cache(ctx)
    ids = lm.tokenizer.encode(text)
    bos = lm.tokenizer.bos_id if lm.tokenizer.add_bos else None
    half = [0.0, 0]
    first = ctx // 2

    def logits_of(window):
        out = lm.prefill(window, cache, last_only=False)
        half[0] += float(F.cross_entropy(out[first:-1], torch.tensor(window[first + 1 :]), reduction="sum"))
        half[1] += len(window) - 1 - first
        return out

    every = perplexity(logits_of, ids, ctx).ppl
    if bos is not None or check:
        rule = perplexity(lambda w: lm.prefill(w, cache, last_only=False), ids, ctx, scoring="llama.cpp", bos_id=bos).ppl
        if bos is None and abs(rule / math.exp(half[0] / half[1]) - 1) > 1e-9:
            sys.exit(f"second-half scoring disagrees with perplexity(scoring='llama.cpp'): {math.exp(half[0] / half[1])} vs {rule}")
        return every, rule
    return every, math.exp(half[0] / half[1])


def llama_ppl(path: Path, text_file: Path, ctx: int, log: Path) -> float:
    out = run([str(TOOLS / "llama-perplexity"), "-m", str(path), "-f", str(text_file), "-c", str(ctx), "-t", "2", "-b", str(ctx)], log)
    for line in reversed(out.splitlines()):
        if "Final estimate: PPL =" in line:
            return float(line.split("PPL =")[1].split()[0])
    sys.exit(f"llama-perplexity printed no final estimate; see {log}")


def decode_tok_s(path: Path) -> float:
    """Median decode tok/s on edgewise's runtime (eager: no AOT compile per file; 2 threads fixed), 3 runs of 48 tokens."""
    return median_decode_tok_s(LanguageModel.load(path, compile=False, threads=2))


def check_predictions(source, rungs: dict, windows: torch.Tensor, n: int = 6) -> list[tuple[str, str, float, float]]:
    """The KL of rungs above the lowest, as predicted (lowest rung's KL times the ratio of calibration losses) and as
    measured by the same probe, for `n` tensors spread over the model that have such rungs."""
    from edgewise.compress.mixed import KLProbe
    from edgewise.gguf_io import GGUFTensor

    names = [name for name, rs in rungs.items() if sum(not r.is_source for r in rs) >= 2]
    probe = KLProbe(source, windows)
    out = []
    for name in names[:: max(1, len(names) // n)][:n]:
        for r in [r for r in rungs[name] if not r.is_source][1:]:
            measured = probe.kl(GGUFTensor(name, r.qtype, source.tensors[name].shape, r.raw))
            out.append((name, r.qtype.name, r.kl, measured))
    return out


def tensor_bpw(path: Path) -> float:
    """Bits per weight of the tensors' bytes (as llama.cpp counts it; the file adds metadata)."""
    g = read_gguf(path)
    return 8 * sum(t.nbytes for t in g.tensors.values()) / sum(math.prod(t.shape) for t in g.tensors.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="Q4_0,Q2_K", help="comma-separated edgewise types (default Q4_0,Q2_K)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (Shakespeare, the head of the text)")
    ap.add_argument("--eval-chars", type=int, default=16000, help="held-out text: the head of Austen, this many characters")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prune", default="0.33,6,100", metavar="FFN,LAYERS,STEPS",
                    help="the pruned rows: share of FFN neurons removed, layers dropped, distillation steps (default 0.33,6,100; 'none' skips)")
    ap.add_argument("--no-mixed", action="store_true",
                    help="skip the mixed-precision files (their measurement quantizes every type below the source and probes every tensor: "
                    "about 2 hours on Qwen2.5-Coder-1.5B on 2 cores)")
    ap.add_argument("--prune-heads", type=float, default=0.0, metavar="FRACTION",
                    help="in the pruned rows, also this share of every layer's query heads (as many from each KV group; default 0)")
    ap.add_argument("--distill-lr", type=float, default=DISTILL_LR, metavar="LR",
                    help=f"AdamW's peak learning rate in the distillation (default {DISTILL_LR:g}; lower for larger models: on Qwen2.5-Coder-1.5B "
                    "1e-4 raised the KL on the windows it trained on)")
    ap.add_argument("--prune-type", default="Q4_0", help="the pruned model's quantization type (default Q4_0)")
    ap.add_argument("--work", default=str(ROOT / "build" / "compress-bench"), help="folder for the files (kept for reuse)")
    args = ap.parse_args()
    if not (TOOLS / "llama-quantize").exists():
        sys.exit(f"llama.cpp's tools are missing from {TOOLS}: run scripts/build-llama-tools.sh first (about 9 minutes)")
    types = [QT[t.strip().upper()] for t in args.types.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "tools.log"
    src = resolve_model(args.model)
    calib_file, eval_file = work / "calib.txt", work / "heldout.txt"
    calib_file.write_text(load_text("shakespeare")[: 16 * args.calib_tokens])  # both quantizers read this file
    eval_text = load_text("austen")[: args.eval_chars]
    eval_file.write_text(eval_text)
    chunks = args.calib_tokens // args.ctx

    imatrix = work / f"{src.stem}.imatrix.gguf"
    if not imatrix.exists():
        run([str(TOOLS / "llama-imatrix"), "-m", str(src), "-f", str(calib_file), "-o", str(imatrix), "-c", str(args.ctx), "--chunks", str(chunks), "-t", "2"], log)

    source = read_gguf(src)
    n_weights = sum(math.prod(t.shape) for t in source.tensors.values())
    ids = TextTokenizer.from_gguf(source).encode(calib_file.read_text())[: args.calib_tokens]  # the calibration tokens every edgewise step reads
    cached: dict = {}

    def moments():
        """Every layer input's Hessian on the calibration file, as `edgewise compress` computes it (once for all files)."""
        if "m" not in cached:
            t0 = time.perf_counter()
            lm = LanguageModel.load(src, compile=False)
            cached["m"] = second_moments(lm, ids, args.ctx, full=True, sink_weight=SINK_WEIGHT)
            cached["seconds"] = time.perf_counter() - t0
        return cached["m"]

    rows = [("source", "-", src, None)]
    for qtype in types:
        lt = LLAMA_TYPES[qtype]
        head_cols = source.tensors["output.weight" if "output.weight" in source.tensors else "token_embd.weight"].shape[-1]
        head_type = (FALLBACK.get(qtype, qtype) if head_cols % FORMATS[qtype].block else qtype).name.lower()  # llama-quantize has no fallback here
        low_head = ["--output-tensor-type", head_type, "--token-embedding-type", head_type]
        for label, extra in (("llama.cpp", []), ("llama.cpp-imatrix", ["--imatrix", str(imatrix)]), ("llama.cpp-imatrix-head", ["--imatrix", str(imatrix), *low_head])):
            out = work / f"{src.stem}.{label}.{lt}.gguf"
            t0, cached_file = time.perf_counter(), out.exists()
            if not cached_file:
                run([str(TOOLS / "llama-quantize"), "--allow-requantize", *extra, str(src), str(out), lt, "2"], log)
            rows.append((label, lt, out, None if cached_file else time.perf_counter() - t0))
        for rounding in ("plain", "search", "gptq"):
            out = work / f"{src.stem}.edgewise-{rounding}.{qtype.name}.gguf"
            t0, cached_file = time.perf_counter(), out.exists()
            if not cached_file:
                stats = None if rounding == "plain" else moments()
                t0 = time.perf_counter()
                compress_gguf(source, out, qtype, stats, rounding)
            rows.append((f"edgewise-{rounding}", qtype.name, out, None if cached_file else time.perf_counter() - t0))

    # mixed precision at the size of each llama.cpp-imatrix file a mixed plan reaches: one measurement, every size
    low, high = size_range(source)
    rungs: dict = {}
    for label, t, path, _ in list(rows):
        if args.no_mixed or not label.startswith("llama.cpp-imatrix"):
            continue
        size = path.stat().st_size
        out = work / f"{src.stem}.edgewise-mixed.{size}.gguf"
        try:
            budget = tensor_budget(source, size=size)
        except EdgewiseError as exc:
            print(f"no mixed file at {size / MB:.2f} MiB ({label} {t}): {exc}", flush=True)
            continue
        t0, cached_file = time.perf_counter(), out.exists()
        if not cached_file:
            if not rungs:
                windows = torch.tensor(ids[:SENSITIVITY_TOKENS]).reshape(-1, min(args.ctx, SENSITIVITY_TOKENS))
                t1 = time.perf_counter()
                store = RungStore(work / f"{src.stem}.rungs", rung_identity(source, "gptq", ids, args.ctx, windows))  # kept: a rerun resumes or reuses it
                cached["resumed"] = store.started
                rungs.update(measure_rungs(source, moments, windows, "gptq", progress_bar("rounding every type", unit="weight"),
                                           progress_bar("sensitivity", unit="tensor"), store=store))
                cached["mixed_seconds"] = time.perf_counter() - t1
                cached["check"] = check_predictions(source, rungs, windows)
            t0 = time.perf_counter()
            write_mixed(source, out, rungs, budget)
        rows.append(("edgewise-mixed", f"={label.removeprefix('llama.cpp-')} {t}", out, None if cached_file else time.perf_counter() - t0))

    # structured pruning once, then quantized as it is and after distillation (the same calibration file throughout)
    if args.prune != "none":
        frac, drop, steps = args.prune.split(",")
        shape = f"{frac}-{f'h{args.prune_heads}-' if args.prune_heads else ''}{drop}"
        pruned = work / f"{src.stem}.pruned.{shape}.gguf"  # the source's types (ffn_down, attn_output requantized): both rows start here
        lr_tag = "" if args.distill_lr == DISTILL_LR else f"-lr{args.distill_lr:g}"
        distilled = work / f"{src.stem}.pruned.{shape}.distilled-{steps}{lr_tag}.gguf"  # its trained matrices in F32
        made: dict[Path, float] = {}  # seconds of the intermediate files this run made
        if not pruned.exists():  # `edgewise compress` with pruning alone: the pruned model in the source's types
            t0 = time.perf_counter()
            compress(src, pruned, calib=str(calib_file), calib_tokens=args.calib_tokens, ctx=args.ctx, rounding="gptq", prune_ffn=float(frac),
                     prune_heads=args.prune_heads, drop_layers=int(drop), log=lambda m: print(m, flush=True), calib_progress=progress_bar("calibrating", unit="window"))
            made[pruned] = time.perf_counter() - t0
        if int(steps) and not distilled.exists():
            t0 = time.perf_counter()
            r = distill(source, read_gguf(pruned), distilled, ids, int(steps), ctx=min(args.ctx, DISTILL_CTX), lr=args.distill_lr, checkpoint=work / f"{distilled.name}.distill",
                        progress=progress_bar("distilling", postfix=("KL",)), teacher_progress=progress_bar("teacher's answers", unit="layer"))
            print(f"distilled {r.steps} steps: KL {r.first_kl:.3f} -> {r.last_kl:.3f} nats per token (first step; last tenth)", flush=True)
            (work / f"{distilled.name}.distill").unlink(missing_ok=True)  # the checkpoint, once the student is written
            made[distilled] = time.perf_counter() - t0
        heads = f", heads -{args.prune_heads:.0%}" if args.prune_heads else ""
        for label, student_path, n_steps in (("edgewise-pruned", pruned, 0), ("edgewise-pruned+distilled", distilled, int(steps))):
            if label.endswith("distilled") and not n_steps:
                continue
            tag = f"{args.prune_type}, FFN -{float(frac):.0%}{heads}, -{drop} layers" + (f", {n_steps} steps at lr {args.distill_lr:g}" if n_steps else "")
            out = work / f"{src.stem}.{label}.{shape}-{n_steps}{lr_tag if n_steps else ''}.{args.prune_type}.gguf"
            t0, cached_file = time.perf_counter(), out.exists()
            if not cached_file:
                compress(student_path, out, QT[args.prune_type], calib=str(calib_file), calib_tokens=args.calib_tokens, ctx=args.ctx, rounding="gptq",
                         log=lambda m: print(m, flush=True), calib_progress=progress_bar("calibrating", unit="window"), progress=progress_bar("quantizing", unit="weight"))
            secs = (time.perf_counter() - t0 if not cached_file else 0.0) + made.get(student_path, 0.0)
            rows.append((label, tag, out, secs if secs else None))

    results = []
    for label, t, path, secs in rows:
        (ours, ours_half), theirs = edgewise_ppl(path, eval_text, args.ctx, check=label == "source"), llama_ppl(path, eval_file, args.ctx, log)
        speed = decode_tok_s(path)
        results.append((label, t, path.stat().st_size / MB, tensor_bpw(path), ours, theirs, secs, ours_half, speed))
        print(f"{label:22s} {t:9s} {results[-1][2]:8.2f} MiB  ppl {ours:8.3f}  llama.cpp rule: edgewise {ours_half:8.3f} llama.cpp {theirs:8.3f}  decode {speed:5.1f} tok/s", flush=True)

    base = results[0]
    lines = [
        f"# edgewise compress vs llama.cpp's quantizer: {src.name}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores.",
        f"Calibration: the first {args.calib_tokens} tokens of Shakespeare ({chunks} windows of {args.ctx}), the same file for",
        "llama-imatrix and edgewise. Held-out: the first {:,} characters of Austen. The source is already quantized;".format(args.eval_chars),
        "its dequantization is the reference, and its own perplexity is the first row.",
        "`ppl edgewise`: edgewise's runtime, windows of {0}, every position scored; `half`: the same runtime by".format(args.ctx),
        "llama-perplexity's rule (the second half of each window scored); `ppl llama.cpp`: llama-perplexity itself on the same",
        "file and windows: the last two columns cross-check the runtimes. Files kept in " + str(work) + ".",
        (f"edgewise's calibration (every layer input's Hessian, shared by its search, gptq and mixed files) took {cached['seconds']:.0f} s;"
         if "seconds" in cached else "edgewise's shared calibration was made by an earlier run of this script and reused here (its time not measured);"),
        "the seconds column is each file's quantization alone (`-`: the file was made by an earlier run and reused); the pruned row adds the pruning, "
        "the pruned+distilled row the distillation of that pruned model, where this run made them.",
        ("No mixed files (--no-mixed)." if args.no_mixed else (f"The mixed files' measurement (every type below the source quantized by GPTQ, each tensor's KL measured on {SENSITIVITY_TOKENS} "
         f"calibration tokens) took {cached['mixed_seconds']:.0f} s once" + (" (this run resumed it from the store an earlier, interrupted run left: its part only)" if cached.get("resumed") else "")
         + "; their seconds are the choice and the write." if "mixed_seconds" in cached else
         "The mixed files were made by earlier runs (the measurement time is not repeated here).")),
        "`llama.cpp-imatrix-head`: llama.cpp with the matrix and the output head ("
        + ("output.weight, and the token embedding" if "output.weight" in source.tensors else "here the tied embedding") + ") in the type too;"
        " `edgewise-mixed =imatrix T`: a type per matrix at the size of the llama.cpp-imatrix file of type T (equal or smaller; `=imatrix-head T`: of that file).",
        f"A mixed plan of {src.name} reaches {8 * low / n_weights:.2f} to {8 * high / n_weights:.2f} bits per weight "
        "(every matrix at its smallest type; the source). decode: edgewise's runtime, eager, 2 threads, median of 3 runs of 48 tokens.",
        "",
        "| method | type | MiB | bits/weight | ppl edgewise | vs source | half, edgewise | ppl llama.cpp | vs source | decode tok/s | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, t, mb, bpw, ours, theirs, secs, ours_half, speed in results:
        lines.append(
            f"| {label} | {t} | {mb:.2f} | {bpw:.3f} | {ours:.3f} | {ours / base[4] - 1:+.1%} | {ours_half:.3f} | {theirs:.3f} | {theirs / base[5] - 1:+.1%} | {speed:.1f} | {'-' if secs is None else f'{secs:.0f}'} |"
        )
    lines.append("")
    if cached.get("check"):
        lines += ["Mixed precision's loss model: the KL of a tensor at a type above its smallest, predicted from the smallest type's",
                  "measured KL by the ratio of calibration losses, against the same probe's measurement:", "",
                  "| tensor | type | predicted KL | measured KL | ratio |", "|---|---|---:|---:|---:|"]
        lines += [f"| {name} | {t} | {pred:.5f} | {meas:.5f} | {pred / meas if meas else float('nan'):.2f} |" for name, t, pred, meas in cached["check"]]
        lines.append("")
    by = {(r[0], r[1]): r for r in results}
    tail = []
    for qtype in types:
        ours, peer = by.get(("edgewise-gptq", qtype.name)), by.get(("llama.cpp-imatrix", LLAMA_TYPES[qtype]))
        best = min((by[(m, qtype.name)] for m in ("edgewise-search", "edgewise-gptq")), key=lambda r: r[4])
        tail.append(f"ratio ppl edgewise/llama.cpp-imatrix [{qtype.name}] [{args.model}] = {best[4] / peer[4]:.4f}"
                    f" (edgewise-{best[0].split('-')[1]} {best[2]:.1f} MiB, llama.cpp {peer[2]:.1f} MiB; gptq {ours[4] / peer[4]:.4f})")
    peers = [r for r in results if r[0].startswith("llama.cpp-imatrix")]
    ours_all = [r for r in results if r[0] in ("edgewise-search", "edgewise-gptq", "edgewise-mixed")]  # quantizers of the whole model: pruned rows answer the last line
    for target in (3.5, 4.5):
        near = [r for r in peers if abs(r[3] - target) <= 0.3]
        if not near:
            nearest = min(peers, key=lambda r: abs(r[3] - target))
            tail.append(f"ratio ppl edgewise/llama.cpp-imatrix at {target} bpw [{args.model}] = n/a: llama.cpp's nearest file is {nearest[3]:.2f} bpw "
                        f"and a mixed edgewise plan reaches {8 * low / n_weights:.2f}-{8 * high / n_weights:.2f} bpw (rows that are no whole 256-blocks take no K-quant)"
                        if target < 8 * low / n_weights else
                        f"ratio ppl edgewise/llama.cpp-imatrix at {target} bpw [{args.model}] = n/a: llama.cpp's nearest file is {nearest[3]:.2f} bpw")
            continue
        peer = min(near, key=lambda r: abs(r[3] - target))
        fits = [r for r in ours_all if r[2] <= peer[2] + 1e-9]
        if not fits:
            tail.append(f"ratio ppl edgewise/llama.cpp-imatrix at {target} bpw [{args.model}] = n/a: no edgewise file at or below {peer[2]:.1f} MiB")
            continue
        best = min(fits, key=lambda r: r[4])
        tail.append(f"ratio ppl edgewise/llama.cpp-imatrix at {target} bpw [{args.model}] = {best[4] / peer[4]:.4f}"
                    f" ({best[0]} {best[1]} {best[3]:.2f} bpw {best[2]:.1f} MiB vs {peer[0]} {peer[1]} {peer[3]:.2f} bpw {peer[2]:.1f} MiB)")
    pruned = [r for r in results if r[0] == "edgewise-pruned+distilled"]
    if pruned:
        r = pruned[-1]
        tail.append(f"pruned+distilled [{args.model}]: size = {r[2]:.1f} MB, ppl = {r[4]:.2f}, decode tok/s = {r[8]:.1f}"
                    f" (source: {base[2]:.1f} MB, ppl {base[4]:.2f}, {base[8]:.1f} tok/s: {r[8] / base[8]:.2f}x the speed, ppl {r[4] / base[4] - 1:+.0%}; {r[1]})")
    lines += ["```", *tail, "```", ""]
    _plot(results, work / "compress.png", src.name)
    name = "compress" if args.model == "smollm2-135m" else f"compress_{args.model}"
    png = ROOT / "benchmarks" / "results" / f"{name}.png"
    png.write_bytes((work / "compress.png").read_bytes())
    lines.insert(2, f"![perplexity against size]({png.name})\n")
    write_text_atomic(ROOT / "benchmarks" / "results" / f"{name}.md", "\n".join(lines))
    print("\n".join(tail))
    return 0


def _plot(results, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("llama.cpp", "s"), ("llama.cpp-imatrix", "D"), ("llama.cpp-imatrix-head", "d"), ("edgewise-plain", "x"), ("edgewise-search", "^"),
                           ("edgewise-gptq", "o"), ("edgewise-mixed", "*"), ("edgewise-pruned", "v"), ("edgewise-pruned+distilled", "P")):
        pts = sorted((r[2], r[4], r[1]) for r in results if r[0] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
    src = results[0]
    ax.axhline(src[4], color="gray", linestyle=":", label="source")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("held-out perplexity (edgewise runtime)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
