"""The fuzzing harness (tests/fuzz): its default sample must end without a fault, and the harness
itself must see each kind of fault (a harness that cannot fail proves nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SELF_TEST = r"""
import os, signal, sys, time
import edgewise.cli
from tests.fuzz.harness import Case, run_cases

def fake_main(argv):
    kind = argv[0]
    if kind == "raise":
        raise KeyError("boom")
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        time.sleep(60)
    if kind == "alloc":
        bytearray(1 << 44)
    if kind == "clean":
        print("edgewise: error: a clean one", file=sys.stderr)
        return 1
    return 0

edgewise.cli.main = fake_main
report = run_cases([Case("self", k, [k]) for k in ("raise", "segv", "hang", "alloc", "clean", "ok")], jobs=2, time_limit_s=2)
print(sorted((r.case.description, r.outcome) for r in report.results))
"""


def test_harness_sees_every_kind_of_fault():
    out = subprocess.run([sys.executable, "-c", SELF_TEST], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(sorted([
        ("alloc", "memory"), ("clean", "clean error"), ("hang", "hang"), ("ok", "success"), ("raise", "traceback"), ("segv", "signal"),
    ]))  # fmt: skip


def test_default_sample_has_no_faults():
    """300 damaged GGUFs, 100 damaged flash stores and 100 damaged plan stores (through `generate`), 100 npz datasets and 100
    image folders (`tiny train`), 100 schemes (`tiny plan`), seed 0: every one a clean error or a
    success. `make fuzz N=...` runs more."""
    out = subprocess.run([sys.executable, "-m", "tests.fuzz", "--seed", "0"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    print(out.stdout)
    assert out.returncode == 0 and "faults: 0" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]
    for row in ("| gguf | 300 |", "| flash store | 100 |", "| plan store | 100 |", "| npz | 100 |", "| image folder | 100 |", "| scheme | 100 |"):
        assert row in out.stdout
