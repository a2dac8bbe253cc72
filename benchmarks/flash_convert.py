"""`edgewise flash convert` on the default model: wall time and peak RSS, on a quiet machine and beside
one competing CPU-bound process.

Each run is a fresh `python -m edgewise flash convert` process writing a store into a temp folder, with
the command's defaults (8192 calibration tokens, 1024 held out); its peak RSS is the kernel's
(`wait4`'s ru_maxrss: anonymous memory plus mapped file pages, e.g. the GGUF's; a child can inherit
its parent's peak there, but this parent stays far below a convert's). "Busy" is one
`python -c "while True: pass"` at normal priority, started before the convert and killed after it.

`--against REV` also runs the convert of another git revision the same way (a temporary `git worktree`,
this venv), alternating with this tree's, round by round: the peer for the ratios.

    python benchmarks/flash_convert.py                       # writes benchmarks/results/flash_convert.md
    python benchmarks/flash_convert.py --against 97e06fb     # against the convert that held the whole fp32 model

Its last lines: `flash convert quiet: time = X s, peak_rss = Y MB`, the same for busy, and with
--against, `ratio peak_rss REV/this = R` and `ratio time REV/this busy = S`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from edgewise.files import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_convert(source: Path, model: str | None, busy: bool) -> dict:
    """One convert in a fresh process: wall seconds and peak RSS (MB)."""
    with tempfile.TemporaryDirectory(prefix="ew-convert-") as tmp:
        cmd = [sys.executable, "-m", "edgewise", "flash", "convert", str(Path(tmp) / "store")] + (["--model", model] if model else [])
        env = dict(os.environ, PYTHONPATH=str(source))
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            if hog is not None:
                time.sleep(0.5)  # the competitor is running before the convert starts
            with open(Path(tmp) / "out", "w+") as out, open(Path(tmp) / "err", "w+") as err:
                start = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=out, stderr=err)
                _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS
                seconds = time.perf_counter() - start
                proc.returncode = code = os.waitstatus_to_exitcode(status)
                out.seek(0)
                err.seek(0)
                stdout, stderr = out.read(), err.read()
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    if code != 0:
        raise SystemExit(f"convert ({source}) failed with {code}:\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "log": stdout.strip().splitlines()}


@contextmanager
def worktree(rev: str):
    with tempfile.TemporaryDirectory(prefix="ew-rev-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True, capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF path or embedded model name (default: the embedded default model)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per phase and tree; medians are reported (default 1: a convert takes minutes)")
    ap.add_argument("--against", metavar="REV", help="also run the convert of this git revision, alternating with this tree's")
    ap.add_argument("--out", default=str(RESULTS / "flash_convert.md"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    from tqdm import tqdm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # what runs
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit += " (with uncommitted changes)" if dirty else ""
    phases = ("quiet", "busy")
    with (worktree(args.against) if args.against else _nothing()) as peer:
        trees = [("this tree", ROOT)] + ([(args.against, peer)] if peer else [])
        runs: dict[tuple[str, str], list[dict]] = {(t, p): [] for t, _ in trees for p in phases}
        bar = tqdm(total=args.rounds * len(phases) * len(trees), desc="converts", unit="run")
        for _ in range(args.rounds):
            for phase in phases:
                for name, source in trees:
                    runs[(name, phase)].append(run_convert(source, args.model, phase == "busy"))
                    bar.update()
        bar.close()

    med = {key: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mb")} for key, rs in runs.items()}
    lines = [
        "# flash convert: time and peak memory",
        "",
        f"Model: {args.model or 'the embedded default (SmolLM2-135M Q4_1)'}; command defaults (8192 calibration tokens, 1024 held out).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; commit {commit}.",
        f"Medians of {args.rounds} run(s) each, fresh processes; peak RSS is the kernel's ru_maxrss (anonymous + mapped file pages).",
        "Busy: one competing `while True: pass` process.",
        "",
        "| tree | phase | time (s) | peak RSS (MB) |",
        "|---|---|---:|---:|",
    ]
    for (name, phase), m in med.items():
        lines.append(f"| {name} | {phase} | {m['seconds']:.1f} | {m['peak_rss_mb']:.0f} |")
    last = runs[("this tree", "quiet")][-1]["log"]
    lines += ["", "The convert's own report (this tree, quiet):", "", *[f"    {line}" for line in last], ""]
    this_q, this_b = med[("this tree", "quiet")], med[("this tree", "busy")]
    tail = [
        f"busy/quiet time this tree = {this_b['seconds'] / this_q['seconds']:.2f}",
        f"flash convert quiet: time = {this_q['seconds']:.0f} s, peak_rss = {this_q['peak_rss_mb']:.0f} MB",
        f"flash convert busy: time = {this_b['seconds']:.0f} s, peak_rss = {this_b['peak_rss_mb']:.0f} MB",
    ]
    if args.against:
        peer_q, peer_b = med[(args.against, "quiet")], med[(args.against, "busy")]
        tail += [
            f"ratio peak_rss {args.against}/this = {peer_q['peak_rss_mb'] / this_q['peak_rss_mb']:.2f}",
            f"ratio time {args.against}/this quiet = {peer_q['seconds'] / this_q['seconds']:.2f}",
            f"ratio time {args.against}/this busy = {peer_b['seconds'] / this_b['seconds']:.2f}",
        ]
    text = "\n".join(lines + ["```", *tail, "```", ""])
    write_text_atomic(args.out, text)
    print(text)
    print(f"wrote {args.out}")
    return 0


@contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    raise SystemExit(main())
