"""Decoding a model whose weights exceed the RAM it may use, each engine inside the same memory cap.

Every engine runs in a fresh worker process inside a cgroup-v1 memory group (`edgewise.metrics.memcap`):
the cap counts anonymous memory *and* page cache, and the GGUF is evicted from the page cache before
each run, so no engine reads its weights for free from an earlier one. Engines:

- **edgewise stream**: `StreamingLanguageModel`, its weight budget = the cap minus --overhead (torch,
  the KV cache, Python); the FFN weights that do not fit stream through the prefetch ring (depth 2).
- **edgewise naive** (the paper's baseline): only what every token needs resident (attention, norms,
  output head), every FFN weight read every token, ring depth 1 (no read ahead of the layer in use).
- **llama.cpp** (llama-cpp-python), mmap on, mlock off: its weights page through the capped page cache.

All decode the same prompt's token ids greedily for --new-tokens tokens (end-of-text ignored), with 2
threads (edgewise: its thread governor's choice). Reported per engine: decode tok/s (median over
--rounds), bytes read per token and the time the compute waited on reads (edgewise), the group's peak
memory, and whether the cap killed it. The bound: bytes per token at the probed direct-read
throughput (`edgewise flash probe`; else the built-in default) plus the compute time of the same
model uncapped with every weight resident; with reads fully hidden behind compute, the floor is the
larger of the two.

    python benchmarks/flash_stream.py --quick              # the 900MB cap only
    python benchmarks/flash_stream.py --caps 640MB,900MB,1.2GB,1.6GB

Its last lines: `ratio stream/llama.cpp decode at CAP = X` and `ratio stream/naive decode at CAP = Y`
for the headline cap, and `fraction of bound at CAP = Z`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "# A small library of string utilities\n\ndef reverse_words(sentence: str) -> str:\n"


def worker(args) -> dict:
    """Runs inside the cap: load, decode, report one JSON line."""
    if args.engine == "llama.cpp":
        import llama_cpp

        from benchmarks.llama_cpp_peer import timed_generation
        from edgewise.lm.tokenizer import TextTokenizer
        from edgewise.gguf_io import read_gguf

        ids = TextTokenizer.from_gguf(read_gguf(args.gguf)).encode(PROMPT)
        llm = llama_cpp.Llama(args.gguf, n_ctx=512, n_threads=2, use_mmap=True, use_mlock=False, verbose=False)
        r = timed_generation(llm, ids, args.new_tokens)
        return {"decode_tok_s": r["decode_tok_s"], "rss_anon_mb": _rss_anon_mb()}
    from edgewise.flash.runtime import StreamingLanguageModel
    from edgewise.lm.runtime import LanguageModel

    if args.engine == "dense":
        lm = LanguageModel.load(args.gguf, compile=False)
    else:
        budget = args.budget
        if args.engine == "naive":  # the minimum: required parts plus a one-buffer ring
            from edgewise.flash.residency import model_parts
            from edgewise.gguf_io import read_gguf

            parts = model_parts(read_gguf(args.gguf))
            largest_layer = max(sum(p.nbytes for p in parts if p.layer == i) for i in {p.layer for p in parts if p.layer >= 0})
            budget = sum(p.nbytes for p in parts if p.required) + largest_layer
        lm = StreamingLanguageModel.open(args.gguf, budget=budget, ring_depth=2 if args.engine == "stream" else 1)
    ids = lm.tokenizer.encode(PROMPT)
    list(lm.generate(ids, args.new_tokens, stop_at_eot=False))
    stats = lm.last_stats
    out = {"decode_tok_s": stats.decode_tok_s, "rss_anon_mb": _rss_anon_mb()}
    ring = getattr(lm, "ring", None)
    if ring is not None:
        steps = args.new_tokens + 1  # the prompt's pass and one per generated token (the last is not decoded)
        out.update(bytes_per_token=lm.plan.bytes_per_token, read_gbps=ring.stats.bytes_read / max(ring.stats.read_s, 1e-9) / 1e9,
                   wait_s_per_token=ring.stats.wait_s / steps, resident_mb=lm.plan.resident_bytes / 1e6, ring_mb=lm.plan.ring_bytes / 1e6)
    return out


def _rss_anon_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(engine: str, gguf: str, cap: int | None, args) -> dict:
    from edgewise.metrics import memcap

    cmd = [sys.executable, __file__, "--worker", engine, "--gguf", gguf, "--new-tokens", str(args.new_tokens)]
    if cap is not None:
        cmd += ["--budget", str(max(cap - args.overhead, 1))]
        done = memcap.run_capped(cmd, cap, evict_files=[gguf], env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
        if done.returncode != 0:
            return {"killed": done.killed_by_limit, "error": done.stderr.strip().splitlines()[-1:] if not done.killed_by_limit else [], "peak_mb": done.peak_bytes / 1e6}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["peak_mb"] = done.peak_bytes / 1e6
        return result
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed uncapped:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--caps", default="900MB", help="memory caps, comma-separated (default 900MB)")
    ap.add_argument("--quick", action="store_true", help="the 900MB cap only, 1 round")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--overhead", default="300MB", help="what edgewise's weight budget leaves of the cap for torch, the KV cache and Python (default 300MB)")
    ap.add_argument("--out", default=str(RESULTS / "flash_stream.md"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.engine = args.worker
        print(json.dumps(worker(args)))
        return 0

    from edgewise.files import write_text_atomic
    from edgewise.flash.engine import load_cost_model
    from edgewise.metrics import memcap
    from edgewise.models import resolve_model
    from edgewise.sizes import parse_size

    if not memcap.available():
        raise SystemExit("this benchmark needs a writable cgroup-v1 memory controller (root); see edgewise/metrics/memcap.py")
    gguf = str(resolve_model(args.model))
    args.overhead = parse_size(args.overhead, what="--overhead")
    caps = [parse_size("900MB")] if args.quick else [parse_size(c, what="--caps") for c in args.caps.split(",")]
    try:
        import llama_cpp  # noqa: F401

        engines = ["stream", "naive", "llama.cpp"]
    except ImportError:
        engines = ["stream", "naive"]
    dense = run("dense", gguf, None, args)  # uncapped, every weight resident: the compute time of a token
    rows = {}
    for cap in caps:
        for engine in engines:
            results = [run(engine, gguf, cap, args) for _ in range(args.rounds)]
            ok = [r for r in results if "decode_tok_s" in r]
            rows[(cap, engine)] = {**(ok[-1] if ok else results[-1]), "decode_tok_s": statistics.median(r["decode_tok_s"] for r in ok) if ok else None}
    cost = load_cost_model(Path(gguf).parent)
    gbps = cost.gbps[-1]
    compute_s = 1 / dense["decode_tok_s"]
    lines = [
        f"# Flash streaming under a memory cap: {args.model}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs. {args.new_tokens} greedy tokens after a {len(PROMPT)}-character code prompt; medians of {args.rounds} round(s).",
        f"Caps are cgroup-v1 memory limits (page cache counted; the GGUF evicted before each run). edgewise's weight budget = cap - {args.overhead >> 20} MiB.",
        f"Uncapped dense edgewise (eager): {dense['decode_tok_s']:.2f} tok/s = {compute_s * 1000:.0f} ms compute per token. Disk: {gbps:.2f} GB/s at {cost.sizes[-1] >> 10} KiB reads (cost model).",
        "",
        "| cap | engine | decode tok/s | MB read/token | read GB/s | wait ms/token | resident MB | peak MB (group) | bound tok/s (serial / overlapped) | fraction of overlapped bound |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for (cap, engine), r in rows.items():
        if r.get("decode_tok_s") is None:
            lines.append(f"| {cap >> 20} MiB | {engine} | {'killed by the cap' if r.get('killed') else 'failed: ' + ' '.join(r.get('error', []))} | | | | | {r['peak_mb']:.0f} | | |")
            continue
        bpt = r.get("bytes_per_token")
        bound = ""
        fraction = ""
        if bpt is not None:
            serial, overlapped = bpt / (gbps * 1e9) + compute_s, max(bpt / (gbps * 1e9), compute_s)
            bound = f"{1 / serial:.2f} / {1 / overlapped:.2f}"
            r["fraction"] = r["decode_tok_s"] * overlapped  # of the floor: reads fully hidden behind compute
            fraction = f"{r['fraction']:.2f}"
        lines.append(
            f"| {cap >> 20} MiB | {engine} | {r['decode_tok_s']:.2f} | {'' if bpt is None else f'{bpt / 1e6:.0f}'} | {r.get('read_gbps', float('nan')):.2f} | "
            f"{r.get('wait_s_per_token', float('nan')) * 1000:.0f} | {r.get('resident_mb', float('nan')):.0f} | {r['peak_mb']:.0f} | {bound} | {fraction} |"
        )
    head = caps[0] if args.quick else min(caps, key=lambda c: abs(c - parse_size("900MB")))
    tail = []
    stream = rows.get((head, "stream"), {})
    for peer in ("llama.cpp", "naive"):
        other = rows.get((head, peer), {})
        if stream.get("decode_tok_s") and other.get("decode_tok_s"):
            tail.append(f"ratio stream/{peer} decode at {head >> 20} MiB = {stream['decode_tok_s'] / other['decode_tok_s']:.2f}")
        elif stream.get("decode_tok_s"):
            tail.append(f"ratio stream/{peer} decode at {head >> 20} MiB = n/a ({peer} {'killed by the cap' if other.get('killed') else 'did not run'})")
    if "fraction" in stream:
        tail.append(f"fraction of bound at {head >> 20} MiB = {stream['fraction']:.2f}")
    text = "\n".join(lines + ["", "```", *tail, "```", ""])
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
