"""Decode speed: edgewise against llama.cpp (llama-cpp-python) on the same GGUF, prompt and threads,
for each embedded model, on a quiet machine and beside one competing CPU-bound process; and the
first run's time to the first token with an empty compile cache.

Each measurement runs in a fresh worker process, and engines alternate round by round (edgewise,
llama.cpp, llama.cpp 1 thread, edgewise, ...), so each gets its own peak RSS and drifts in machine
speed hit every engine alike. All get the same prompt token ids and decode greedily for --new-tokens
tokens (end-of-text ignored). edgewise runs as a user gets it: compiled decode step, threads chosen
by its governor (the cores other processes leave free, measured). llama.cpp gets --threads (2 here,
its quiet best), and in the busy phase also 1 thread: the best static choice beside a competitor.

"Busy" is one `python -c "while True: pass"` at normal priority, started before the worker and
killed after it.

First token fresh: a worker loads the model with an empty AOTInductor cache (the native kernels are
built at setup) and streams 32 tokens; it reports the seconds from the model being loaded to its
first token, and the decode speed of that first run (eager while the step compiles in the
background). The timed rounds then run from the cache that background compile filled: the compiled
speed "by the second run".

Also reports each model's quantized perplexity against its fp32 dequantized self (--ppl).

    python benchmarks/decode.py                                   # all three models, writes benchmarks/results/decode.md
    python benchmarks/decode.py --models smollm2-135m --rounds 2

Its last lines: `ratio edgewise/llama.cpp decode [MODEL] = X` and `... decode busy [MODEL] = Y` per model,
`busy/quiet edgewise [MODEL] = R`, and `first token fresh s = Z` (the largest over the models).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgewise.files import write_text_atomic

PROMPTS = {
    "default": (
        "The history of the lighthouse begins in the ancient world, where fires were lit on hilltops to guide ships"
        " safely into harbour. Over the centuries these beacons became towers of stone,"
    ),
    "qwen2.5-coder-1.5b": "# A small library of string utilities\n\ndef reverse_words(sentence: str) -> str:\n",
}
PROMPT = PROMPTS["default"]  # benchmarks/flash_smollm2.py uses it too
MODELS = ("smollm2-135m", "gemma-3-270m", "qwen2.5-coder-1.5b")
RESULTS = Path(__file__).resolve().parent / "results"


def prompt_for(model: str) -> str:
    return PROMPTS.get(model, PROMPTS["default"])


# -- workers: one process, one engine, one timed generation ----------------------------------------
def worker_edgewise(args) -> dict:
    from edgewise.lm.runtime import LanguageModel
    from edgewise.metrics.memory import peak_rss_mb

    lm = LanguageModel.load(args.model, precision="quant", compile=True, wait_for_compile=True, cache_dir=Path(args.cache_dir))
    ids = lm.tokenizer.encode(prompt_for(args.model))
    list(lm.generate(ids, 8, stop_at_eot=False))  # warm-up
    out = []
    for _ in range(args.reps):
        list(lm.generate(ids, args.new_tokens, stop_at_eot=False))
        s = lm.last_stats
        out.append({"ttft_s": s.ttft_s, "prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s, "threads": s.threads})
    return {"samples": out, "peak_rss_mb": peak_rss_mb(), "compile_s": lm.compile_s, "prompt_tokens": len(ids)}


def worker_fresh(args) -> dict:
    """First run on an empty cache: seconds from loaded to the first token, the first run's decode speed."""
    from edgewise.lm.runtime import LanguageModel

    t0 = time.perf_counter()
    lm = LanguageModel.load(args.model, precision="quant", compile=True, cache_dir=Path(args.cache_dir))
    t_loaded = time.perf_counter()
    ids = lm.tokenizer.encode(prompt_for(args.model))
    t_first = None
    for _ in lm.generate(ids, 32, stop_at_eot=False):
        if t_first is None:
            t_first = time.perf_counter()
    first_decode = lm.last_stats.decode_tok_s
    background = lm.background
    t_compiled = None
    if background is not None:  # wait for the step so the timed rounds start compiled
        background.wait()
        t_compiled = time.perf_counter()
    return {"load_s": t_loaded - t0, "first_token_s": t_first - t_loaded, "first_run_decode_tok_s": first_decode,
            "compiled_after_s": None if t_compiled is None else t_compiled - t_loaded, "compiled": background is None or background.decoder is not None}


