"""Flash inference on Qwen2.5-Coder-1.5B: decoding a model whose weights exceed the memory it may use,
every engine inside a memory cap that counts page cache, measured against the disk's physical bound.

Each run is a fresh worker process inside a cgroup-v1 memory group (`edgewise.metrics.memcap`): the
limit counts anonymous memory *and* page cache, and the GGUF is evicted from the page cache first, so no
engine reads weights for free from an earlier run. Engines:

- **dense**: edgewise with every weight in RAM, no cap: the compute time of a token (eager).
- **naive** (the paper's baseline): attention, norms and output head resident; every FFN weight read
  from the GGUF with O_DIRECT every token, in layer order, one buffer, so no read overlaps compute
  (its reads are as large as stream's: the same timed choice).
- **stream**: edgewise's residency plan (parts by use per byte, `edgewise.flash.residency`) keeps what
  fits the weight budget; the rest streams through the prefetch ring (depth 2, 8 reader threads, direct
  reads of 256 KiB or 1 MiB, whichever its reads measure faster: `edgewise.flash.stream`) while the
  layers before compute; the compute leaves one CPU to the reader threads where its passes measure
  faster so (`edgewise.lm.threads.HoldBack`).
- **flash**: stream plus speculative decoding with prompt-lookup drafts of up to 4 tokens (greedy output
  unchanged), each pass checking as many as its measured cost per token favours (`DraftPolicy`): a pass
  reads the streamed weights once for every token it yields.
- **llama.cpp** (llama-cpp-python, 2 threads, mmap on, mlock off), as shipped (CPU repacking of Q4_K
  weights into anonymous memory), and **llama.cpp no-repack** (`use_extra_bufts` off: weights stay
  in the mapped file, so the page cache can hold them).

Two views of equal memory:
(a) the same total cap for all (the user's view): a sweep of caps, headline 900 MB (80% of the file).
    edgewise's weight budget is the cap minus its measured overhead and --margin.
(b) half the weights (the paper's setting): each engine's cap is its own overhead plus 50% of the
    GGUF's bytes (plus --margin). Overhead = steady-state anonymous memory at the end of an uncapped
    generation (/proc/self/status RssAnon) minus the weight bytes the engine holds itself (edgewise:
    resident weights and ring; llama.cpp as shipped: its repacked weights, taken as its RssAnon minus
    no-repack's).

The bound: bytes read per token at the disk's measured O_DIRECT throughput for the ring's reads, with the dense compute
time; overlapped, the floor is the larger of the two. For flash, per pass, divided by the tokens a pass yields. The
throughput is measured around each run: a probe of the GGUF itself (8 threads, the faster of the ring's read sizes) just
before the run and one just after, the better of the two, or the run's own reads where they were faster. This VM's disk
moves by 2x from one minute to the next (2.5 to 4.5 GB/s within ten minutes of one run), so a bound from another
minute is not the bound of this run. The report also gives each run's fraction against the fastest the disk measured
anywhere in the benchmark (the stricter figure earlier versions reported).

    python benchmarks/flash.py --quick     # (a) at 900 MB and (b), a few minutes
    python benchmarks/flash.py             # + the cap sweep 640 MB .. 1.6 GB, one busy phase, the plot

Writes benchmarks/results/flash.md (--quick: flash_quick.md) and flash.png. Its last lines:
`ratio flash/llama.cpp decode = X` (900 MB, against llama.cpp's best configuration there),
`ratio flash/naive decode = Y`, `fraction of bound = Z` and `bytes per token flash/naive = W` (half the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ENGINES = ("naive", "stream", "flash", "llama.cpp", "llama.cpp no-repack")
ABLATION = ("stream, 1 buffer", "stream, every CPU computing", "stream, 1 MiB reads", "stream, 256 KiB reads")  # stream with one thing changed, at half the weights
FIXED_READ = {"stream, 1 MiB reads": 1 << 20, "stream, 256 KiB reads": 256 << 10}  # ablation engines whose read size is fixed, not timed
MB = 1e6


PPL_CTX, PPL_TOKENS = 512, 1024  # held-out perplexity: two windows of 512 tokens, the start of the held-out file
SPARSITIES = (0.25, 0.4, 0.5)  # TEAL's input sparsity levels, measured in the ablation


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (edgewise's dense compute ran 3.4x faster on an AVX-512 EPYC
    than on an AVX2 one: results/flash_zen5.md against flash.md), for the report's header."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    widest = "AVX-512" + (" BF16" if "avx512_bf16" in flags else "") if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({widest})"


def stdlib_code(name: str) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / name


def code_prompt(chars: int = 2400) -> tuple[str, str]:
    """Real code the model has not been handed by us: the start of the standard library's json/encoder.py, whole lines."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py"
    text = path.read_text()
    return text[: text.rfind("\n", 0, chars) + 1], f"the first {chars} characters (whole lines) of {path.name} from Python {platform.python_version()}'s standard library"


