"""Process memory, as the OS counts it."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def current_rss_mb() -> float:
    return _status_kib("VmRSS") / 1024


def rss_anon_bytes() -> float:
    """Anonymous resident memory now (RssAnon): what the process holds that cannot be dropped under memory pressure.
    RSS also counts the pages of mapped files (a GGUF's), which the kernel reclaims as page cache."""
    return _status_kib("RssAnon") * 1024