def worker_llama(args) -> dict:
    from llama_cpp import Llama
    from llama_cpp_peer import timed_generation

    from edgewise.gguf_io import read_gguf
    from edgewise.lm.tokenizer import TextTokenizer
    from edgewise.metrics.memory import peak_rss_mb
    from edgewise.models import resolve_model

    path = resolve_model(args.model)
    ids = TextTokenizer.from_gguf(read_gguf(path)).encode(prompt_for(args.model))
    llm = Llama(str(path), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512, verbose=False)

    def run(n: int) -> dict:
        return timed_generation(llm, ids, n)

    run(8)  # warm-up
    return {"samples": [run(args.new_tokens) for _ in range(args.reps)], "peak_rss_mb": peak_rss_mb(), "compile_s": 0.0, "prompt_tokens": len(ids)}


def worker_ppl(args) -> dict:
    from edgewise.data.text import load_text
    from edgewise.lm.runtime import LanguageModel
    from edgewise.metrics.perplexity import perplexity

    text = load_text(args.ppl_text)
    result = {}
    for precision in ("fp32", "quant"):
        lm = LanguageModel.load(args.model, precision=precision, compile=False)
        ids = lm.tokenizer.encode(text[: args.ppl_tokens * 8])
        cache = lm.new_cache(args.ppl_ctx)
        r = perplexity(lambda w, lm=lm: lm.prefill(w, cache, last_only=False), ids, args.ppl_ctx, args.ppl_tokens)
        result[precision] = {"ppl": r.ppl, "predictions": r.n_predicted, "windows": r.n_windows}
        del lm  # before the next precision loads: two models at once would double the peak
    return result


