"""How many threads decode should use: the CPUs actually free, measured, not guessed.

Batch-1 decode is a chain of small parallel regions; with `OMP_WAIT_POLICY=ACTIVE` each OpenMP
worker spins between them on a core it assumes it owns. When another process wants one of
those cores, the spinning worker and the competitor take turns on it and every region waits for
the slower of the two: on a 2-core machine one CPU-bound neighbour cuts decode to ~0.26x with 2
threads, while 1 thread keeps ~0.85x. So the thread count follows the free CPUs:

* `usable_cpus()`: the CPUs this process may run on (affinity mask, cgroup v2 `cpu.max` or v1
  CFS quota), at least 1.
* `CpuMeter`: over an interval, how many CPUs *other* processes keep busy. It reads the busy
  jiffies of our CPUs from `/proc/stat` (user + nice + system + irq + softirq + steal; not idle
  or iowait) and subtracts this process's own CPU time from `/proc/self/stat` (utime + stime,
  all threads), so our own spinning workers never count as competition. Two small file reads.
* `threads_for(sample)`: the rule, `clamp(floor(free + 0.5), 1, usable)` with
  `free = min(limit, n_cpus - others_busy)`; it rounds half up, so a competitor needs at least
  half a CPU to take a thread away (see `threads_for` for why that threshold).
* `choose_threads(requested, ...)`: `--threads` validated, or the rule on one measurement.
* `HoldBack`: whether compute should leave one CPU to the process's own reader threads (flash
  streaming), decided by timing passes both ways, since the meter cannot see that competition.
* `ThreadGovernor`: during generation, `tick()` once per token re-measures every `period_s` and
  changes `torch.set_num_threads` when the rule's answer changed on `confirm` consecutive
  measurements. On a decrease it also releases the OpenMP pool's idle workers
  (`omp_pause_resource_all`): torch runs a 1-thread region inline, so without that a worker
  left over from 2-thread regions keeps spinning under `OMP_WAIT_POLICY=ACTIVE` and lowering the
  count would change nothing.

Everything is read through functions that take text (`parse_proc_stat`, `parse_self_stat`, ...)
so the arithmetic is testable on fixtures; the file reads are thin wrappers. Without `/proc`
(macOS, Windows) the meter reports itself unavailable and the rule returns `usable_cpus()`.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from edgewise.errors import EdgewiseError
from edgewise.trial import MeasuredChoice

# /proc/stat "cpuN" columns: user nice system idle iowait irq softirq steal guest guest_nice.
# guest and guest_nice are already inside user and nice, so the total is the first eight.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal
_TOTAL_COLUMNS = 8

DEFAULT_PERIOD_S = 0.5
DEFAULT_CONFIRM = 2
MIN_INTERVAL_S = 0.05  # shorter windows are a handful of jiffies: too coarse to decide on


# ----------------------------------------------------------------------------- parsing (text in)


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative jiffies of a set of CPUs, as `/proc/stat` counts them since boot."""

    busy: int
    total: int
    n_cpus: int


def parse_proc_stat(text: str, cpus: Collection[int] | None = None) -> CpuTimes:
    """Busy and total jiffies from `/proc/stat` text.

    With `cpus`, sums the `cpuN` lines of those CPUs (ones absent from the text, e.g. offline,
    are skipped); without, uses the aggregate `cpu` line and counts the `cpuN` lines.
    Raises ValueError when the text has none of the lines asked for.
    """
    busy = total = n = 0
    aggregate: list[int] | None = None
    wanted = None if cpus is None else set(cpus)
    for line in text.splitlines():
        if not line.startswith("cpu"):
            if n or aggregate is not None:
                break  # the cpu lines come first and together; the rest (intr, ctxt...) is long
            continue
        name, *fields = line.split()
        if name == "cpu":
            if wanted is None:
                aggregate = [int(v) for v in fields[:_TOTAL_COLUMNS]]
            continue
        if wanted is None:
            n += 1
        elif int(name[3:]) in wanted:
            values = [int(v) for v in fields[:_TOTAL_COLUMNS]]
            busy += sum(values[i] for i in _BUSY_COLUMNS if i < len(values))
            total += sum(values)
            n += 1
    if wanted is None:
        if aggregate is None:
            raise ValueError("no aggregate 'cpu' line in /proc/stat text")
        busy = sum(aggregate[i] for i in _BUSY_COLUMNS if i < len(aggregate))
        total = sum(aggregate)
        n = max(n, 1)
    elif n == 0:
        raise ValueError(f"none of CPUs {sorted(wanted)} in /proc/stat text")
    return CpuTimes(busy=busy, total=total, n_cpus=n)