# -- the worker: one engine, one generation, one JSON line -------------------------------------------
def worker(args) -> dict:
    prompt, _ = code_prompt()
    if args.engine.startswith("llama.cpp"):
        import llama_cpp
        import llama_cpp.llama as llama_module

        from benchmarks.llama_cpp_peer import timed_generation

        if args.engine == "llama.cpp no-repack":  # llama-cpp-python exposes no switch: set the C default it starts from
            default_params = llama_module.llama_cpp.llama_model_default_params

            def no_repack():
                params = default_params()
                params.use_extra_bufts = False
                return params

            llama_module.llama_cpp.llama_model_default_params = no_repack
        llm = llama_cpp.Llama(args.gguf, n_ctx=2048, n_threads=2, use_mmap=True, use_mlock=False, verbose=False)
        ids = llm.tokenize(prompt.encode())
        r = timed_generation(llm, ids, args.new_tokens)
        return {"decode_tok_s": r["decode_tok_s"], "anon_mb": _rss_anon_mb()}

    from edgewise.flash.runtime import StreamingLanguageModel
    from edgewise.lm.runtime import LanguageModel
    from edgewise.lm.speculative import PromptLookup

    if args.engine.startswith("ppl"):
        return ppl_worker(args)
    if args.engine == "dense":
        lm = LanguageModel.load(args.gguf, compile=False)
    else:
        budget = args.budget
        if args.engine == "naive":  # the minimum: the required parts and one layer's buffer
            from edgewise.flash.residency import model_parts
            from edgewise.gguf_io import read_gguf

            parts = model_parts(read_gguf(args.gguf))
            layers = {p.layer for p in parts if p.layer >= 0}
            budget = sum(p.nbytes for p in parts if p.required) + max(sum(p.nbytes for p in parts if p.layer == i) for i in layers)
        lm = StreamingLanguageModel.open(args.gguf, budget=budget, ring_depth=1 if args.engine in ("naive", "stream, 1 buffer") else 2,
                                         read_sizes=(FIXED_READ[args.engine],) if args.engine in FIXED_READ else None)
        if args.engine == "stream, every CPU computing":  # no CPU held back for the reader (edgewise.lm.threads.HoldBack)
            lm.governor.hold_back = None
    ids = lm.tokenizer.encode(prompt)
    lookup = PromptLookup(draft=4) if args.engine.startswith("flash") else None
    list(lm.generate(ids, args.new_tokens, stop_at_eot=False, lookup=lookup))
    stats = lm.last_stats
    out = {"decode_tok_s": stats.decode_tok_s, "anon_mb": _rss_anon_mb(), "new_tokens": stats.new_tokens}
    if lm.governor.hold_back is not None:
        out["hold_back"] = lm.governor.hold_back.line(lm.governor.free_threads)
    if getattr(lm, "ring", None) is not None and lm.ring.read_size_line():
        out["read_sizes"] = lm.ring.read_size_line()
    passes = stats.speculation.passes if stats.speculation else stats.new_tokens - 1  # decode passes after the prompt's
    out["tokens_per_pass"] = (stats.new_tokens - 1) / passes
    if stats.speculation:
        out["acceptance"] = stats.speculation.acceptance
        out["draft_lengths"] = ", ".join(f"{n} of {k}" for k, n in sorted(stats.speculation.lengths.items(), reverse=True))
    ring = getattr(lm, "ring", None)
    if ring is not None:
        out.update(bytes_per_pass=lm.plan.bytes_per_token, held_mb=lm.plan.dram_bytes / MB, resident_mb=lm.plan.resident_bytes / MB,
                   ring_read_gbps=ring.stats.bytes_read / max(ring.stats.read_s, 1e-9) / 1e9, wait_ms_per_pass=ring.stats.wait_s / (passes + 1) * 1000)
    return out


def ppl_worker(args) -> dict:
    """Held-out code perplexity: `ppl-dense` (every weight in RAM; then TEAL's masks at each of SPARSITIES, thresholds
    calibrated on another file) or `ppl-stream` (the streaming engine at --budget; speculative decoding changes no
    logit, so flash scores the same)."""
    from edgewise.flash.runtime import StreamingLanguageModel
    from edgewise.lm.runtime import LanguageModel
    from edgewise.metrics.perplexity import perplexity

    held_out = stdlib_code("textwrap.py").read_text()
    stream = args.engine == "ppl-stream"
    lm = StreamingLanguageModel.open(args.gguf, budget=args.budget) if stream else LanguageModel.load(args.gguf, compile=False)
    ids = lm.tokenizer.encode(held_out)

    def ppl() -> float:
        cache = lm.new_cache(PPL_CTX)
        return perplexity(lambda w: lm.prefill_chunks(w, cache), ids, PPL_CTX, PPL_TOKENS).ppl

    start = time.perf_counter()
    out = {"ppl": ppl(), "seconds": time.perf_counter() - start}
    if stream:
        return out
    from edgewise.flash import sparsity

    calibration = lm.tokenizer.encode(stdlib_code("argparse.py").read_text())[: 2 * PPL_CTX]
    out["teal"] = []
    for thresholds in sparsity.calibrate(lm, calibration, list(SPARSITIES), ctx=PPL_CTX):
        with sparsity.Masked(lm, thresholds) as masked:
            value = ppl()
        out["teal"].append({"sparsity": thresholds.sparsity, "ppl": value, "kept": masked.kept()})
    return out


