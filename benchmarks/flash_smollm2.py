"""Flash inference under a DRAM budget: decode speed of the flash engine against a dense model,
the naive flash baseline and llama.cpp (mmap), each held to the same memory.

Engines (each measurement runs in a fresh worker process, engines alternate inside every round):

    dense      edgewise LanguageModel, quantized, AOTInductor-compiled decode: all weights in DRAM
    naive      FlashLanguageModel mode="naive": every token, each layer's whole FFN read with O_DIRECT
    llama.cpp  llama-cpp-python on the same GGUF, mmap on (skipped when llama_cpp does not import)
    flash      FlashLanguageModel mode="flash", window=4, reads="cost": predicted units only, cached

Equal memory. A DRAM budget of X% is X% of the store's FFN bytes (`engine.ffn_bytes`: every unit
of every layer plus the resident down scales). Each engine's baseline without FFN weights is
measured first: one uncapped run in a fresh memory cgroup (cgroup v1), its peak
`memory.max_usage_in_bytes` (anonymous memory and page cache) minus the FFN weights it held
(flash at the smallest budget: its unit caches and down scales; naive: its one-layer buffer and
down scales; dense and llama.cpp: the GGUF's ffn_* tensors). Every timed run then goes into a
fresh cgroup capped at baseline + budget bytes, after `echo 3 > /proc/sys/vm/drop_caches`; a
worker that exceeds --timeout is killed and reported as "timeout", one the kernel kills as
"OOM-killed". Without root or the cgroup-v1 memory controller nothing is capped, and peak RSS
is reported instead.

At each budget the flash engine computes min(store's operating point, 90% of what the budget's
cache holds) of each layer's units: below the operating point perplexity rises, and the table
says by how much (perplexity on held-out Shakespeare, the tokens after the store's calibration
and evaluation text, through the flash engine token by token).

Also: the ablation at --ablation-budget (naive, + predictor, + windowing, + bundling with
coalesced reads, + cost-model reads) and a plot of decode tok/s against the budget.

    python benchmarks/flash_smollm2.py --quick                    # 50% only, a few minutes
    python benchmarks/flash_smollm2.py                            # budgets 10..100%, ~25 min
    python benchmarks/flash_smollm2.py --store /path/to/store --budgets 30,50,100 --reps 3

Writes benchmarks/results/flash_smollm2.md (--quick: flash_smollm2_quick.md) and flash_smollm2.png (flash_smollm2_quick.png).
The first flash engine on SmolLM2-135M, kept as a documented negative result (issue 16): the model is
too small for per-token overheads to amortize, and a SwiGLU model that size has little activation sparsity.
The store (--store, default build/flash-store) is converted from the default model if missing
(about 3 minutes). The last three lines, for the 50% budget (--ablation-budget), are
`ratio flash/naive decode = X`, `ratio flash/llama.cpp decode = Y`, `bytes per token flash/naive = Z`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
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
DEFAULT_STORE = RESULTS / ".." / ".." / "build" / "flash-store"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MB = 1e6
LABELS = {"dense": "dense (AOTI, all in DRAM)", "naive": "naive flash", "llama": "llama.cpp (mmap)", "flash": "flash"}
ABLATION = [  # (row label, spec changes over the flash engine's)
    ("naive (whole FFN per token)", {"mode": "naive"}),
    ("+ predictor (window 1, one read per unit)", {"window": 1, "reads": "unit"}),
    ("+ windowing (window 4)", {"window": 4, "reads": "unit"}),
    ("+ bundling / coalesced reads (adjacent)", {"window": 4, "reads": "adjacent"}),
    ("+ cost-model reads (gaps read when cheaper)", {"window": 4, "reads": "cost"}),
]


# -- workers: one process, one engine --------------------------------------------------------------
def _io_read_bytes() -> int:
    """Bytes this process (all threads) had fetched from storage: O_DIRECT reads and page faults alike."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _cgroup_stat() -> dict:
    """This process's memory cgroup's memory.stat (rss, cache, mapped_file), in bytes, when it has one."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(",") and rel != "/":
                stat = dict(x.split() for x in (CGROUP_ROOT / rel.lstrip("/") / "memory.stat").read_text().splitlines())
                return {k: int(stat[k]) for k in ("rss", "cache", "mapped_file") if k in stat}
    except (OSError, ValueError):
        pass
    return {}


def _timed(generate, n_tokens: int, reps: int, prompt_tokens: int) -> tuple[list[dict], float]:
    """`reps` timed generations; samples and the storage bytes read per token through the model
    (each generation runs the prompt's tokens and n_tokens - 1 decode steps)."""
    io0 = _io_read_bytes()
    samples = [generate(n_tokens) for _ in range(reps)]
    io1 = _io_read_bytes()
    return samples, (io1 - io0) / (reps * (prompt_tokens + n_tokens - 1)) if io0 >= 0 else -1.0


def worker_dense(spec: dict) -> dict:
    import torch

    from edgewise.lm.runtime import LanguageModel
    from edgewise.metrics.memory import peak_rss_mb

    torch.set_num_threads(spec["threads"])
    lm = LanguageModel.load(precision="quant", compile=True, cache_dir=Path(spec["cache_dir"]))
    ids = lm.tokenizer.encode(PROMPT)

    def gen(n: int) -> dict:
        list(lm.generate(ids, n, stop_at_eot=False))
        s = lm.last_stats
        return {"ttft_s": s.ttft_s, "decode_tok_s": s.decode_tok_s}

    gen(8)  # warm-up
    samples, io = _timed(gen, spec["new_tokens"], spec["reps"], len(ids))
    return {"samples": samples, "io_bytes_per_token": io, "peak_rss_mb": peak_rss_mb(), "compile_s": lm.compile_s, "cgroup": _cgroup_stat()}


def worker_llama(spec: dict) -> dict:
    from llama_cpp import Llama
    from llama_cpp_peer import timed_generation

    from edgewise.gguf_io import read_gguf
    from edgewise.lm.tokenizer import TextTokenizer
    from edgewise.metrics.memory import peak_rss_mb
    from edgewise.models import resolve_model

    path = resolve_model(None)
    ids = TextTokenizer.from_gguf(read_gguf(path)).encode(PROMPT)
    llm = Llama(str(path), n_threads=spec["threads"], n_threads_batch=spec["threads"], n_ctx=512, verbose=False)

    def gen(n: int) -> dict:
        return timed_generation(llm, ids, n)

    gen(8)  # warm-up
    samples, io = _timed(gen, spec["new_tokens"], spec["reps"], len(ids))
    return {"samples": samples, "io_bytes_per_token": io, "peak_rss_mb": peak_rss_mb(), "cgroup": _cgroup_stat()}


def _open_flash(spec: dict):
    from edgewise.flash.runtime import FlashLanguageModel

    return FlashLanguageModel.open(
        spec["store"],
        dram_budget=f"{spec['pct']}%",
        mode=spec.get("mode", "flash"),
        window=spec.get("window", 4),
        reads=spec.get("reads", "cost"),
        active_fraction=spec.get("active_fraction"),
        verify=False,  # the parent verified the store once; verifying here would put ffn.bin in the page cache
    )


def _engine_info(lm) -> dict:
    e = lm.engine
    return {
        "ffn_bytes": e.ffn_bytes, "budget_bytes": e.budget_bytes, "capacity": e.capacity, "k_units": e.k_units[0],
        "n_units": e.layout.n_units, "layer_bytes": e.layout.layer_bytes, "cache_bytes": e.cache_bytes,
        "down_scale_bytes": e.down_scale_bytes, "predictor_bytes": e.predictor_bytes, "direct": e.reader.direct,
        "reader_threads": e.reader.threads,
    }


def worker_flash(spec: dict) -> dict:
    import torch

    from edgewise.metrics.memory import peak_rss_mb

    torch.set_num_threads(spec["threads"])
    lm = _open_flash(spec)
    ids = lm.tokenizer.encode(PROMPT)

    def gen(n: int) -> dict:
        list(lm.generate(ids, n, stop_at_eot=False))
        s, f = lm.last_stats, lm.flash_stats
        return {
            "ttft_s": s.ttft_s, "decode_tok_s": s.decode_tok_s, "bytes_per_token": f.per_token("bytes_read"),
            "reads_per_token": f.per_token("reads"), "hit_rate": f.hit_rate, "measured_io_s": f.per_token("measured_io_s"),
            "predicted_io_s": f.per_token("predicted_io_s"), "cached_units": f.per_token("cached_units"),
        }

    gen(8)  # warm-up
    samples, io = _timed(gen, spec["new_tokens"], spec["reps"], len(ids))
    return {"samples": samples, "io_bytes_per_token": io, "peak_rss_mb": peak_rss_mb(), "engine": _engine_info(lm), "cgroup": _cgroup_stat()}


def _ppl_ids(spec: dict, tokenizer) -> list[int]:
    from edgewise.data.text import load_text

    skip, n = spec["ppl_skip"], spec["ppl_windows"] * spec["ppl_ctx"]
    ids = tokenizer.encode(load_text(spec["ppl_text"])[: 12 * (skip + n)])[skip : skip + n]
    if len(ids) < n:
        raise SystemExit(f"perplexity text {spec['ppl_text']!r} gives {len(ids)} tokens after skipping {skip}; need {n}")
    return ids


def worker_ppl_dense(spec: dict) -> dict:
    import torch

    from edgewise.lm.runtime import LanguageModel
    from edgewise.metrics.perplexity import perplexity

    torch.set_num_threads(spec["threads"])
    lm = LanguageModel.load(precision="quant", compile=False)
    ids = _ppl_ids(spec, lm.tokenizer)
    r = perplexity(lambda w: lm.prefill(w, lm.new_cache(len(w)), last_only=False), ids, spec["ppl_ctx"], len(ids))
    return {"ppl": r.ppl, "predictions": r.n_predicted}


def worker_ppl_flash(spec: dict) -> dict:
    import torch

    from edgewise.metrics.perplexity import perplexity

    torch.set_num_threads(spec["threads"])
    lm = _open_flash(spec)
    ids = _ppl_ids(spec, lm.tokenizer)
    t0 = time.perf_counter()
    r = perplexity(lambda w: lm.prefill(w, lm.new_cache(len(w)), last_only=False), ids, spec["ppl_ctx"], len(ids))
    return {"ppl": r.ppl, "predictions": r.n_predicted, "seconds": time.perf_counter() - t0, "engine": _engine_info(lm)}


WORKERS = {"dense": worker_dense, "llama": worker_llama, "naive": worker_flash, "flash": worker_flash,
           "ppl-dense": worker_ppl_dense, "ppl-flash": worker_ppl_flash}


# -- the parent: cgroups, runs, tables -------------------------------------------------------------
def cgroups_available() -> str | None:
    """None when memory cgroups (v1) can be used here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not (CGROUP_ROOT / "cgroup.procs").exists() or not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup-v1 memory controller at {CGROUP_ROOT}"
    probe = CGROUP_ROOT / f"edgewise-flash-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        return f"cannot create a memory cgroup ({e.strerror})"
    return None


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of the machine's CPU time that was not idle over `seconds` (0 with no workers of ours running)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(limit_s: float) -> float:
    """Wait (up to `limit_s`) until other processes leave the CPUs alone; the last busy share seen."""
    busy = busy_fraction()
    t0 = time.perf_counter()
    if busy > 0.2:
        print(f"  the machine is busy ({busy:.0%} CPU outside this benchmark): waiting up to {limit_s:.0f} s ...", file=sys.stderr)
    while busy > 0.2 and time.perf_counter() - t0 < limit_s:
        time.sleep(4)
        busy = busy_fraction()
    return busy


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


class Runner:
    def __init__(self, args):
        self.args = args
        self.cgroup_problem = None if args.no_cgroup else cgroups_available()
        if args.no_cgroup:
            self.cgroup_problem = "--no-cgroup"
        self.count = 0
        self.busy_runs: list[str] = []  # timed runs that started while other processes used the CPUs
        self.log = []  # every worker run: (kind, spec summary, outcome)

    def run(self, kind: str, spec: dict, cap: int | None = None, timeout: float | None = None, cgroup: bool = True) -> dict:
        """A worker in a fresh memory cgroup (capped at `cap` bytes when given); its JSON plus
        status ("ok", "timeout", "OOM-killed", "error") and the cgroup's peak in bytes."""
        a = self.args
        spec = {"threads": a.threads, "new_tokens": a.new_tokens, "reps": a.reps, "cache_dir": a.cache_dir, "store": str(a.store), **spec}
        cmd = [sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)]
        env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS=str(a.threads))
        busy = wait_idle(a.wait_idle) if timeout is not None else 0.0  # timed runs only
        group = None
        use_cgroup = cgroup and self.cgroup_problem is None
        if use_cgroup:
            self.count += 1
            group = CGROUP_ROOT / f"edgewise-flash-{os.getpid()}-{self.count}"
            group.mkdir()
            if cap is not None:
                (group / "memory.limit_in_bytes").write_text(str(int(cap)))
            drop_caches()
        procs = str(group / "cgroup.procs") if group else None

        def enter_cgroup():  # in the child, before exec: everything it maps is charged to the group
            if procs:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=enter_cgroup, start_new_session=True)  # noqa: PLW1509
        status = "ok"
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            status = "timeout"
        except BaseException:  # interrupted: leave no worker and no cgroup behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if group:
                _remove_cgroup(group)
            raise
        wall = time.perf_counter() - t0
        peak, oom_kills = None, 0
        if group:
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
            oom_kills = int(oom.get("oom_kill", 0))
            _remove_cgroup(group)
        result: dict = {}
        if status == "ok" and proc.returncode != 0:
            if oom_kills or proc.returncode == -signal.SIGKILL:
                status = "OOM-killed"
            else:
                status = "error"
                lines = [x for x in err.strip().splitlines() if x.strip()]
                result["error"] = lines[-1][:300] if lines else f"exit {proc.returncode}"
                print(f"  worker {kind} failed (exit {proc.returncode}):\n{err[-2000:]}", file=sys.stderr)
        if status == "ok":
            result = json.loads(out.strip().splitlines()[-1])
        result.update(status=status, wall_s=wall, cap_bytes=cap, cgroup_peak_bytes=peak, busy_before=busy)
        if busy > 0.2:
            self.busy_runs.append(f"{kind} {spec.get('pct', '')}% ({busy:.0%} busy)")
        self.log.append((kind, {k: v for k, v in spec.items() if k in ("pct", "mode", "window", "reads", "active_fraction")}, status, wall))
        return result