def parse_self_stat(text: str) -> int:
    """utime + stime (clock ticks, all threads of the process) from `/proc/<pid>/stat` text.

    The command name (field 2) is in parentheses and may itself hold spaces or parentheses, so
    fields are counted from the last ')': utime and stime are fields 14 and 15.
    """
    rest = text[text.rindex(")") + 2 :].split()  # rest[0] is field 3 (state)
    return int(rest[11]) + int(rest[12])


def parse_cgroup_v2_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("$MAX $PERIOD", MAX may be "max"), None if unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    quota, period = int(parts[0]), int(parts[1]) if len(parts) > 1 else 100_000
    return quota / period if quota > 0 and period > 0 else None


def parse_cgroup_v1_quota(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, None if unlimited (-1)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    return quota / period if quota > 0 and period > 0 else None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """`/proc/self/cgroup` as {controller: path}; the cgroup v2 line ("0::/path") is under ""."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def parse_loaded_openmp(maps_text: str) -> list[str]:
    """Paths of the OpenMP runtimes (libgomp, libiomp5, libomp) mapped in, from `/proc/<pid>/maps` text."""
    found: list[str] = []
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        path = parts[5].strip() if len(parts) == 6 else ""
        base = os.path.basename(path)
        if base.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in base and path not in found:
            found.append(path)
    return found


# ----------------------------------------------------------------------------- reading /proc, /sys


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _ancestors(root: str, path: str) -> list[str]:
    """root/path and each of its parents up to root itself, deepest first."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [os.path.join(root, *parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_quota(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """The tightest CPU quota (in CPUs, may be fractional) on this process's cgroup and its
    parents, cgroup v2 or v1; None when there is none or it cannot be read.

    The path in /proc/self/cgroup may be the host's view while a container mounts only its own
    subtree, so each ancestor down to the mount root is tried.
    """
    text = _read(os.path.join(proc, "self", "cgroup"))
    if text is None:
        return None
    paths = parse_proc_cgroup(text)
    limits: list[float] = []
    if "" in paths:  # v2 (unified)
        for d in _ancestors(cgroup_root, paths[""]):
            content = _read(os.path.join(d, "cpu.max"))
            if content is not None and (limit := parse_cgroup_v2_cpu_max(content)) is not None:
                limits.append(limit)
    if "cpu" in paths:  # v1
        for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
            for d in _ancestors(os.path.join(cgroup_root, mount), paths["cpu"]):
                quota = _read(os.path.join(d, "cpu.cfs_quota_us"))
                period = _read(os.path.join(d, "cpu.cfs_period_us"))
                if quota is not None and period is not None:
                    try:
                        limit = parse_cgroup_v1_quota(quota, period)
                    except ValueError:
                        continue
                    if limit is not None:
                        limits.append(limit)
            if os.path.isdir(os.path.join(cgroup_root, mount)):
                break
    return min(limits) if limits else None


def affinity_cpus() -> list[int]:
    """The CPU ids this process may run on (all of them where affinity is not available)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return sorted(os.sched_getaffinity(0))
        except OSError:
            pass
    return list(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up,
    so a 1.5-CPU quota allows 2 threads), at least 1."""
    n = len(affinity_cpus())
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, math.ceil(quota - 1e-9))
    return max(1, n)


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class CpuSample:
    """One measurement over an interval. All CPU figures are in CPUs (1.0 = one core busy for
    the whole interval), over the `n_cpus` this process may run on.

    `limit_cpus` is min(n_cpus, cgroup quota). `measured` is False where nothing could be read
    (no /proc): then `others_busy_cpus` is 0 and the rule falls back to all usable CPUs.
    """

    interval_s: float
    n_cpus: int
    limit_cpus: float
    busy_cpus: float
    own_cpus: float
    others_busy_cpus: float
    measured: bool = True

    @property
    def free_cpus(self) -> float:
        """CPUs left for us: what others leave of our CPUs, capped by the quota."""
        return max(0.0, min(self.limit_cpus, self.n_cpus - self.others_busy_cpus))


class Meter(Protocol):
    """What the governor needs from a meter (a fake in tests)."""

    def sample(self) -> CpuSample | None: ...


class CpuMeter:
    """Measures how many CPUs other processes keep busy, between successive `sample()` calls.

    The first baseline is read at construction; each `sample()` measures the interval since the
    previous baseline and makes now the new one. An interval shorter than `min_interval_s`
    (a few jiffies) returns None and keeps the old baseline, so the next call measures longer.
    Costs two small file reads per call.
    """

    def __init__(
        self,
        cpus: Collection[int] | None = None,
        quota: float | None = None,
        *,
        proc: str = "/proc",
        min_interval_s: float = MIN_INTERVAL_S,
    ) -> None:
        """`cpus`: the CPU ids to watch (default: this process's affinity); `quota`: a cgroup
        CPU limit (default: read from the cgroup files once, here)."""
        self.cpus = sorted(cpus) if cpus is not None else affinity_cpus()
        all_cpus = cpus is None and len(self.cpus) == (os.cpu_count() or 0)
        self._cpu_filter = None if all_cpus else self.cpus  # the aggregate line is cheaper to parse
        self.quota = quota if quota is not None else (cgroup_cpu_quota(proc) if cpus is None else None)
        self._stat_path = os.path.join(proc, "stat")
        self._self_path = os.path.join(proc, "self", "stat")
        self.min_interval_s = min_interval_s
        try:
            self.hz = os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self.hz = 100
        self._last = self._read()
        self.available = self._last is not None

    def _read(self) -> tuple[CpuTimes, int, float] | None:
        stat, own = _read(self._stat_path), _read(self._self_path)
        if stat is None or own is None:
            return None
        try:
            return parse_proc_stat(stat, self._cpu_filter), parse_self_stat(own), time.monotonic()
        except (ValueError, IndexError):
            return None

    @property
    def n_cpus(self) -> int:
        return max(1, len(self.cpus))

    @property
    def limit_cpus(self) -> float:
        return min(float(self.n_cpus), self.quota) if self.quota is not None else float(self.n_cpus)

    def reset(self) -> None:
        """Make now the baseline (e.g. after a long idle stretch that should not be averaged in)."""
        self._last = self._read()

    def sample(self) -> CpuSample | None:
        """The interval since the last baseline; None if it is too short to measure."""
        if not self.available:
            return CpuSample(0.0, self.n_cpus, self.limit_cpus, 0.0, 0.0, 0.0, measured=False)
        now = self._read()
        if now is None or self._last is None:
            self._last = now
            return None
        (t0, own0, w0), (t1, own1, w1) = self._last, now
        d_total = t1.total - t0.total
        if w1 - w0 < self.min_interval_s or d_total <= 0:
            return None
        self._last = now
        n = t1.n_cpus
        span = d_total / n  # jiffies per CPU: the interval on the same clock as the busy counts
        busy = (t1.busy - t0.busy) / span
        own = (own1 - own0) / span
        others = min(float(n), max(0.0, busy - own))
        return CpuSample(
            interval_s=span / self.hz, n_cpus=n, limit_cpus=min(float(n), self.quota) if self.quota else float(n),
            busy_cpus=busy, own_cpus=own, others_busy_cpus=others,
        )


def free_cpus(interval_s: float = 0.1) -> float:
    """CPUs free for this process, measured once over `interval_s` (sleeps that long)."""
    meter = CpuMeter()
    time.sleep(max(interval_s, meter.min_interval_s))
    sample = meter.sample()
    return sample.free_cpus if sample is not None else float(usable_cpus())


# ----------------------------------------------------------------------------- the rule


def threads_for(sample: CpuSample) -> int:
    """The thread count for a measurement: `clamp(floor(free + 0.5), 1, usable)`, where
    `free = min(limit, n_cpus - others_busy)` and `usable = min(n_cpus, ceil(limit))`.

    Rounding half up means a competitor must keep at least half a CPU busy to take a thread.
    That threshold is not arbitrary: while we run N spinning threads a CPU-bound competitor only
    gets its fair share of the contended cores, 1/(N+1) of N CPUs per competing thread (2/3 of a
    CPU with N = 2), so the measured `others_busy` understates the demand; anything stricter (say
    free rounded down only at 0.25 past a whole) would keep 2 threads against a full competitor.
    Examples: 2 CPUs, others 1.0 -> 1; others 0.2 -> 2 (free 1.8); others 0.5 -> 2 (exactly half
    rounds up); others 0.67 (a competitor sharing with our 2 spinning threads) -> 1;
    4 CPUs, others 2.6 -> 1 (free 1.4); others 2.4 -> 2 (free 1.6).
    """
    usable = max(1, min(sample.n_cpus, math.ceil(sample.limit_cpus - 1e-9)))
    if not sample.measured:
        return usable
    return max(1, min(usable, math.floor(sample.free_cpus + 0.5)))


def validate_threads(requested: int) -> int:
    """`--threads` as given, or an EdgewiseError saying what is wrong with it."""
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise EdgewiseError(f"--threads must be a whole number, got {requested!r}")
    if requested < 1:
        raise EdgewiseError(f"--threads must be at least 1, got {requested}")
    return requested


def choose_threads(
    requested: int | None,
    meter: Meter | None = None,
    *,
    sample: CpuSample | None = None,
    interval_s: float = 0.1,
) -> int:
    """The decode thread count: `requested` if given (validated, never second-guessed), else
    `threads_for` on `sample`, or on one measurement by `meter` (a fresh `CpuMeter` by default)
    over `interval_s`."""
    if requested is not None:
        return validate_threads(requested)
    if sample is None:
        if meter is None:
            meter = CpuMeter()
            time.sleep(max(interval_s, meter.min_interval_s))
        sample = meter.sample()
        if sample is None:  # the meter's window was too short: wait it out once
            time.sleep(MIN_INTERVAL_S)
            sample = meter.sample()
        if sample is None:
            return usable_cpus()
    return threads_for(sample)


# ----------------------------------------------------------------------------- OpenMP workers


class OpenMPRuntimes:
    """The OpenMP runtimes already loaded in this process, to release their idle worker threads.

    `release()` calls `omp_pause_resource_all(omp_pause_soft)`: the calling thread's pool is
    torn down (its workers exit) and the next parallel region starts fresh workers, as many as
    the current `omp_get_max_threads()`. That is what makes lowering the thread count effective
    under `OMP_WAIT_POLICY=ACTIVE`: torch runs a region inline when it has 1 thread, so a worker
    parked by an earlier 2-thread region would otherwise spin on its core forever. Nothing new is
    loaded (RTLD_NOLOAD); where no runtime is found or it lacks OpenMP 5.0 `release()` is a no-op.
    Call it from the thread that runs the model, between ops, never inside a parallel region.
    """

    OMP_PAUSE_SOFT = 1

    def __init__(self, maps_text: str | None = None) -> None:
        if maps_text is None:
            maps_text = _read("/proc/self/maps") or ""
        self._pause: list[Callable[[int], int]] = []
        mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
        for path in parse_loaded_openmp(maps_text):
            try:
                fn = ctypes.CDLL(path, mode=mode).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            self._pause.append(fn)

    def __bool__(self) -> bool:
        return bool(self._pause)

    def release(self) -> bool:
        """Release idle workers; True if some runtime did."""
        return any([fn(self.OMP_PAUSE_SOFT) == 0 for fn in self._pause])


def release_openmp_threads() -> bool:
    """Release the idle OpenMP workers of the calling thread now (e.g. while a chat waits for
    input, when `OMP_WAIT_POLICY=ACTIVE` workers would spin on their cores); True if done."""
    return OpenMPRuntimes().release()


def _torch_get_threads() -> int:
    import torch

    return torch.get_num_threads()


def _torch_set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- holding a CPU back


class HoldBack:
    """Whether to compute on one CPU fewer than are free, leaving it to this process's own I/O threads.

    The meter counts only *other* processes as competition, so a model that reads its weights from flash
    while it computes (`edgewise.flash.stream`) would spin OpenMP workers on every CPU and starve its own
    reader: the reads' syscalls and completions then wait for a compute thread's time slice, the disk
    idles, and every parallel region waits for whichever worker was preempted. On the 2-core test machine
    (Qwen2.5-Coder-1.5B, half its weights streamed, 472 MB a pass) one compute thread decoded 2.55 tok/s
    with reads at 1.48 GB/s, two threads 1.88-2.11 tok/s with reads at 0.93-1.04 GB/s; with 70 MB a
    pass (85% resident) it is the other way round, 3.61 against 5.70 tok/s. Which wins depends on the
    plan, the disk and the cores, so it is measured (`edgewise.trial.MeasuredChoice`, as drafts and read
    sizes are): seconds per pass at the free count and at one fewer, kept apart by the rows a pass computes
    (1 for a plain pass, more for one checking a draft); each row count tries both thread counts first,
    then takes the faster, and every `explore`-th choice takes the other to keep its estimate current.
    """

    def __init__(self, explore: int = 8, smoothing: float = 0.25):
        self.trial = MeasuredChoice(explore, smoothing)  # option: threads; context: rows of the pass; cost: seconds per pass

    def choose(self, free: int, rows: int = 1) -> int:
        """The thread count for the next pass of `rows` rows, when `free` threads are allowed."""
        return free if free < 2 else self.trial.choose((free, free - 1), rows)

    def record(self, threads: int, rows: int, seconds: float) -> None:
        self.trial.record(threads, seconds, rows)

    def line(self, free: int) -> str:
        """What the trial found at `free` threads, for a stats line ('' before it has both estimates)."""
        measured = sorted({rows for (rows, n) in self.trial.costs if n == free})
        costs = [(rows, self.trial.cost(free, rows), self.trial.cost(free - 1, rows)) for rows in measured]
        parts = [f"{'plain' if rows == 1 else f'{rows} rows'} {full * 1000:.0f} ms on {free}, {held * 1000:.0f} ms on {free - 1}"
                 for rows, full, held in costs if held is not None]
        return "per pass: " + "; ".join(parts) if parts else ""


# ----------------------------------------------------------------------------- the governor


@dataclass(frozen=True)
class Measurement:
    """One governor measurement: when (governor clock), what it saw, what it decided."""

    t: float
    others_busy_cpus: float
    best: int
    threads: int


class ThreadGovernor:
    """Keeps torch's intra-op thread count at what the free CPUs allow, during generation.

        governor = ThreadGovernor(requested=args.threads)   # at load: primes the meter
        governor.start()                                    # at the start of each generation
        for each token: ...; governor.tick()
        governor.stop()                                     # optional: restore torch's count

    `start()` measures since construction (or the previous measurement) and sets the count at
    once. `tick()` costs a clock read until `period_s` has passed; then it measures the interval
    since the last measurement and, if the best count differs from the current one on `confirm`
    consecutive measurements (all in the same direction), moves to the one of those closest to the
    current count. On a decrease it releases the OpenMP pool so the dropped workers stop spinning.
    With `requested` set the count is fixed: no measurement, no change.

    `hold_back` (a `HoldBack`, set by a model that reads from flash while it computes): around each pass,
    `pass_started(rows)` may run it on one thread fewer than the rule allows, and `pass_done(rows, s)`
    records its time; the rule's count itself (`free_threads`) is unchanged by it.

    The setters, meter and clock are injectable for tests; the defaults use torch and /proc.
    """

    def __init__(
        self,
        requested: int | None = None,
        *,
        meter: Meter | None = None,
        period_s: float = DEFAULT_PERIOD_S,
        confirm: int = DEFAULT_CONFIRM,
        set_threads: Callable[[int], None] = _torch_set_threads,
        get_threads: Callable[[], int] = _torch_get_threads,
        release: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        start_wait_s: float = 0.1,
        history: int = 64,
    ) -> None:
        """`release`: called after a decrease (default: `OpenMPRuntimes().release`, looked up
        at the first `start()`); `start_wait_s`: how long `start()` may wait when the meter's window is
        still too short to measure; `history`: how many measurements to keep."""
        self.requested = None if requested is None else validate_threads(requested)
        if period_s <= 0 or confirm < 1:
            raise ValueError(f"period_s must be > 0 and confirm >= 1, got {period_s}, {confirm}")
        self.meter: Meter | None = meter if meter is not None or requested is not None else CpuMeter()
        self.period_s, self.confirm, self.start_wait_s = period_s, confirm, start_wait_s
        self._set, self._get, self._release, self._clock = set_threads, get_threads, release, clock
        self._threads = 0
        self._free = 0  # the rule's count (or the requested one); _threads may be one lower (hold_back)
        self.hold_back: HoldBack | None = None
        self._saved: int | None = None
        self._next_at = math.inf
        self._pending: list[int] = []
        self.history: deque[Measurement] = deque(maxlen=history)
        self.ticks = self.measurements = self.changes = 0
        self.min_threads = self.max_threads = 0

    @property
    def threads(self) -> int:
        """The current count (0 before `start()`)."""
        return self._threads

    @property
    def free_threads(self) -> int:
        """What the rule allows now (the requested count when fixed); `threads` is lower while a CPU is held back."""
        return self._free

    def _apply(self, n: int, previous: int) -> None:
        self._set(n)
        if n < previous and self._release is not None:
            self._release()
        self._threads = n
        self.min_threads = n if not self.min_threads else min(self.min_threads, n)
        self.max_threads = max(self.max_threads, n)

    def start(self) -> int:
        """Set the count for a generation and return it."""
        self._saved = self._get()
        self._pending.clear()
        if self._release is None:
            self._release = OpenMPRuntimes().release  # ~2 ms (reads /proc/self/maps): once, here
        if self.requested is not None:
            n = self.requested
        else:
            assert self.meter is not None
            sample = self.meter.sample()
            if sample is None and self._threads:  # measured moments ago (back-to-back generations): keep the count
                n = self._threads
            else:
                if sample is None:
                    time.sleep(self.start_wait_s)
                    sample = self.meter.sample()
                n = threads_for(sample) if sample is not None else usable_cpus()
            if sample is not None:
                self._record(sample, n, n)
        self._free = n
        self._apply(n, self._saved)
        self._next_at = math.inf if self.requested is not None else self._clock() + self.period_s
        return n

    def pass_started(self, rows: int = 1) -> int:
        """Before a forward pass of `rows` rows (1: a plain decode pass): with `hold_back` (and no requested count), the count it chooses for
        this pass; else the current count."""
        if self.hold_back is not None and self.requested is None and self._free:
            n = self.hold_back.choose(self._free, rows)
            if n != self._threads:
                self._apply(n, self._threads)
        return self._threads

    def pass_done(self, rows: int, seconds: float) -> None:
        """After that pass: its time, for `hold_back`."""
        if self.hold_back is not None and self.requested is None:
            self.hold_back.record(self._threads, rows, seconds)

    def _record(self, sample: CpuSample, best: int, threads: int) -> None:
        self.measurements += 1
        self.history.append(Measurement(self._clock(), sample.others_busy_cpus, best, threads))

    def tick(self) -> int:
        """Call once per decoded token; returns the current count. Measures only every `period_s`."""
        self.ticks += 1
        if self._clock() < self._next_at:
            return self._threads
        return self._measure()

    def _measure(self) -> int:
        assert self.meter is not None
        now = self._clock()
        sample = self.meter.sample()
        if sample is None:  # window too short (a coarse clock): look again soon
            self._next_at = now + self.period_s / 4
            return self._threads
        self._next_at = now + self.period_s
        best = threads_for(sample)
        current = self._free
        if best == current:
            self._pending.clear()
        elif self._pending and (self._pending[0] > current) == (best > current):
            self._pending.append(best)
        else:
            self._pending[:] = [best]
        if len(self._pending) >= self.confirm:
            target = min(self._pending, key=lambda v: abs(v - current))
            self._pending.clear()
            self._free = target
            self._apply(target, self._threads)
            self.changes += 1
        self._record(sample, best, self._threads)
        return self._threads

    def stop(self) -> None:
        """Restore torch's thread count as `start()` found it; the governor can `start()` again."""
        if self._saved is not None and self._saved != self._threads:
            self._set(self._saved)
            if self._saved < self._threads and self._release is not None:
                self._release()
        self._next_at = math.inf

    def stats(self) -> dict[str, object]:
        """Counters for a run's stats line."""
        last = self.history[-1].others_busy_cpus if self.history else None
        return {
            "threads": self._threads,
            "requested": self.requested,
            "min_threads": self.min_threads,
            "max_threads": self.max_threads,
            "changes": self.changes,
            "measurements": self.measurements,
            "ticks": self.ticks,
            "last_others_busy_cpus": None if last is None else round(last, 2),
        }