def run_worker(kind: str, args, model: str, threads: int | None = None, busy: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--threads", str(threads or args.threads), "--new-tokens", str(args.new_tokens),
           "--reps", str(args.reps), "--cache-dir", args.cache_dir, "--ppl-text", args.ppl_text,
           "--ppl-ctx", str(args.ppl_ctx), "--ppl-tokens", str(args.ppl_tokens)]
    env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog is not None:
            time.sleep(0.5)  # the competitor is running before the worker starts
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} ({model}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


EW = "edgewise (compiled, adaptive threads)"
LL = "llama.cpp (llama-cpp-python)"
LL1 = "llama.cpp, 1 thread"


def bench_model(args, model: str, bar) -> tuple[list[str], dict]:
    engines = [("edgewise", EW, None)]
    if llama_available():
        engines.append(("llama", LL, args.threads))
    phases = [("quiet", False), ("busy", True)]
    results = {(phase, label): [] for phase, _ in phases for _, label, _ in engines + [("llama", LL1, 1)]}
    rss = {key: [] for key in results}
    per_round = {key: [] for key in results}
    prompt_tokens = compile_s = 0
    for phase, busy in phases:
        phase_engines = engines + ([("llama", LL1, 1)] if busy and llama_available() else [])
        for _ in range(args.rounds):
            for kind, label, threads in phase_engines:
                r = run_worker(kind, args, model, threads=threads, busy=busy)
                results[(phase, label)] += r["samples"]
                per_round[(phase, label)].append(statistics.median(x["decode_tok_s"] for x in r["samples"]))
                rss[(phase, label)].append(r["peak_rss_mb"])
                prompt_tokens, compile_s = r["prompt_tokens"], max(compile_s, r["compile_s"])
                bar.update()
    lines = [f"## {model}", "", f"Prompt {prompt_tokens} tokens; {args.new_tokens} greedy tokens.", "",
             "| phase | engine | threads | TTFT (ms) | prefill (tok/s) | decode (tok/s) | peak RSS (MB) |", "|---|---|---|---:|---:|---:|---:|"]
    med = {}
    for (phase, label), samples in results.items():
        if not samples:
            continue
        m = {k: statistics.median(s[k] for s in samples) for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")}
        med[(phase, label)] = m
        threads = "/".join(sorted({str(s.get("threads", "")) for s in samples})) if label == EW else ("1" if label == LL1 else str(args.threads))
        lines.append(f"| {phase} | {label} | {threads} | {m['ttft_s'] * 1000:.1f} | {m['prefill_tok_s']:.0f} | {m['decode_tok_s']:.1f} | {statistics.median(rss[(phase, label)]):.0f} |")
    ratios = {}
    if ("quiet", LL) in med:
        for phase in ("quiet", "busy"):
            paired = sorted(e / l for e, l in zip(per_round[(phase, EW)], per_round[(phase, LL)]))
            ratios[phase] = med[(phase, EW)]["decode_tok_s"] / med[(phase, LL)]["decode_tok_s"]
            lines.append(f"\n{phase}: paired per-round ratios edgewise/llama.cpp: min {paired[0]:.2f}, median {statistics.median(paired):.2f}, max {paired[-1]:.2f} over {len(paired)} rounds.")
        if ("busy", LL1) in med:
            ratios["busy1"] = med[("busy", EW)]["decode_tok_s"] / med[("busy", LL1)]["decode_tok_s"]
    ratios["busy/quiet"] = med[("busy", EW)]["decode_tok_s"] / med[("quiet", EW)]["decode_tok_s"]
    if not args.skip_ppl:
        ppl = run_worker("ppl", args, model)
        rel = ppl["quant"]["ppl"] / ppl["fp32"]["ppl"] - 1
        lines += ["", f"Perplexity on {args.ppl_text}, first {args.ppl_tokens} tokens, windows of {args.ppl_ctx} ({ppl['fp32']['predictions']} predictions):"
                  f" fp32 dequantized {ppl['fp32']['ppl']:.4f}, edgewise quant {ppl['quant']['ppl']:.4f} ({rel:+.2%})."]
        ratios["ppl"] = rel
    return lines, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"embedded model names or GGUF paths (default: {' '.join(MODELS)})")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (default 2); edgewise chooses its own")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="worker processes per engine and phase (default 3)")
    p.add_argument("--reps", type=int, default=2, help="timed generations per worker (default 2)")
    p.add_argument("--cache-dir", default=None, help="AOTInductor cache (default: a fresh temporary one, so the first-run time is real)")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--ppl-text", default="shakespeare")
    p.add_argument("--ppl-ctx", type=int, default=512)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--worker", choices=("edgewise", "llama", "ppl", "fresh"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        fn = {"edgewise": worker_edgewise, "llama": worker_llama, "ppl": worker_ppl, "fresh": worker_fresh}[args.worker]
        print(json.dumps(fn(args)))
        return

    fresh_cache = args.cache_dir is None
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="edgewise-aoti-")
    if not llama_available():
        print("llama-cpp-python is not installed: install it with `scripts/setup.sh --bench` (builds llama.cpp, ~6 min); "
              "reporting edgewise alone", file=sys.stderr)
    from tqdm import tqdm

    fresh = {}
    for model in args.models:
        print(f"{model}: first run on {'an empty' if fresh_cache else 'the given'} compile cache ...", file=sys.stderr)
        fresh[model] = run_worker("fresh", args, model)
    n_engines = 1 + llama_available()
    bar = tqdm(total=len(args.models) * args.rounds * (2 * n_engines + llama_available()), desc="rounds", file=sys.stderr)
    sections, ratios = [], {}
    for model in args.models:
        lines, ratios[model] = bench_model(args, model, bar)
        sections += lines + [""]
    bar.close()

    lines = [
        f"# Decode benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        f"{args.rounds} alternating worker processes x {args.reps} timed generations per engine and phase (medians);"
        f" llama.cpp {args.threads} threads (and 1 when busy); edgewise its adaptive thread count.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {__import__('torch').__version__}."
        " Busy: one `python -c 'while True: pass'` at normal priority beside every worker.",
        "",
        "## First run, empty compile cache",
        "",
        "| model | load (s) | loaded -> first token (s) | first run decode (tok/s, eager while compiling) | step compiled after (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, f in fresh.items():
        after = "cached" if f["compiled_after_s"] is None else f"{f['compiled_after_s']:.0f}"
        lines.append(f"| {model} | {f['load_s']:.1f} | {f['first_token_s']:.2f} | {f['first_run_decode_tok_s']:.1f} | {after} |")
    lines += [""] + sections
    tail = []
    for model, r in ratios.items():
        if "quiet" in r:
            tail.append(f"ratio edgewise/llama.cpp decode [{model}] = {r['quiet']:.2f}")
    for model, r in ratios.items():
        if "busy" in r:
            tail.append(f"ratio edgewise/llama.cpp decode busy [{model}] = {r['busy']:.2f}")
            if "busy1" in r:
                tail.append(f"ratio edgewise/llama.cpp-1-thread decode busy [{model}] = {r['busy1']:.2f}")
    for model, r in ratios.items():
        tail.append(f"busy/quiet edgewise [{model}] = {r['busy/quiet']:.2f}")
    tail.append(f"first token fresh s = {max(f['first_token_s'] for f in fresh.values()):.2f}")
    report = "\n".join(lines + tail) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "decode.md", report)
    print(report, end="")


if __name__ == "__main__":
    main()