def _rss_anon_mb() -> float:
    from edgewise.metrics.memory import rss_anon_bytes

    return rss_anon_bytes() / MB


# -- the driver --------------------------------------------------------------------------------------
def run(engine: str, gguf: str, cap: int | None, budget: int | None, args, busy: bool = False) -> dict:
    from edgewise.errors import EdgewiseError
    from edgewise.metrics import memcap

    cmd = [sys.executable, __file__, "--worker", engine, "--gguf", gguf, "--new-tokens", str(args.new_tokens)]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="ACTIVE")
    streaming = cap is not None and not engine.startswith("llama.cpp")
    disk = [disk_now(gguf)] if streaming else []  # the bound's throughput, measured around the run (before the hog starts)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if cap is None:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{engine} failed without a cap:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            return result
        try:
            done = memcap.run_capped(cmd, cap, evict_files=[gguf], env=env, timeout=args.timeout)
        except EdgewiseError as e:  # outlived --timeout
            return {"error": f"timed out ({e})", "peak_mb": float("nan"), "cap": cap}
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0 or not done.stdout.strip():
        why = "killed by the cap" if done.killed_by_limit else f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]}"
        return {"error": why, "peak_mb": done.peak_bytes / MB, "cap": cap}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(peak_mb=done.peak_bytes / MB, cap=cap)
    if streaming:
        disk.append(disk_now(gguf))
        result.update(disk_before=disk[0], disk_after=disk[1], disk_gbps=max(disk[0], disk[1], result.get("ring_read_gbps", 0.0)))
    return result


def disk_now(gguf: str) -> float:
    """GB/s of O_DIRECT reads of the GGUF at this minute: 8 threads, the faster of the ring's read sizes, 1 s each."""
    from edgewise.flash.io import probe
    from edgewise.flash.stream import READ_SIZES

    result = probe(gguf, sizes=READ_SIZES, threads=(8,), seconds_per_point=1.0)
    return max(row[0] for row in result.gbps)


