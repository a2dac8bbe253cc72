"""Decode speed: edgewise against llama.cpp (llama-cpp-python) on the same GGUF, prompt and threads.

Each measurement runs in a fresh worker process, and rounds alternate between engines
(edgewise, llama.cpp, edgewise eager, edgewise, ...), so each engine has the machine to itself,
gets its own peak RSS, and drifts in machine speed hit every engine alike. Both engines get
the same prompt token ids and decode greedily for --new-tokens tokens (end-of-text ignored).

Also reports edgewise's quantized perplexity against the fp32 dequantized model.

    python benchmarks/decode.py                  # full run, writes benchmarks/results/decode.md
    python benchmarks/decode.py --rounds 2 --skip-ppl

The last line is `ratio edgewise/llama.cpp decode = X`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgewise.files import write_text_atomic

PROMPT = (
    "The history of the lighthouse begins in the ancient world, where fires were lit on hilltops to guide ships"
    " safely into harbour. Over the centuries these beacons became towers of stone,"
)
RESULTS = Path(__file__).resolve().parent / "results"


# -- workers: one process, one engine, one timed generation ----------------------------------------
def worker_edgewise(args) -> dict:
    import torch

    from edgewise.lm.runtime import LanguageModel
    from edgewise.metrics.memory import peak_rss_mb

    torch.set_num_threads(args.threads)
    lm = LanguageModel.load(args.model, precision="quant", compile=args.engine == "edgewise", cache_dir=Path(args.cache_dir))
    ids = lm.tokenizer.encode(PROMPT)
    list(lm.generate(ids, 8, stop_at_eot=False))  # warm-up
    out = []
    for _ in range(args.reps):
        list(lm.generate(ids, args.new_tokens, stop_at_eot=False))
        s = lm.last_stats
        out.append({"ttft_s": s.ttft_s, "prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s})
    return {"samples": out, "peak_rss_mb": peak_rss_mb(), "compile_s": lm.compile_s, "prompt_tokens": len(ids)}


def worker_llama(args) -> dict:
    from llama_cpp import Llama
    from llama_cpp_peer import timed_generation

    from edgewise.gguf_io import read_gguf
    from edgewise.lm.tokenizer import TextTokenizer
    from edgewise.metrics.memory import peak_rss_mb
    from edgewise.models import resolve_model

    path = resolve_model(args.model)
    ids = TextTokenizer.from_gguf(read_gguf(path)).encode(PROMPT)
    llm = Llama(str(path), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512, verbose=False)

    def run(n: int) -> dict:
        return timed_generation(llm, ids, n)

    run(8)  # warm-up
    return {"samples": [run(args.new_tokens) for _ in range(args.reps)], "peak_rss_mb": peak_rss_mb(), "compile_s": 0.0, "prompt_tokens": len(ids)}


def worker_ppl(args) -> dict:
    import torch

    from edgewise.data.text import load_text
    from edgewise.lm.runtime import LanguageModel
    from edgewise.metrics.perplexity import perplexity

    torch.set_num_threads(args.threads)
    text = load_text(args.ppl_text)
    result = {}
    for precision in ("fp32", "quant"):
        lm = LanguageModel.load(args.model, precision=precision, compile=False)
        ids = lm.tokenizer.encode(text[: args.ppl_tokens * 8])
        cache = lm.new_cache(args.ppl_ctx)
        r = perplexity(lambda w: lm.prefill(w, cache, last_only=False), ids, args.ppl_ctx, args.ppl_tokens)
        result[precision] = {"ppl": r.ppl, "predictions": r.n_predicted, "windows": r.n_windows}
        del lm
    return result


def run_worker(kind: str, args, engine: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
           "--reps", str(args.reps), "--cache-dir", args.cache_dir, "--ppl-text", args.ppl_text,
           "--ppl-ctx", str(args.ppl_ctx), "--ppl-tokens", str(args.ppl_tokens)]
    if engine:
        cmd += ["--engine", engine]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind}/{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF path (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8, help="worker processes per engine (default 8)")
    p.add_argument("--reps", type=int, default=2, help="timed generations per worker (default 2)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "edgewise" / "aoti"))
    p.add_argument("--fresh-compile", action="store_true", help="compile into an empty cache to report compile time")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--ppl-text", default="shakespeare")
    p.add_argument("--ppl-ctx", type=int, default=1024)
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--worker", choices=("edgewise", "llama", "ppl"), help=argparse.SUPPRESS)
    p.add_argument("--engine", default="edgewise", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        fn = {"edgewise": worker_edgewise, "llama": worker_llama, "ppl": worker_ppl}[args.worker]
        print(json.dumps(fn(args)))
        return

    if args.fresh_compile:
        import tempfile

        args.cache_dir = tempfile.mkdtemp(prefix="edgewise-aoti-")
    engines = [("edgewise", "edgewise", "edgewise (Q4_1/Q8_0 kernels, AOTInductor)"), ("edgewise", "edgewise-eager", "edgewise (Q4_1/Q8_0 kernels, eager)")]
    if llama_available():
        engines.insert(1, ("llama", None, "llama.cpp (llama-cpp-python)"))
    else:
        print("llama-cpp-python is not installed: install it with `scripts/setup.sh --bench` (builds llama.cpp, ~6 min); "
              "reporting edgewise alone", file=sys.stderr)

    print("compiling / loading the cached decode step ...", file=sys.stderr)
    first = run_worker("edgewise", argparse.Namespace(**{**vars(args), "reps": 1}), "edgewise")
    compile_s = first["compile_s"]
    results = {label: [] for *_, label in engines}
    per_round = {label: [] for *_, label in engines}  # each round's median decode tok/s, for paired ratios
    rss = {label: [] for *_, label in engines}
    try:
        from tqdm import tqdm

        bar = tqdm(total=args.rounds * len(engines), desc="rounds", file=sys.stderr)
    except ImportError:
        bar = None
    for _ in range(args.rounds):
        for kind, engine, label in engines:
            r = run_worker(kind, args, engine)
            results[label] += r["samples"]
            per_round[label].append(statistics.median(x["decode_tok_s"] for x in r["samples"]))
            rss[label].append(r["peak_rss_mb"])
            prompt_tokens = r["prompt_tokens"]
            if bar:
                bar.update()
    if bar:
        bar.close()

    med = {label: {k: statistics.median(s[k] for s in samples) for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")} for label, samples in results.items()}
    lines = [
        f"# Decode benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        f"Model: {Path(args.model).name if args.model else 'SmolLM2-135M-Instruct Q4_1 (embedded)'}; prompt {prompt_tokens} tokens;"
        f" {args.new_tokens} greedy tokens; {args.threads} threads; {args.rounds} alternating worker processes x {args.reps}"
        f" timed generations per engine (medians of {args.rounds * args.reps}).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {__import__('torch').__version__}.",
        f"AOTInductor compile: {compile_s:.1f} s ({'fresh' if compile_s else 'cached package: run with --fresh-compile to time it'}).",
        "",
        "| engine | TTFT (ms) | prefill (tok/s) | decode (tok/s) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, m in med.items():
        lines.append(f"| {label} | {m['ttft_s'] * 1000:.1f} | {m['prefill_tok_s']:.0f} | {m['decode_tok_s']:.1f} | {statistics.median(rss[label]):.0f} |")

    if not args.skip_ppl:
        print("perplexity: fp32 dequantized vs quantized ...", file=sys.stderr)
        ppl = run_worker("ppl", args)
        rel = ppl["quant"]["ppl"] / ppl["fp32"]["ppl"] - 1
        lines += [
            "",
            f"Perplexity on {args.ppl_text}, first {args.ppl_tokens} tokens, windows of {args.ppl_ctx}"
            f" ({ppl['fp32']['predictions']} predictions):",
            "",
            "| weights | ppl |",
            "|---|---:|",
            f"| fp32 (dequantized GGUF, reference) | {ppl['fp32']['ppl']:.4f} |",
            f"| edgewise quant (GGUF Q4_1/Q8_0 weights, activations rounded to int8/int16 per model.ACT_BITS) | {ppl['quant']['ppl']:.4f} ({rel:+.2%}) |",
        ]
    labels = list(med)
    if "llama.cpp (llama-cpp-python)" in med:
        # This machine's speed drifts by +-20% over minutes; adjacent rounds see the same drift.
        paired = sorted(e / l for e, l in zip(per_round[labels[0]], per_round["llama.cpp (llama-cpp-python)"]))
        lines += [
            "",
            f"Paired per-round decode ratios (edgewise round r / llama.cpp round r): min {paired[0]:.2f},"
            f" median {statistics.median(paired):.2f}, max {paired[-1]:.2f} over {len(paired)} rounds.",
        ]
        ratio = med[labels[0]]["decode_tok_s"] / med["llama.cpp (llama-cpp-python)"]["decode_tok_s"]
        lines += ["", f"ratio edgewise/llama.cpp decode = {ratio:.2f}"]
    report = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "decode.md", report)
    print(report, end="")


if __name__ == "__main__":
    main()
