"""Real commands killed (SIGKILL) at random points, many times: the next command never accepts a partial
artifact, and never loses the previous complete one (issue 13, finding 6; `edgewise.files`).

Each run is the real CLI in a subprocess. Half the kills fall at a uniformly random time over a whole
run; the other half fall inside the write itself (a random delay after the run's temp folder appears
beside the target), where a partial artifact could arise. After every kill, what a later command
reads decides: the artifact must open as complete and be the newest version that finished, or a
version whose run was killed after its swap; before any run finished, it must be missing."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgewise.errors import EdgewiseError
from edgewise.models import default_model_path


def _kill_runs(command: Callable[[int], list[str]], target: Path, state: Callable[[Path], int | None], runs: int, seed: int) -> dict[str, int]:
    """`runs` runs of `command(version)` writing `target`, most killed; `state(target)` is the complete version a
    later command finds there (None when there is none) and must raise on a partial one."""
    rng = random.Random(seed)
    parent = target.parent
    full = None  # seconds a whole run takes, measured by the first (unkilled) run
    complete = None  # the newest version known to have landed whole
    counts = {"killed": 0, "killed in the write": 0, "finished": 0}
    for version in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edgewise", *command(version)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if version > 0 and version % 2 == 0:  # kill inside the write: a random delay after its temp folder appears
            while proc.poll() is None and not any(p.name.startswith(".tmp-") for p in parent.iterdir()):
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.05))
            counts["killed in the write"] += proc.poll() is None
        elif version > 0:
            time.sleep(rng.uniform(0.0, 0.8 * full))  # a later run may be quicker than the first (warm caches)
        if proc.poll() is None and version > 0:
            proc.send_signal(signal.SIGKILL)
            counts["killed"] += 1
        _, err = proc.communicate()
        if version == 0:
            assert proc.returncode == 0, err
            full = time.perf_counter() - start
        found = state(target)
        if proc.returncode == 0:
            assert found == version, err
            counts["finished"] += 1
        else:
            assert proc.returncode == -signal.SIGKILL, err
            assert found in (complete, version), f"after a kill, {target} holds version {found}; complete before: {complete}"
        complete = found
    proc = subprocess.run([sys.executable, "-m", "edgewise", *command(runs)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert state(target) == runs
    assert sorted(p.name for p in parent.iterdir() if p.name.endswith(target.name)) == [target.name], "the next run cleared every leftover"
    return counts


def test_killed_flash_convert_never_leaves_a_partial_store_nor_loses_the_complete_one(tmp_path):
    from edgewise.flash.store import FlashStore
    from tests.fuzz.seeds import write_gguf

    model = write_gguf(tmp_path / "tiny.gguf", default_model_path())
    store = tmp_path / "stores" / "store"
    store.parent.mkdir()

    def command(version: int) -> list[str]:  # the version is recorded in the manifest, as its calibration token count
        return ["flash", "convert", str(store), "--model", str(model), "--calibration-tokens", str(256 + version), "--eval-tokens", "128", "--rank", "4"]

    def state(path: Path) -> int | None:
        try:
            opened = FlashStore.open(path, verify=True)  # every layer's sha256 checked
        except EdgewiseError as exc:
            assert "no such flash store directory" in str(exc), exc  # only a missing store, never a partial one
            return None
        opened.resident()  # the resident tensors read back
        return opened.manifest["predictor"]["calibration_tokens"] - 256

    counts = _kill_runs(command, store, state, runs=9, seed=0)
    assert counts["killed"] >= 4 and counts["killed in the write"] >= 2, counts


def test_killed_tiny_codegen_never_leaves_a_partial_project_nor_loses_the_complete_one(tmp_path):
    from tests.fuzz.seeds import write_npz

    data = write_npz(tmp_path / "data.npz")
    out = tmp_path / "projects" / "project"
    out.parent.mkdir()

    def command(version: int) -> list[str]:  # the version is the seed, recorded in ew_model.json
        return ["tiny", "codegen", "mbv2-w0.35", "--data", str(data), "--resolution", "32", "--seed", str(version), "--out", str(out)]

    def state(path: Path) -> int | None:
        if not path.exists():
            return None
        manifest = json.loads((path / "ew_model.json").read_text())  # the last file written: a partial project lacks it
        for name in ("ew_ops.c", "ew_ops.h", "ew_model.c", "ew_model.h", "ew_flash.bin", "ew_flash.S"):
            assert (path / name).stat().st_size > 0, name
        return manifest["seed"]

    counts = _kill_runs(command, out, state, runs=7, seed=1)
    assert counts["killed"] >= 3, counts


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
