"""Process memory, as the OS counts it."""

from __future__ import annotations

import resource


def release_freed_memory() -> None:
    """Make glibc give freed blocks of 64 KiB and more back to the OS at once (mmap them; trim the heap at 64 KiB).
    Its default threshold grows with every large block freed, after which such blocks come from the heap and stay
    resident: a training step's activations, freed each step, then count in the RSS for good. A process-wide
    setting: callers that measure their own memory (`edgewise.personalize.tune`) set it. No-op off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 16)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS count (VmHWM) afresh from the current RSS (`/proc/self/clear_refs`, Linux 4.0+), so
    that a phase's own peak can be read with `rss_high_water_mb`; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_high_water_mb() -> float:
    """Peak RSS since the process started or since `reset_peak_rss`, in MiB."""
    return _status_kib("VmHWM") / 1024


def current_rss_mb() -> float:
    return _status_kib("VmRSS") / 1024


def rss_anon_bytes() -> float:
    """Anonymous resident memory now (RssAnon): what the process holds that cannot be dropped under memory pressure.
    RSS also counts the pages of mapped files (a GGUF's), which the kernel reclaims as page cache."""
    return _status_kib("RssAnon") * 1024