def _remove_cgroup(group: Path) -> None:
    for _ in range(50):
        try:
            (group / "memory.force_empty").write_text("0")
        except OSError:
            pass
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    print(f"warning: could not remove {group}", file=sys.stderr)


def llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def gguf_ffn_bytes() -> int:
    from edgewise.gguf_io import read_gguf
    from edgewise.models import resolve_model

    gguf = read_gguf(resolve_model(None))
    return sum(t.nbytes for name, t in gguf.tensors.items() if any(f".{n}." in name for n in ("ffn_gate", "ffn_up", "ffn_down")))


def cost_model_source(store: Path) -> str:
    from edgewise.flash.engine import PROBE_FILE, default_probe_path

    if (store / PROBE_FILE).is_file():
        return f"the store's probe ({store / PROBE_FILE})"
    if default_probe_path().is_file():
        return f"this machine's probe ({default_probe_path()})"
    return "the built-in default (no probe saved: CostModel.default(), the development machine's numbers)"


def ensure_store(store: Path) -> dict:
    from edgewise.flash.store import FlashStore

    if not (store / "manifest.json").is_file():
        from edgewise.flash.convert import ConvertOptions, convert

        print(f"no flash store at {store}: converting the default model into it (about 3 minutes) ...", file=sys.stderr)
        t0 = time.perf_counter()
        convert(store, options=ConvertOptions(log=lambda m: print("  " + m, file=sys.stderr)))
        print(f"converted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"verifying {store} ...", file=sys.stderr)
    return FlashStore.open(store, verify=True).manifest


class Geometry:
    """Budget arithmetic from the manifest, as FlashEngine does it."""

    def __init__(self, manifest: dict):
        f = manifest["ffn_file"]
        self.n_layers = int(manifest["dims"]["n_layers"])
        self.n_units, self.unit_bytes = int(f["n_units"]), int(f["unit_bytes"])
        self.down_scale_bytes = int(f["down_scale_bytes"])
        self.ffn_bytes = self.n_layers * self.n_units * self.unit_bytes + self.down_scale_bytes
        self.op_fraction = float(manifest["predictor"]["active_fraction"])
        self.op_k = int(manifest["predictor"]["k_units"][0])

    def budget_bytes(self, pct: float) -> int:
        return int(pct / 100 * self.ffn_bytes)

    def capacity(self, pct: float) -> int:
        return min(self.n_units, (self.budget_bytes(pct) - self.down_scale_bytes) // (self.n_layers * self.unit_bytes))

    def operating_point(self, pct: float) -> tuple[int, float | None]:
        """(units computed per layer, active_fraction to pass: None for the store's own). The store's
        operating point where the whole FFN fits, else at most 90% of the cache (room for the window)."""
        cap = self.capacity(pct)
        k = self.op_k if cap >= self.n_units else min(self.op_k, max(1, math.floor(0.9 * cap)))
        if k == self.op_k:
            return k, None
        return k, (k - 0.25) / self.n_units  # FlashEngine takes ceil(fraction * n_units) = k


def med(samples: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def fmt(x, spec: str = ".1f", missing: str = "–") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=DEFAULT_STORE.resolve(), help="flash store directory (default build/flash-store; converted if missing)")
    p.add_argument("--quick", action="store_true", help="the 50%% budget only, fewer tokens and repetitions, short perplexity text")
    p.add_argument("--budgets", help="comma-separated FFN budgets in %% (default 10,20,...,100; --quick: 50)")
    p.add_argument("--ablation-budget", type=float, default=50.0, help="budget of the ablation and of the final ratio lines (default 50)")
    p.add_argument("--threads", type=int, default=2, help="compute threads (the flash reader's own I/O threads are the engine's default)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per generation (default 32; --quick 24)")
    p.add_argument("--reps", type=int, help="timed generations per worker (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of worker processes (default 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a worker is killed and reported as timeout (default 120)")
    p.add_argument("--ppl-text", default="shakespeare", help="perplexity corpus (default shakespeare, after the store's calibration tokens)")
    p.add_argument("--ppl-windows", type=int, help="perplexity windows (default 4; --quick 2)")
    p.add_argument("--ppl-ctx", type=int, help="tokens per perplexity window (default 128: the flash engine runs them one by one)")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    p.add_argument("--no-cgroup", action="store_true", help="no memory caps (report peak RSS only)")
    p.add_argument("--baseline", choices=("peak", "resident"), default="peak",
                   help="baseline memory: the uncapped run's cgroup peak (default; includes page cache read while loading), or its"
                        " resident working set at exit (memory.stat rss + mapped_file), which makes the caps bind harder")
    p.add_argument("--out", help="report / plot file stem under benchmarks/results (default flash_smollm2, --quick: flash_smollm2_quick)")
    p.add_argument("--probe", action="store_true", help="measure the store's device first and save STORE/probe.json, which the engine's cost model then uses")
    p.add_argument("--note", action="append", default=[], help="a line to add to the report (repeatable)")
    p.add_argument("--wait-idle", type=float, default=600.0, help="before each timed run, wait up to this many seconds for other processes to leave the CPUs idle (default 600)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "edgewise" / "aoti"))
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.spec))))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed run still removes its worker and cgroup

    q = args.quick
    args.new_tokens = args.new_tokens or (24 if q else 32)
    args.reps = args.reps or 2
    args.ppl_windows = args.ppl_windows or (2 if q else 4)
    args.ppl_ctx = args.ppl_ctx or 128
    budgets = sorted({float(b) for b in args.budgets.split(",")} if args.budgets else ({50.0} if q else {10.0 * i for i in range(1, 11)}), reverse=True)
    if args.ablation_budget not in budgets:
        budgets = sorted(set(budgets) | {args.ablation_budget}, reverse=True)
    args.store = args.store.resolve()
    t_start = time.perf_counter()

    manifest = ensure_store(args.store)
    if args.probe:
        from edgewise.flash.engine import PROBE_FILE
        from edgewise.flash.io import probe

        print(f"probing {args.store}'s device (random O_DIRECT reads) ...", file=sys.stderr)
        probe(args.store).save(args.store / PROBE_FILE)
    geo = Geometry(manifest)
    g_ffn = gguf_ffn_bytes()
    runner = Runner(args)
    if runner.cgroup_problem:
        print(f"memory cgroups unavailable ({runner.cgroup_problem}): runs are NOT memory-capped; reporting peak RSS instead", file=sys.stderr)
    engines = ["dense", "naive"] + (["llama"] if llama_available() and not args.no_llama else []) + ["flash"]
    if "llama" not in engines and not args.no_llama:
        print("llama-cpp-python is not installed (scripts/setup.sh --bench builds it): leaving llama.cpp out", file=sys.stderr)

    def spec_of(engine: str, pct: float, **over) -> dict:
        if engine == "naive":
            return {"pct": pct, "mode": "naive", **over}
        if engine == "flash":
            _, af = geo.operating_point(pct)
            return {"pct": pct, "mode": "flash", "window": 4, "reads": "cost", "active_fraction": af, **over}
        return {"pct": pct, **over}

    # 0. compile / build once, outside any cgroup (AOTInductor package, native kernels)
    print("warming the AOTInductor cache and native kernels ...", file=sys.stderr)
    warm = runner.run("dense", {"new_tokens": 2, "reps": 1}, cgroup=False)
    if warm["status"] != "ok":
        raise SystemExit(f"dense warm-up failed: {warm.get('error')}")

    # 1. baselines without FFN weights: one uncapped run each
    smallest = budgets[-1]
    baseline, baseline_detail = {}, {}
    for engine in engines:
        print(f"baseline: {LABELS[engine]} uncapped ...", file=sys.stderr)
        r = runner.run(engine, spec_of(engine, smallest), timeout=args.timeout * 3)
        if r["status"] != "ok":
            raise SystemExit(f"baseline run of {engine} failed: {r['status']} {r.get('error', '')}")
        peak = r["cgroup_peak_bytes"] if r["cgroup_peak_bytes"] is not None else r["peak_rss_mb"] * 2**20
        cg = r.get("cgroup") or {}
        if args.baseline == "resident" and cg:
            peak = cg["rss"] + cg.get("mapped_file", 0)
        if engine == "flash":
            e = r["engine"]
            ffn_held, how = e["cache_bytes"] + e["down_scale_bytes"], f"unit caches at {smallest:g}% ({e['cache_bytes'] / MB:.2f} MB) + down scales ({e['down_scale_bytes'] / MB:.2f} MB)"
        elif engine == "naive":
            e = r["engine"]
            ffn_held, how = e["cache_bytes"] + e["down_scale_bytes"], f"one-layer buffer ({e['cache_bytes'] / MB:.2f} MB) + down scales ({e['down_scale_bytes'] / MB:.2f} MB)"
        else:
            ffn_held, how = g_ffn, f"GGUF ffn_* tensors ({g_ffn / MB:.2f} MB)"
        if engine in ("flash", "naive") and r["engine"]["ffn_bytes"] != geo.ffn_bytes:
            print(f"warning: engine.ffn_bytes {r['engine']['ffn_bytes']} != manifest arithmetic {geo.ffn_bytes}", file=sys.stderr)
        baseline[engine] = peak - ffn_held
        baseline_detail[engine] = {"peak": peak, "max_usage": r["cgroup_peak_bytes"], "held": ffn_held, "how": how, "cgroup": r.get("cgroup", {}), "rss_mb": r.get("peak_rss_mb")}
        print(f"  {med(r['samples'], 'decode_tok_s'):.1f} tok/s; {args.baseline} {peak / MB:.1f} MB - {how} = baseline {baseline[engine] / MB:.1f} MB; {r['wall_s']:.0f} s", file=sys.stderr)

    def cap_of(engine: str, pct: float) -> int | None:
        return None if runner.cgroup_problem else int(baseline[engine] + geo.budget_bytes(pct))

    # 2. the sweep: budgets from the largest down; an engine that is OOM-killed, or times out at its
    # cap, at one budget is not run at smaller ones (it only gets less memory there)
    runs: dict[tuple[str, float], list[dict]] = {}
    failed_at: dict[str, float] = {}
    for rnd in range(args.rounds):
        for pct in budgets:
            for engine in engines:
                if engine in failed_at and pct < failed_at[engine]:
                    continue
                if rnd > 0 and runs.get((engine, pct)) and runs[(engine, pct)][0]["status"] != "ok":
                    continue
                r = runner.run(engine, spec_of(engine, pct), cap=cap_of(engine, pct), timeout=args.timeout)
                runs.setdefault((engine, pct), []).append(r)
                tok_s = f"{med(r['samples'], 'decode_tok_s'):.1f} tok/s" if r["status"] == "ok" else r["status"]
                peak = f", peak {r['cgroup_peak_bytes'] / MB:.0f} MB" if r["cgroup_peak_bytes"] else ""
                cap = f" (cap {r['cap_bytes'] / MB:.0f} MB)" if r["cap_bytes"] else ""
                print(f"[round {rnd + 1}/{args.rounds}] {pct:g}% {LABELS[engine]}{cap}: {tok_s}{peak}, {r['wall_s']:.0f} s", file=sys.stderr)
                near_cap = r["cap_bytes"] and r["cgroup_peak_bytes"] and r["cgroup_peak_bytes"] >= 0.95 * r["cap_bytes"]
                if r["status"] == "OOM-killed" or (r["status"] == "timeout" and near_cap):
                    failed_at[engine] = pct  # out of memory or thrashing at the cap: less memory will not help

    # 3. the ablation at one budget (flash configurations at the same active set, same cap)
    ablation: dict[str, list[dict]] = {}
    pa = args.ablation_budget
    if not args.skip_ablation:
        for rnd in range(args.rounds):
            for label, over in ABLATION:
                if label.startswith("naive"):
                    r = runs.get(("naive", pa), [None])[rnd] if rnd < len(runs.get(("naive", pa), [])) else None
                    r = r or runner.run("naive", spec_of("naive", pa), cap=cap_of("naive", pa), timeout=args.timeout)
                elif over == {"window": 4, "reads": "cost"} and rnd < len(runs.get(("flash", pa), [])):
                    r = runs[("flash", pa)][rnd]  # the sweep's flash run is this row's configuration
                else:
                    r = runner.run("flash", spec_of("flash", pa, **over), cap=cap_of("flash", pa), timeout=args.timeout)
                ablation.setdefault(label, []).append(r)
                ok = f"{med(r['samples'], 'decode_tok_s'):.1f} tok/s" if r["status"] == "ok" else r["status"]
                print(f"[ablation {pa:g}%] {label}: {ok}, {r['wall_s']:.0f} s", file=sys.stderr)

    # 4. perplexity
    ppl_spec = {"ppl_text": args.ppl_text, "ppl_windows": args.ppl_windows, "ppl_ctx": args.ppl_ctx,
                "ppl_skip": int(manifest["predictor"]["calibration_tokens"]) + int(manifest["predictor"]["eval_tokens"])}
    ppl: dict = {}
    if not args.skip_ppl:
        print("perplexity: dense ...", file=sys.stderr)
        r = runner.run("ppl-dense", ppl_spec, cgroup=False)
        ppl["dense"] = r.get("ppl")
        print(f"  {fmt(r.get('ppl'), '.3f')}, {r['wall_s']:.0f} s", file=sys.stderr)
        print("perplexity: every unit through the flash kernel (the naive engine's FFN math) ...", file=sys.stderr)
        r = runner.run("ppl-flash", {**ppl_spec, "pct": 100.0, "mode": "flash", "active_fraction": 1.0}, cgroup=False)
        ppl["naive"] = r.get("ppl")
        print(f"  {fmt(r.get('ppl'), '.3f')}, {r['wall_s']:.0f} s", file=sys.stderr)
        for pct in budgets:
            print(f"perplexity: flash at {pct:g}% ...", file=sys.stderr)
            r = runner.run("ppl-flash", {**ppl_spec, **spec_of("flash", pct)}, cgroup=False)
            ppl[("flash", pct)] = r.get("ppl") if r["status"] == "ok" else None
            print(f"  {fmt(r.get('ppl'), '.3f')}, {r['wall_s']:.0f} s", file=sys.stderr)

    # 5. report
    def summary(rs: list[dict] | None) -> dict:
        if not rs:
            return {"status": "not run"}
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            return {"status": rs[0]["status"], "cap": rs[0]["cap_bytes"], "wall": rs[0]["wall_s"]}
        samples = [s for r in ok for s in r["samples"]]
        out = {"status": "ok", "tok_s": med(samples, "decode_tok_s"), "peak": statistics.median(r["cgroup_peak_bytes"] or r["peak_rss_mb"] * 2**20 for r in ok),
               "io": statistics.median(r["io_bytes_per_token"] for r in ok), "cap": ok[0]["cap_bytes"], "rss": statistics.median(r["peak_rss_mb"] for r in ok)}
        if "bytes_per_token" in samples[0]:
            for k in ("bytes_per_token", "reads_per_token", "hit_rate", "measured_io_s", "predicted_io_s", "cached_units"):
                out[k] = med(samples, k)
            out["engine"] = ok[0]["engine"]
        return out

    S = {key: summary(rs) for key, rs in runs.items()}
    A = {label: summary(rs) for label, rs in ablation.items()}
    peak_word = "cgroup peak (MB)" if not runner.cgroup_problem else "peak RSS (MB)"
    lines = [
        f"# Flash inference under a DRAM budget ({time.strftime('%Y-%m-%d')}{', --quick' if q else ''})",
        "",
        f"Model: {manifest['model']['file']} ({manifest['dims']['n_layers']} layers, d_model {manifest['dims']['d_model']}, d_ff {manifest['dims']['d_ff']});"
        f" store {args.store}: {geo.n_units} units of {geo.unit_bytes} bytes per layer ({manifest['ffn_file']['bundles_per_unit']} neuron bundles each).",
        f"FFN budget 100% = engine.ffn_bytes = {geo.ffn_bytes / MB:.2f} MB (units {geo.n_layers * geo.n_units * geo.unit_bytes / MB:.2f} MB + down scales"
        f" {geo.down_scale_bytes / MB:.2f} MB); the GGUF's ffn_* tensors are {g_ffn / MB:.2f} MB. MB = 10^6 bytes.",
        f"Prompt: decode.py's ({len(PROMPT)} chars); {args.new_tokens} greedy tokens per generation, end-of-text ignored; {args.reps} timed generations"
        f" per worker after an 8-token warm-up, {args.rounds} round(s) of fresh workers, engines alternating; tok/s = median decode tok/s.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {_mem_total_mb():.0f} MB RAM, {platform.platform()};"
        f" torch {__import__('torch').__version__}; {args.threads} compute threads; store on {_fs_of(args.store)}.",
        f"Flash reads: O_DIRECT {'yes' if S.get(('flash', budgets[0]), {}).get('engine', {}).get('direct', True) else 'NO (buffered + FADV_DONTNEED)'};"
        f" cost model: {cost_model_source(args.store)}.",
        f"Command: `{' '.join(['OMP_WAIT_POLICY=ACTIVE python benchmarks/flash_smollm2.py'] + [_quote(a) for a in sys.argv[1:]])}`; total time {(time.perf_counter() - t_start) / 60:.1f} min (at the time of writing this report).",
        "",
        *[f"Note: {n}" for n in args.note],
        *(["", f"**Warning**: {len(runner.busy_runs)} timed run(s) started while other processes used the CPUs (after waiting"
            f" {args.wait_idle:g} s): {', '.join(runner.busy_runs)}; their speeds are not comparable."] if runner.busy_runs else []),
        "",
        "## Memory method",
        "",
    ]
    if runner.cgroup_problem:
        lines += [f"Memory cgroups unavailable ({runner.cgroup_problem}): nothing was capped; the peak column is the worker's peak RSS.", ""]
    else:
        what = ("the group's `memory.max_usage_in_bytes` (anonymous memory *and* page cache: libraries, the GGUF / store files read while loading)"
                if args.baseline == "peak" else
                "the group's resident working set at the end of the run, `memory.stat` rss + mapped_file (anonymous memory and mapped files;"
                " page cache that is not mapped, such as files read once while loading, gets no allowance)")
        lines += [
            "Each engine's baseline without FFN weights: one uncapped run in a fresh cgroup-v1 memory group after"
            f" `echo 3 > /proc/sys/vm/drop_caches`; baseline = {what} minus the FFN weights that run held."
            f" Every timed run: a fresh group with `memory.limit_in_bytes` = baseline + budget, budget = X% x {geo.ffn_bytes / MB:.2f} MB"
            f" (the same bytes for every engine), caches dropped first, {args.timeout:g} s timeout. No swap, so anonymous memory cannot be paged"
            " out: an engine whose anonymous memory exceeds the cap is OOM-killed; file-backed pages (mmap, code) are evicted and re-read.",
            "",
            "| engine | uncapped peak (MB) | rss / cache / mapped_file at exit (MB) | FFN weights subtracted | baseline (MB) |",
            "|---|---:|---:|---|---:|",
        ]
        for engine in engines:
            d = baseline_detail[engine]
            cg = d["cgroup"]
            rc = f"{cg.get('rss', 0) / MB:.0f} / {cg.get('cache', 0) / MB:.0f} / {cg.get('mapped_file', 0) / MB:.0f}" if cg else "–"
            lines.append(f"| {LABELS[engine]} | {d['max_usage'] / MB:.1f} | {rc} | {d['how']} | {baseline[engine] / MB:.1f} |")
        lines.append("")

    lines += [
        "## Sweep: decode speed against the FFN budget",
        "",
        f"Active fraction: units computed per layer / {geo.n_units} (flash: the store's operating point, {geo.op_k} units, where the budget's cache holds"
        " every unit, else min(operating point, 90% of the cache) to leave the window room);"
        " dense, naive and llama.cpp compute every neuron). MB/token: the flash engine's counters over decode tokens; storage MB/token: /proc/self/io"
        " read_bytes over the timed generations / tokens through the model (prompt + decode steps; any engine; O_DIRECT reads and page faults alike).",
        f"ppl: {args.ppl_text} held out (after the store's {ppl_spec['ppl_skip']} calibration + evaluation tokens), {args.ppl_windows} windows x {args.ppl_ctx} tokens;"
        " dense once (runtime kernels); naive = every unit through the flash kernel (flash mode, active fraction 1.0, 100%), once.",
        "",
        f"| budget | budget (MB) | engine | cap (MB) | decode (tok/s) | MB/token | storage MB/token | {peak_word} | cache units/layer | active fraction | ppl |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pct in budgets:
        for engine in engines:
            s = S.get((engine, pct), {"status": "not run"})
            if s["status"] == "not run" and engine in failed_at:
                s = {"status": f"skipped ({runs[(engine, failed_at[engine])][0]['status']} at {failed_at[engine]:g}%)"}
            cap = fmt(cap_of(engine, pct) / MB if cap_of(engine, pct) else None)
            if engine == "flash":
                k, _ = geo.operating_point(pct)
                af, units, p = f"{k / geo.n_units:.3f} ({k})", str(geo.capacity(pct)), ppl.get(("flash", pct))
            elif engine == "naive":
                af, units, p = "1.000", str(geo.n_units), ppl.get("naive")
            else:
                af, units, p = "1.000", "–", ppl.get("dense") if engine == "dense" else None
            ppl_txt = fmt(p, ".3f") + (f" ({p / ppl['dense'] - 1:+.1%})" if p and ppl.get("dense") and engine != "dense" else "")
            if s["status"] != "ok":
                lines.append(f"| {pct:g}% | {geo.budget_bytes(pct) / MB:.1f} | {LABELS[engine]} | {cap} | **{s['status']}** | – | – | – | {units} | {af} | {ppl_txt} |")
                continue
            mbt = fmt(s["bytes_per_token"] / MB, ".2f") if "bytes_per_token" in s else "0 (resident)" if engine == "dense" else "–"
            lines.append(
                f"| {pct:g}% | {geo.budget_bytes(pct) / MB:.1f} | {LABELS[engine]} | {cap} | {s['tok_s']:.1f} | {mbt} | {fmt(s['io'] / MB, '.2f')}"
                f" | {s['peak'] / MB:.1f} | {units} | {af} | {ppl_txt} |"
            )

    if A:
        base = A[ABLATION[0][0]]
        k, _ = geo.operating_point(pa)
        lines += [
            "",
            f"## Ablation at the {pa:g}% budget ({geo.budget_bytes(pa) / MB:.1f} MB; active fraction {k / geo.n_units:.3f} = {k} units per layer, cache {geo.capacity(pa)} units per layer)",
            "",
            "Each row adds one technique to the row above (the paper's Table 2): every row but the first computes the same predicted active set.",
            "",
            "| configuration | decode (tok/s) | MB/token | reads/token | hit rate | I/O ms/token measured / predicted | units computed/layer | speedup vs naive |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, _ in ABLATION:
            s = A[label]
            if s["status"] != "ok":
                lines.append(f"| {label} | **{s['status']}** | – | – | – | – | – | – |")
                continue
            sp = f"{s['tok_s'] / base['tok_s']:.2f}x" if base["status"] == "ok" else "–"
            lines.append(
                f"| {label} | {s['tok_s']:.1f} | {s['bytes_per_token'] / MB:.2f} | {s['reads_per_token']:.0f} | {s['hit_rate']:.1%}"
                f" | {s['measured_io_s'] * 1e3:.1f} / {s['predicted_io_s'] * 1e3:.1f} | {s['cached_units'] / geo.n_layers:.0f} | {sp} |"
            )

    pred = manifest["predictor"]
    quality = pred.get("quality", [])
    lines += [
        "",
        "## The store's operating point (chosen at convert time)",
        "",
        f"Predictor rank {pred['rank']}, fitted on {pred['calibration_tokens']} tokens of {pred['corpus']}; operating point chosen on the next"
        f" {pred['eval_tokens']} tokens (windows of {pred['ctx']}) as the smallest fraction within +{pred['tolerance']:.0%} of dense ppl {pred['dense_ppl']:.3f}:"
        f" **{pred['active_fraction']:.0%}** ({geo.op_k}/{geo.n_units} units per layer).",
        "",
        "| fraction of units | units/layer | ppl | vs dense | predictor recall | predictor precision |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in pred["sweep"]:
        rp = f"{s['recall']:.3f} | {s['precision']:.3f}" if "recall" in s else "– | –"
        lines.append(f"| {s['fraction']:.0%} | {s['k_units']} | {s['ppl']:.3f} | {s['ppl'] / pred['dense_ppl'] - 1:+.1%} | {rp} |")
    lines += ["", "Recall and precision: mean over layers, held-out tokens, of the predicted units' neurons against the true top-|h| neurons (as many as the units hold); chance is the fraction itself."]
    if quality:
        rec = [x["recall"] for x in quality]
        prc = [x["precision"] for x in quality]
        lines += ["", f"Predictor quality at the operating point on the held-out tokens: mean recall {statistics.mean(rec):.3f}"
                  f" (min {min(rec):.3f}, layer {rec.index(min(rec))}), mean precision {statistics.mean(prc):.3f} (min {min(prc):.3f})."]

    # the final ratio lines, at the ablation budget
    fs, ns, ls = S.get(("flash", pa), {}), S.get(("naive", pa), {}), S.get(("llama", pa), {})
    def ok(s: dict) -> bool:
        return s.get("status") == "ok"

    r_naive = f"{fs['tok_s'] / ns['tok_s']:.2f}" if ok(fs) and ok(ns) else "n/a (a run failed)"
    if "llama" not in engines:
        r_llama = "n/a (llama.cpp not installed)" if not llama_available() else "n/a (--no-llama)"
    else:
        why = ls.get("status") or (f"skipped after {runs[('llama', failed_at['llama'])][0]['status']} at {failed_at['llama']:g}%" if "llama" in failed_at else "not run")
        r_llama = f"{fs['tok_s'] / ls['tok_s']:.2f}" if ok(fs) and ok(ls) else f"n/a (llama.cpp {why}{'' if ok(fs) else ', flash ' + str(fs.get('status'))})"
    r_bytes = f"{fs['bytes_per_token'] / ns['bytes_per_token']:.3f}" if ok(fs) and ok(ns) else "n/a (a run failed)"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("flash_smollm2_quick" if q else "flash_smollm2")
    png = RESULTS / f"{stem}.png"
    try:
        plot(png, budgets, engines, S, geo, baseline if not runner.cgroup_problem else None)
        lines += ["", f"Plot: [{png.name}]({png.name})."]
    except Exception as exc:  # noqa: BLE001 (matplotlib missing or failing must not lose the tables)
        print(f"plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    lines += [
        "",
        f"ratio flash/naive decode = {r_naive}",
        f"ratio flash/llama.cpp decode = {r_llama}",
        f"bytes per token flash/naive = {r_bytes}",
    ]
    report = "\n".join(lines) + "\n"
    write_text_atomic(RESULTS / f"{stem}.md", report)
    print(report, end="")


def plot(path: Path, budgets: list[float], engines: list[str], S: dict, geo: Geometry, baseline: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = {"dense": "s", "naive": "v", "llama": "^", "flash": "o"}
    for engine in engines:
        xs, ys, fx = [], [], []
        for pct in sorted(budgets):
            s = S.get((engine, pct))
            if s is None:
                continue
            if s["status"] == "ok":
                xs.append(geo.budget_bytes(pct) / MB)
                ys.append(s["tok_s"])
            else:
                fx.append(geo.budget_bytes(pct) / MB)
        (line,) = ax.plot(xs, ys, marker=markers[engine], label=LABELS[engine])
        if fx:
            ax.plot(fx, [0] * len(fx), linestyle="none", marker="x", markersize=9, color=line.get_color(),
                    label=f"{LABELS[engine]}: timeout / OOM / skipped")
    ax.set_xlabel(f"FFN DRAM budget (MB; 100% = {geo.ffn_bytes / MB:.1f} MB)" + ("; cap = engine baseline + budget" if baseline else ""))
    ax.set_ylabel("decode tok/s (median)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Decode speed under a DRAM budget (equal memory per engine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _mem_total_mb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return float("nan")


def _fs_of(path: Path) -> str:
    try:
        best = ("", "?", "?")
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fs = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[0]):
                best = (mnt, dev, fs)
        return f"{best[1]} ({best[2]})"
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