def bound(r: dict, gbps: float, compute_s: float) -> tuple[float, float] | None:
    """(serial, overlapped) bound in tok/s for a streaming run: per pass, reads at `gbps` and one token's compute,
    times the tokens a pass yields."""
    if "bytes_per_pass" not in r:
        return None
    read_s = r["bytes_per_pass"] / (gbps * 1e9)
    per_pass = r.get("tokens_per_pass", 1.0)
    return per_pass / (read_s + compute_s), per_pass / max(read_s, compute_s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="an embedded model's name or a GGUF (default qwen2.5-coder-1.5b)")
    ap.add_argument("--caps", default="640MB,900MB,1.2GB,1.6GB", help="view (a)'s caps, comma-separated (default 640MB,900MB,1.2GB,1.6GB)")
    ap.add_argument("--headline", default="900MB", help="view (a)'s headline cap (default 900MB)")
    ap.add_argument("--quick", action="store_true", help="the headline cap and half the weights only, no busy phase")
    ap.add_argument("--ppl", action="store_true", help="the perplexity section alone (dense, TEAL's masks, stream in its half-weights cap) "
                    "-> benchmarks/results/flash_ppl.md")
    ap.add_argument("--rounds", type=int, default=1, help="runs per point, interleaved (each round runs every engine of the point once); medians are reported (default 1)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--margin", default="96MB", help="room left in a cap beyond the measured overhead: the page cache of the code that runs (torch's libraries) and reads in flight (default 96MB)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a capped run is stopped (default 600)")
    ap.add_argument("--out", help="report stem under benchmarks/results (default flash, --quick: flash_quick)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.engine = args.worker
        print(json.dumps(worker(args)))
        return 0

    from edgewise.files import write_text_atomic
    from edgewise.flash.io import probe
    from edgewise.flash.residency import model_parts
    from edgewise.gguf_io import read_gguf
    from edgewise.metrics import memcap
    from edgewise.models import resolve_model
    from edgewise.sizes import parse_size

    if not memcap.available():
        raise SystemExit("this benchmark needs a writable cgroup-v1 memory controller (run as root); see edgewise/metrics/memcap.py")
    t_start = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    gguf = str(resolve_model(args.model))
    file_bytes = Path(gguf).stat().st_size
    weight_bytes = sum(p.nbytes for p in model_parts(read_gguf(gguf)))
    margin = parse_size(args.margin, what="--margin")
    headline = parse_size(args.headline, what="--headline")
    caps = [headline] if args.quick else sorted({headline, *(parse_size(c, what="--caps") for c in args.caps.split(","))})
    try:
        import llama_cpp  # noqa: F401

        engines = list(ENGINES)
    except ImportError:
        engines = [e for e in ENGINES if not e.startswith("llama.cpp")]
    _, prompt_source = code_prompt()
    say = lambda msg: print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    from edgewise.flash.stream import READ_SIZES

    say("probing the disk under the GGUF (O_DIRECT, random offsets)")
    probe_sizes = READ_SIZES if args.quick else (4096, 16384, 65536, 262144, 1048576)
    curve = first_probe = probe(gguf, sizes=probe_sizes, threads=(4, 8), seconds_per_point=2.0)

    if args.ppl:
        return perplexity_only(args, gguf, curve, weight_bytes, file_bytes, margin, commit, dirty, say, t_start)

    say("uncapped runs: the compute time and each engine's overhead")
    uncapped = {e: run(e, gguf, None, parse_size("50%", of=weight_bytes) if e in ("stream", "flash") else None, args)
                for e in ["dense", "stream", "flash", *[e for e in engines if e.startswith("llama")]]}
    compute_s = 1 / uncapped["dense"]["decode_tok_s"]
    edgewise_overhead = max(uncapped[e]["anon_mb"] - uncapped[e]["held_mb"] for e in ("stream", "flash")) * MB  # the larger
    overhead = {"stream": edgewise_overhead, "flash": edgewise_overhead, "naive": edgewise_overhead}
    if "llama.cpp no-repack" in uncapped:
        overhead["llama.cpp no-repack"] = uncapped["llama.cpp no-repack"]["anon_mb"] * MB  # holds no weights of its own
        overhead["llama.cpp"] = overhead["llama.cpp no-repack"]  # as shipped: its repacked weights are the rest of its RssAnon

    def budget_in(cap: int) -> int:
        return max(cap - int(overhead["stream"]) - margin, 1)

    rows: list[dict] = []
    bracket_probes: list[float] = []  # every probe taken around a streaming run (GB/s)

    def point(view: str, cap_of, budget_of, busy: bool = False, engines=engines):
        # rounds outermost: each round runs every engine once, so the disk's drift falls on all of them alike
        results: dict[str, list[dict]] = {engine: [] for engine in engines}
        for k in range(args.rounds):
            for engine in engines:
                cap = cap_of(engine)
                say(f"{view}: {engine} in {cap >> 20} MiB{' (busy)' if busy else ''}{f', round {k + 1} of {args.rounds}' if args.rounds > 1 else ''}")
                r = run(engine, gguf, cap, budget_of(engine), args, busy)
                bracket_probes.extend(r[key] for key in ("disk_before", "disk_after") if key in r)
                b = bound(r, r["disk_gbps"], compute_s) if "disk_gbps" in r and "decode_tok_s" in r else None
                if b:  # each run against the disk as it was around that run
                    r["fraction"] = r["decode_tok_s"] / b[1]
                results[engine].append(r)
        for engine in engines:
            ok = [r for r in results[engine] if "decode_tok_s" in r]
            row = dict(ok[-1] if ok else results[engine][-1], view=view, engine=engine, cap=cap_of(engine), busy=busy)
            for key in ("decode_tok_s", "fraction", "disk_gbps"):
                if ok and all(key in r for r in ok):
                    row[key] = statistics.median(r[key] for r in ok)
            rows.append(row)

    for cap in caps:
        point(f"(a) {cap >> 20} MiB", lambda e, cap=cap: cap, lambda e, cap=cap: budget_in(cap) if e in ("stream", "flash") else None)
    half = weight_bytes // 2
    half_cap = int(overhead["stream"]) + file_bytes // 2 + margin
    point("(b) half", lambda e: int(overhead[e]) + file_bytes // 2 + margin, lambda e: half if e in ("stream", "flash") else None)
    ppl: dict = {}
    if not args.quick:
        point(f"(a) {headline >> 20} MiB", lambda e: headline, lambda e: budget_in(headline) if e in ("stream", "flash") else None, busy=True)
        say("ablation at half the weights: one reading buffer; every CPU computing; reads fixed at 1 MiB, at 256 KiB")
        point("(b) half", lambda e: half_cap, lambda e: half, engines=ABLATION)
        say("held-out perplexity: dense and TEAL's masks (uncapped), then the streaming engine at half the weights (capped)")
        ppl["dense"] = run("ppl-dense", gguf, None, None, args)
        ppl["stream"] = run("ppl-stream", gguf, half_cap, half, args)
    # this VM's disk varies run to run and minute to minute (a probe at the start once measured 0.61 GB/s, the ring
    # then read at 1.1): each run is bounded by the probes around it; the fastest measurement of all is the stricter figure
    say("probing the disk again: the report's curve is the better of the two probes")
    last_probe = probe(gguf, sizes=probe_sizes, threads=(4, 8), seconds_per_point=2.0)
    curve = dataclasses.replace(first_probe, gbps=[[max(a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(first_probe.gbps, last_probe.gbps)])
    ring_size, probe_gbps = max(((size, curve.gbps[curve.sizes.index(size)][curve.threads.index(8)]) for size in READ_SIZES), key=lambda p: p[1])
    # the probe reads at random offsets for 2 s; the ring's own direct reads are a measurement of the same disk too, and
    # a quick run's ring read at 0.96 GB/s while both probes measured at most 0.78: bound by the fastest of them all
    fastest_ring = max((r for r in rows if r.get("ring_read_gbps")), key=lambda r: r["ring_read_gbps"], default=None)
    around = max(bracket_probes, default=0.0)  # the probes just before and after each streaming run, every round
    gbps = max(probe_gbps, around, fastest_ring["ring_read_gbps"] if fastest_ring else 0.0)

    # -- the report ---------------------------------------------------------------------------------
    def fmt(v, spec=".2f"):
        return "" if v is None else format(v, spec)

    lines = [
        f"# Flash inference under a memory cap: {Path(gguf).name}",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; commit {commit}{' (with uncommitted changes)' if dirty else ''}; "
        f"total time {(time.perf_counter() - t_start) / 60:.1f} min.",
        f"Command: `python benchmarks/flash.py {' '.join(sys.argv[1:] if argv is None else argv)}`.",
        f"The GGUF: {file_bytes / MB:.0f} MB, {weight_bytes / MB:.0f} MB of weights. {args.new_tokens} greedy tokens after {prompt_source}; "
        f"medians of {args.rounds} run(s), each a fresh process in a fresh memory group, the GGUF evicted from the page cache first.",
        "",
        "## The disk (probe of the GGUF, O_DIRECT reads at random offsets, at the start / at the end of the run)",
        "",
        "| read size | " + " | ".join(f"{t} threads GB/s" for t in curve.threads) + " |",
        "|---|" + "---:|" * len(curve.threads),
        *[f"| {s >> 10} KiB | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(r1, r2)) + " |"
          for s, r1, r2 in zip(curve.sizes, first_probe.gbps, last_probe.gbps)],
        "",
        "Each streaming run's bound uses the disk as it was around that run: the better of a probe just before it and one just after "
        "(8 threads, the faster of the ring's read sizes, 1 s each), or the run's own reads where faster (column *disk GB/s*); "
        f"and the dense compute time, {uncapped['dense']['decode_tok_s']:.2f} tok/s = {compute_s * 1000:.0f} ms per token "
        "(edgewise eager, every weight in RAM, no cap). "
        f"The fastest the disk measured anywhere in this benchmark: {gbps:.2f} GB/s, the largest of the probes above ({probe_gbps:.2f}, "
        f"{ring_size >> 10} KiB, 8 threads), the probes around the runs ({around:.2f}) "
        + (f"and the ring's own reads ({fastest_ring['ring_read_gbps']:.2f}, {fastest_ring['engine']} in {fastest_ring['view']}{' busy' if fastest_ring['busy'] else ''}); "
           if fastest_ring else "; ")
        + "column *vs fastest* is each run's fraction against that (stricter: it bounds a run by another minute's disk).",
        "",
        "## Overheads (uncapped runs, RssAnon at the end of generation)",
        "",
        "| engine | uncapped tok/s | RssAnon MB | weights it holds MB | overhead MB |",
        "|---|---:|---:|---:|---:|",
        *[f"| edgewise {e} at a 50% budget | {uncapped[e]['decode_tok_s']:.2f} | {uncapped[e]['anon_mb']:.0f} | {uncapped[e]['held_mb']:.0f} | "
          f"{uncapped[e]['anon_mb'] - uncapped[e]['held_mb']:.0f} |" for e in ("stream", "flash")],
    ]
    for e in ("llama.cpp", "llama.cpp no-repack"):
        if e in uncapped:
            lines.append(f"| {e} | {uncapped[e]['decode_tok_s']:.2f} | {uncapped[e]['anon_mb']:.0f} | {uncapped[e]['anon_mb'] - overhead[e] / MB:.0f} | {overhead[e] / MB:.0f} |")
    lines += [
        "",
        f"View (a): edgewise's weight budget = cap - its overhead (the larger of stream's and flash's) - {margin / MB:.0f} MB margin. View (b): cap = the engine's overhead + half the GGUF "
        f"({file_bytes / 2 / MB:.0f} MB) + the margin; stream and flash get a weight budget of half the weights ({half / MB:.0f} MB), naive its minimum.",
        "",
        "## Decode under the caps",
        "",
        "| view | engine | cap MiB | decode tok/s | tokens/pass | MB read/token | ring GB/s | disk GB/s | I/O wait ms/pass | weights held MB | RssAnon MB | group peak MB | bound tok/s serial / overlapped | fraction of bound | vs fastest |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        view = r["view"] + (" busy" if r["busy"] else "")
        if "decode_tok_s" not in r:
            lines.append(f"| {view} | {r['engine']} | {r['cap'] >> 20} | {r['error']} | | | | | | | | {r['peak_mb']:.0f} | | | |")
            continue
        b = bound(r, r["disk_gbps"], compute_s) if "disk_gbps" in r else None
        strict = bound(r, max(gbps, r["disk_gbps"]), compute_s) if b else None
        if b:
            r["bytes_per_token"] = r["bytes_per_pass"] / r["tokens_per_pass"]
            r["fraction_vs_fastest"] = r["decode_tok_s"] / strict[1]
        lines.append(
            f"| {view} | {r['engine']} | {r['cap'] >> 20} | {r['decode_tok_s']:.2f} | {fmt(r.get('tokens_per_pass'))} | "
            f"{fmt(r['bytes_per_token'] / MB if b else None, '.0f')} | {fmt(r.get('ring_read_gbps'))} | {fmt(r.get('disk_gbps'))} | {fmt(r.get('wait_ms_per_pass'), '.0f')} | "
            f"{fmt(r.get('held_mb'), '.0f')} | {r['anon_mb']:.0f} | {r['peak_mb']:.0f} | {f'{b[0]:.2f} / {b[1]:.2f}' if b else ''} | {fmt(r.get('fraction'))} | "
            f"{fmt(r.get('fraction_vs_fastest'))} |"
        )
    flash_acc = [r["acceptance"] for r in rows if r["engine"] == "flash" and "acceptance" in r]
    lines += [
        "",
        "tokens/pass: new tokens per forward pass after the prompt's (1 without drafts). MB read/token: the plan's streamed bytes per pass "
        "over tokens/pass. disk GB/s: the better of the probes just before and just after the run, or the ring's own reads "
        "(with several rounds, the median). Bound: a pass's reads at that throughput and one token's compute (a check of up to 5 rows computes more: "
        "the bound is optimistic for flash), times tokens/pass. Fraction of bound: measured tok/s over the overlapped bound (with several "
        "rounds, the median of each round's fraction). vs fastest: the same against the fastest disk measurement of the whole benchmark.",
    ]
    if flash_acc:
        lines.append(f"flash's prompt-lookup drafts: {', '.join(f'{a:.0%}' for a in flash_acc)} of drafted tokens accepted (per run, in table order).")
        lines += ["", "Draft tokens checked per pass (`DraftPolicy`: the length with the least expected seconds per token; 0 is a plain pass), "
                  "checks of each length, per flash run:", "",
                  *[f"- {r['view']}{' busy' if r['busy'] else ''}: {r['draft_lengths'] or 'no checks'}" for r in rows if r["engine"] == "flash" and "draft_lengths" in r]]
    held = [f"{r['view']}{' busy' if r['busy'] else ''} {r['engine']}: {r['hold_back']}" for r in rows if r.get("hold_back")]
    if held:
        lines += ["", "Compute threads of the streaming engines: each pass's count is the free CPUs or one fewer, whichever its passes "
                  "measured faster (`HoldBack`: one CPU left to the reader threads); the measured seconds per pass of the last run:", "",
                  *[f"- {h}" for h in held]]
    sized = [f"{r['view']}{' busy' if r['busy'] else ''} {r['engine']}: {r['read_sizes']}" for r in rows if r.get("read_sizes")]
    if sized:
        lines += ["", "Read sizes of the streaming engines: each layer's read is 256 KiB or 1 MiB pieces, whichever the ring's reads "
                  "measured faster per byte (`edgewise.flash.stream`; every 8th read tries the other); throughput of each over the last run:", "",
                  *[f"- {h}" for h in sized]]

    def find(view: str, engine: str, busy: bool = False) -> dict:
        return next((r for r in rows if r["view"] == view and r["engine"] == engine and r["busy"] == busy), {})

    if not args.quick:
        lines += ablation_report(find) + perplexity_report(curve, gguf, half, ppl)

    head_view = f"(a) {headline >> 20} MiB"
    flash_a = find(head_view, "flash")
    peers = [r for r in (find(head_view, "llama.cpp"), find(head_view, "llama.cpp no-repack")) if "decode_tok_s" in r]
    best = max(peers, key=lambda r: r["decode_tok_s"], default=None)
    tail = []
    if flash_a.get("decode_tok_s") and best:
        tail.append(f"ratio flash/llama.cpp decode = {flash_a['decode_tok_s'] / best['decode_tok_s']:.2f}  (at {headline >> 20} MiB, against {best['engine']})")
    flash_b, naive_b = find("(b) half", "flash"), find("(b) half", "naive")
    if flash_b.get("decode_tok_s") and naive_b.get("decode_tok_s"):
        tail.append(f"ratio flash/naive decode = {flash_b['decode_tok_s'] / naive_b['decode_tok_s']:.2f}  (half the weights)")
    if "fraction" in flash_b:
        tail.append(f"fraction of bound = {flash_b['fraction']:.2f}  (flash, half the weights; the disk around the run {flash_b['disk_gbps']:.2f} GB/s; "
                    f"against the fastest of the whole benchmark, {gbps:.2f} GB/s: {flash_b['fraction_vs_fastest']:.2f})")
    if "bytes_per_token" in flash_b and "bytes_per_token" in naive_b:
        tail.append(f"bytes per token flash/naive = {flash_b['bytes_per_token'] / naive_b['bytes_per_token']:.2f}  (half the weights)")

    stem = args.out or ("flash_quick" if args.quick else "flash")
    if len(caps) > 1:
        lines += ["", f"Plot: [{stem}.png]({stem}.png)."]
        plot(rows, caps, gbps, compute_s, RESULTS / f"{stem}.png")
    text = "\n".join(lines + ["", "```", *tail, "```", ""])
    write_text_atomic(RESULTS / f"{stem}.md", text)
    print(text)
    return 0


def ablation_report(find) -> list[str]:
    """The ablation at half the weights (measured)."""
    naive = find("(b) half", "naive").get("decode_tok_s")
    steps = [("naive", "attention, norms, output head resident; every FFN byte read each token, one buffer"),
             ("stream, 1 buffer", "+ the residency plan: half the weights resident by use per byte; reads and compute take turns"),
             ("stream, every CPU computing", "+ a second buffer: the next layer's reads run while a layer computes, on every free CPU"),
             ("stream", "+ one CPU left to the reader threads where the passes measure faster so (HoldBack); read size timed"),
             ("stream, 1 MiB reads", "stream with every read 1 MiB, not timed"),
             ("stream, 256 KiB reads", "stream with every read 256 KiB, not timed"),
             ("flash", "stream + prompt-lookup drafts of up to 4, length by measured cost: one pass's reads serve every token it yields")]
    out = ["", "## Ablation at half the weights (measured, same cap as stream)", "",
           "| engine | what changes | decode tok/s | x naive | MB read/token | I/O wait ms/pass | fraction of bound |", "|---|---|---:|---:|---:|---:|---:|"]
    for engine, what in steps:
        r = find("(b) half", engine)
        if "decode_tok_s" not in r:
            out.append(f"| {engine} | {what} | {r.get('error', 'not run')} | | | | |")
            continue
        ratio = f"{r['decode_tok_s'] / naive:.2f}" if naive else ""
        out.append(f"| {engine} | {what} | {r['decode_tok_s']:.2f} | {ratio} | {r.get('bytes_per_token', float('nan')) / MB:.0f} | "
                   f"{r.get('wait_ms_per_pass', float('nan')):.0f} | {r.get('fraction', float('nan')):.2f} |")
    return out


def perplexity_report(curve, gguf: str, half: int, ppl: dict) -> list[str]:
    """Held-out perplexity (measured), and what TEAL's input sparsity would cost the disk (predicted from the probe:
    it is not built, and this table is why)."""
    import numpy as np

    from edgewise.flash.residency import model_parts, plan_residency
    from edgewise.gguf_io import read_gguf

    dense, stream = ppl.get("dense", {}), ppl.get("stream", {})
    out = ["", f"## Held-out code perplexity (Python's textwrap.py, windows of {PPL_CTX} tokens over its first {PPL_TOKENS})", ""]
    if "ppl" not in dense:
        return out + [f"dense perplexity failed: {dense.get('error', 'not run')}"]
    base = dense["ppl"]
    out += ["| configuration | ppl | vs dense |", "|---|---:|---:|", f"| dense, every weight in RAM | {base:.4f} | |"]
    if "ppl" in stream:
        out.append(f"| stream (and flash) at half the weights, in its cap | {stream['ppl']:.4f} | {stream['ppl'] / base - 1:+.3%} |")
    else:
        out.append(f"| stream at half the weights | {stream.get('error', 'not run')} | |")
    for t in dense.get("teal", []):
        out.append(f"| dense with TEAL masks, {t['sparsity']:.0%} of FFN inputs zeroed (kept: x {t['kept'][0]:.0%}, h {t['kept'][1]:.0%}) | {t['ppl']:.4f} | {t['ppl'] / base - 1:+.1%} |")
    out += ["", "Flash scores what stream scores: speculative decoding checks drafts with the same logits and keeps only the greedy "
            "tokens (tests: token-identical output on SmolLM2 and the 1.5B model). The stream row differs from dense only where "
            "the scoring chunks (runtime.SCORE_BYTES) group the kernels' sums differently."]

    # TEAL's reads, predicted: channel-major storage makes a skipped input channel a skipped run of bytes
    g = read_gguf(gguf)
    plan = plan_residency(model_parts(g), half)
    sizes = np.log2(np.array(curve.sizes, dtype=float))
    col8 = np.array([row[curve.threads.index(8)] for row in curve.gbps])

    def gbps_at(nbytes: float) -> float:
        return float(np.interp(np.log2(max(nbytes, curve.sizes[0])), sizes, col8))

    roles: dict[str, list[float]] = {}  # role -> [streamed bytes, bytes per input channel]
    for part in plan.streamed:
        if part.layer < 0:
            continue
        t = g.tensor(part.name)
        role = part.name.split(".")[2]
        entry = roles.setdefault(role, [0.0, t.nbytes / t.shape[1]])
        entry[0] += part.nbytes
    dense_s = sum(b for b, _ in roles.values()) / (gbps_at(1 << 20) * 1e9)
    out += ["", "## Input sparsity (TEAL) on the streamed FFN: what skipping would cost the disk (predicted, not built)", "",
            f"At half the weights the plan streams {sum(b for b, _ in roles.values()) / MB:.0f} MB per pass "
            + ", ".join(f"({r}: {b / MB:.0f} MB, {c:.0f} B per input channel)" for r, (b, c) in sorted(roles.items()))
            + f", read in 1 MiB runs at {gbps_at(1 << 20):.2f} GB/s: {dense_s * 1000:.0f} ms. Skipping a zeroed input's column needs "
            "the weights stored channel-major (a K-quant block then runs along the other axis: a requantization this does not "
            "price). A kept channel is then a run of its column's bytes; with inputs kept independently at rate 1-s, runs of kept "
            "channels average 1/s channels, read at the probe's throughput for that size (8 threads, interpolated).", "",
            "| sparsity s | ppl vs dense | bytes read | mean run KiB (gate/up, down) | predicted read ms/pass | vs dense reads |", "|---:|---:|---:|---:|---:|---:|"]
    for t in dense.get("teal", []):
        sp = t["sparsity"]
        kept = {"ffn_gate": t["kept"][0], "ffn_up": t["kept"][0], "ffn_down": t["kept"][1]}
        read_s, kept_bytes, runs = 0.0, 0.0, {}
        for role, (nbytes, per_channel) in roles.items():
            run = per_channel / max(1 - kept[role], 1e-6)
            runs[role] = run
            kept_bytes += nbytes * kept[role]
            read_s += nbytes * kept[role] / (gbps_at(run) * 1e9)
        total = sum(b for b, _ in roles.values())
        out.append(f"| {sp:.0%} | {t['ppl'] / base - 1:+.1%} | {kept_bytes / total:.0%} | {runs.get('ffn_gate', 0) / 1024:.1f}, {runs.get('ffn_down', 0) / 1024:.1f} | "
                   f"{read_s * 1000:.0f} | {read_s / dense_s:.2f}x |")
    return out


def perplexity_only(args, gguf, curve, weight_bytes, file_bytes, margin, commit, dirty, say, t_start) -> int:
    from edgewise.files import write_text_atomic

    say("uncapped stream run: its overhead, for the half-weights cap")
    half = weight_bytes // 2
    r = run("stream", gguf, None, half, args)
    half_cap = int((r["anon_mb"] - r["held_mb"]) * MB) + file_bytes // 2 + margin
    say("held-out perplexity: dense and TEAL's masks (uncapped), then the streaming engine at half the weights (capped)")
    ppl = {"dense": run("ppl-dense", gguf, None, None, args), "stream": run("ppl-stream", gguf, half_cap, half, args)}
    lines = [f"# Held-out perplexity of flash configurations: {Path(gguf).name}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; commit {commit}{' (with uncommitted changes)' if dirty else ''}; "
             f"total time {(time.perf_counter() - t_start) / 60:.1f} min. Command: `python benchmarks/flash.py --ppl`. "
             f"The stream run's cap: {half_cap >> 20} MiB (its overhead + half the GGUF + the margin, as view (b) of flash.md)."]
    lines += perplexity_report(curve, gguf, half, ppl)
    text = "\n".join(lines + [""])
    write_text_atomic(RESULTS / "flash_ppl.md", text)
    print(text)
    return 0


def plot(rows: list[dict], caps: list[int], gbps: float, compute_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgewise.files import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    quiet_a = [r for r in rows if r["view"].startswith("(a)") and not r["busy"]]
    for engine in ENGINES:
        pts = [(r["cap"] / 2**20, r.get("decode_tok_s") or 0.0) for r in quiet_a if r["engine"] == engine]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=engine)
    bounds = [(r["cap"] / 2**20, bound(r, gbps, compute_s)[1]) for r in quiet_a if r["engine"] == "stream" and "bytes_per_pass" in r]
    if bounds:
        ax.plot(*zip(*bounds), "k--", label="stream's bound (reads overlapped with compute, at the fastest disk measured)")
    ax.set_xlabel("memory cap, MiB (page cache counted)")
    ax.set_ylabel("decode tok/s")
    ax.set_title("Qwen2.5-Coder-1.5B Q4_K_M under a memory cap (0 = killed by the cap, or refused)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    raise SystemExit(main())
