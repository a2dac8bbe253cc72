"""Memory caps (`edgewise.metrics.memcap`): a real cgroup-v1 group limits a child, counts its page cache and
reports its peak and an OOM kill. Skipped where no writable memory controller exists (not root)."""

from __future__ import annotations

import os
import sys

import pytest

from edgewise.errors import EdgewiseError
from edgewise.metrics import memcap

pytestmark = pytest.mark.skipif(not memcap.available(), reason="no writable cgroup-v1 memory controller (needs root)")

TOUCH = "import sys; n = int(sys.argv[1]) << 20; a = bytearray(n); a[::4096] = b'x' * len(range(0, n, 4096)); print(len(a))"
READ = "import sys\nwith open(sys.argv[1], 'rb') as f:\n    while f.read(1 << 20): pass"
MiB = 1 << 20


def test_a_child_within_its_limit_runs_and_its_peak_is_measured():
    run = memcap.run_capped([sys.executable, "-c", TOUCH, "64"], 256 * MiB)
    assert run.returncode == 0 and not run.killed_by_limit and run.stdout.strip() == str(64 * MiB)
    assert 64 * MiB <= run.peak_bytes <= 256 * MiB
    assert "total_rss" in run.stat and "total_cache" in run.stat


def test_a_child_over_its_limit_is_killed_and_says_so():
    run = memcap.run_capped([sys.executable, "-c", TOUCH, "300"], 100 * MiB)
    assert run.returncode == -9 and run.killed_by_limit
    assert run.peak_bytes <= 100 * MiB


def test_page_cache_counts_against_the_limit_once_the_file_is_evicted(tmp_path):
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(64 * MiB))  # written by this process: its pages are cached, charged elsewhere
    cold = memcap.run_capped([sys.executable, "-c", READ, str(data)], 512 * MiB, evict_files=[data])
    assert cold.returncode == 0 and cold.peak_bytes >= 60 * MiB  # the whole file came through the group's page cache
    small = memcap.run_capped([sys.executable, "-c", READ, str(data)], 40 * MiB, evict_files=[data])
    assert small.returncode == 0 and not small.killed_by_limit and small.peak_bytes <= 40 * MiB  # clean pages reclaimed, not killed


def test_bad_limits_are_refused():
    with pytest.raises(EdgewiseError, match="at least 1 MiB"):
        memcap.run_capped([sys.executable, "-c", "pass"], 4096)
