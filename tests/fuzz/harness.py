"""The fuzzing harness: damaged inputs through the real entry point, `edgewise.cli.main`, one forked
child per case with a wall-time limit and an address-space limit, each outcome classified.

The parent is a fresh process that imports edgewise (and torch) once and then only forks, so a
case costs what the command does, not an interpreter start; it never runs torch itself, so no
OpenMP pool is copied into a child. Children run two at a time (the test machine has two cores).

Outcomes: "clean error" (exit 1 or 2 with one `error:` line and no traceback), "success" (exit 0),
and the four faults: "traceback", "signal" (killed by SIGSEGV, SIGABRT, ...), "hang" (over the time
limit), "memory" (an allocation refused under the address-space limit: MemoryError or the
allocator's own error).

    python -m tests.fuzz --seed 0     (what `make test` runs: 300 GGUFs, 100 of each other format)
    make fuzz N=3000                  (more of each)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FAULTS = ("traceback", "signal", "hang", "memory")
OUTCOMES = ("clean error", "success", *FAULTS)
TRACEBACK_EXIT, MEMORY_EXIT = 70, 71
TIME_LIMIT_S = 30.0
EXTRA_ADDRESS_SPACE = 6 << 30  # on top of what the parent has mapped (torch maps a lot of it)


@dataclass
class Case:
    fmt: str
    description: str
    argv: list[str]


@dataclass
class Result:
    case: Case
    outcome: str
    seconds: float
    last_line: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def counts(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for r in self.results:
            out.setdefault(r.case.fmt, Counter())[r.outcome] += 1
        return out

    def faults(self) -> list[Result]:
        return [r for r in self.results if r.outcome in FAULTS]

    def table(self) -> str:
        lines = ["| format | cases | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
        for fmt, c in self.counts().items():
            lines.append(f"| {fmt} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
        return "\n".join(lines)


def _child(argv: list[str], err_path: str, limit: int) -> None:
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    code = 0
    try:
        from edgewise.cli import main

        code = main(argv) or 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except MemoryError:
        code = MEMORY_EXIT
    except BaseException:  # noqa: BLE001 - what the harness exists to catch
        import traceback

        traceback.print_exc()
        code = TRACEBACK_EXIT
    try:
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(code)


def _classify(status: int, err: str) -> str:
    if os.WIFSIGNALED(status):
        return "signal"
    code = os.WEXITSTATUS(status)
    if code == MEMORY_EXIT or "can't allocate memory" in err or "MemoryError" in err or "std::bad_alloc" in err:
        return "memory"
    if code == TRACEBACK_EXIT or "Traceback (most recent call last)" in err:
        return "traceback"
    if code == 0:
        return "success"
    if code in (1, 2) and any("error:" in line for line in err.splitlines()):
        return "clean error"
    return "traceback"  # any other exit: an uncaught failure


def _address_limit() -> int:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    return vm + EXTRA_ADDRESS_SPACE


def run_cases(cases: list[Case], jobs: int = 2, time_limit_s: float = TIME_LIMIT_S, progress=None) -> Report:
    limit = _address_limit()
    report = Report()
    running: dict[int, tuple[Case, float, str]] = {}
    pending = list(reversed(cases))
    with tempfile.TemporaryDirectory(prefix="ew-fuzz-err-") as errs:
        while pending or running:
            while pending and len(running) < jobs:
                case = pending.pop()
                err_path = os.path.join(errs, f"{len(report.results) + len(running)}-{time.monotonic_ns()}.txt")
                pid = os.fork()
                if pid == 0:
                    _child(case.argv, err_path, limit)
                running[pid] = (case, time.monotonic(), err_path)
            time.sleep(0.002)
            for pid, (case, t0, err_path) in list(running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                elapsed = time.monotonic() - t0
                if not done:
                    if elapsed < time_limit_s:
                        continue
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    outcome = "hang"
                    err = ""
                else:
                    err = Path(err_path).read_text(errors="replace")
                    outcome = _classify(status, err)
                del running[pid]
                lines = [line for line in err.splitlines() if line.strip()]
                report.results.append(Result(case, outcome, elapsed, lines[-1][:300] if lines else ""))
                if progress is not None:
                    progress(len(report.results), len(cases))
    return report


def make_cases(work: Path, seeds: dict[str, Path], counts: dict[str, int], seed: int) -> list[Case]:
    """Write each damaged file under `work` and the command that reads it."""
    import numpy as np

    from tests.fuzz import mutators
    from tests.fuzz.seeds import scheme

    rng = random.Random(seed)
    cases: list[Case] = []
    gguf = seeds["gguf"].read_bytes()
    fields = mutators.gguf_fields(gguf)
    for i in range(counts.get("gguf", 0)):
        data, what = mutators.mutate_gguf(gguf, fields, rng)
        path = work / f"gguf-{i}.gguf"
        path.write_bytes(data)
        cases.append(Case("gguf", what, ["generate", "--model", str(path), "--no-compile", "--threads", "1", "--max-tokens", "2", "hi"]))
    with np.load(seeds["npz"]) as seed_npz:
        x, y = seed_npz["x"], seed_npz["y"]
    for i in range(counts.get("npz", 0)):
        data, what = mutators.mutate_npz(x, y, rng)
        path = work / f"data-{i}.npz"
        path.write_bytes(data)
        cases.append(Case("npz", what, ["tiny", "train", "--data", str(path), "--train-samples", "2", "--val-samples", "2", "--resolution", "32"]))
    for i in range(counts.get("images", 0)):
        folder = work / f"images-{i}"
        what = mutators.mutate_image_folder(seeds["images"], folder, rng)
        cases.append(Case("image folder", what, ["tiny", "train", "--data", str(folder), "--train-samples", "2", "--val-samples", "2", "--resolution", "32"]))
    for i in range(counts.get("flash", 0)):
        store = work / f"store-{i}"
        what = mutators.mutate_flash_store(seeds["flash"], store, rng)
        cases.append(Case("flash store", what, ["generate", "--flash", str(store), "--model", str(seeds["gguf"]), "--dram-budget", "100%",
                                                "--threads", "1", "--max-tokens", "2", "hi"]))
    for i in range(counts.get("plan", 0)):
        store = work / f"plan-{i}"
        what = mutators.mutate_plan_store(seeds["plan"], seeds["gguf"], store, rng)
        cases.append(Case("plan store", what, ["generate", "--flash", str(store), "--threads", "1", "--max-tokens", "2", "hi"]))
    for i in range(counts.get("scheme", 0)):
        data, what = mutators.mutate_scheme(scheme(), rng)
        path = work / f"scheme-{i}.json"
        path.write_bytes(data)
        cases.append(Case("scheme", what, ["tiny", "plan", "--scheme", str(path), "--resolution", "32", "--png", str(work / f"plan-{i}.png")]))
    rng.shuffle(cases)  # mix slow and fast cases across the two workers
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=int, default=300)
    p.add_argument("--npz", type=int, default=100)
    p.add_argument("--scheme", type=int, default=100)
    p.add_argument("--images", type=int, default=100, help="damaged image folders (through `tiny train`)")
    p.add_argument("--flash", type=int, default=100, help="damaged flash stores (through `generate --flash`)")
    p.add_argument("--plan", type=int, default=100, help="damaged streaming plan stores and their GGUFs (through `generate --flash`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", type=Path, help="write every case and its outcome here")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads: two children share two cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import edgewise.cli  # noqa: F401 - imported once, before the forks
    import edgewise.lm.runtime  # noqa: F401
    import edgewise.tiny.transfer  # noqa: F401

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ew-fuzz-") as d:
        work = Path(d)
        made = subprocess.run([sys.executable, "-m", "tests.fuzz.seeds", str(work / "seeds")], capture_output=True, text=True, check=True)
        seeds = {k: Path(v) for k, v in json.loads(made.stdout.strip().splitlines()[-1]).items()}
        from edgewise.kernels import quant_matmul_ops

        quant_matmul_ops()  # loads the library the seeds' child built (no threads start): no child builds or locks it
        counts = {"gguf": args.gguf, "npz": args.npz, "scheme": args.scheme, "images": args.images, "flash": args.flash, "plan": args.plan}
        cases = make_cases(work, seeds, counts, args.seed)
        report = run_cases(cases, jobs=args.jobs)
    print(report.table())
    for r in report.faults():
        print(f"FAULT {r.outcome}: {r.case.fmt} ({r.case.description}): {r.last_line}")
    print(f"{len(report.results)} cases in {time.perf_counter() - t0:.0f} s; faults: {len(report.faults())}")
    if args.json:
        args.json.write_text(json.dumps([{"format": r.case.fmt, "damage": r.case.description, "outcome": r.outcome, "seconds": round(r.seconds, 3),
                                          "last_line": r.last_line} for r in report.results], indent=1))
    return 1 if report.faults() else 0
