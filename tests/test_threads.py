"""edgewise.lm.threads: /proc parsing, the thread-count rule, the governor's hysteresis, and real
measurements of a competing process (counted) and of our own threads (not counted)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import timeit

import pytest

from edgewise.errors import EdgewiseError
from edgewise.lm.threads import (
    CpuMeter,
    CpuSample,
    HoldBack,
    OpenMPRuntimes,
    ThreadGovernor,
    choose_threads,
    parse_cgroup_v1_quota,
    parse_cgroup_v2_cpu_max,
    parse_loaded_openmp,
    parse_proc_cgroup,
    parse_proc_stat,
    parse_self_stat,
    threads_for,
    usable_cpus,
)

PROC_STAT = """\
cpu  49886 10 6806 12131 144 3 95 319 7 0
cpu0 23729 4 3312 7415 62 1 24 140 3 0
cpu1 26157 6 3494 4716 82 2 71 179 4 0
intr 5218371 0 9 0 0 0 0 0 0 0 0
ctxt 9612395
btime 1719400000
processes 6024
procs_running 3
procs_blocked 0
softirq 1764390 0 261004 1 88390 0 0 1 682432 0 732562
"""

# comm with a space and a ')' in it: fields must be counted from the last ')'
SELF_STAT = (
    "4021 (my (odd) proc) R 4013 4013 3226 0 -1 4194304 98 0 0 0 "
    "1234 567 8 9 20 0 3 0 34795 3133440 359 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0"
)


def sample(others: float, n_cpus: int = 2, limit: float | None = None) -> CpuSample:
    return CpuSample(0.5, n_cpus, float(n_cpus) if limit is None else limit, others, 0.0, others)


# ----------------------------------------------------------------------------- parsing


def test_parse_proc_stat_aggregate_and_per_cpu():
    all_cpus = parse_proc_stat(PROC_STAT)
    assert all_cpus.n_cpus == 2
    assert all_cpus.busy == 49886 + 10 + 6806 + 3 + 95 + 319  # user nice system irq softirq steal
    assert all_cpus.total == all_cpus.busy + 12131 + 144  # + idle + iowait; guest is inside user
    cpu1 = parse_proc_stat(PROC_STAT, cpus=[1])
    assert (cpu1.n_cpus, cpu1.busy, cpu1.total) == (1, 26157 + 6 + 3494 + 2 + 71 + 179, 26157 + 6 + 3494 + 4716 + 82 + 2 + 71 + 179)
    both = parse_proc_stat(PROC_STAT, cpus={0, 1, 7})  # an absent (offline) CPU is skipped
    assert both.n_cpus == 2 and both.busy == parse_proc_stat(PROC_STAT, [0]).busy + cpu1.busy
    with pytest.raises(ValueError):
        parse_proc_stat(PROC_STAT, cpus=[5])
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1 2 3\n")


def test_parse_self_stat_counts_from_last_paren():
    assert parse_self_stat(SELF_STAT) == 1234 + 567  # utime + stime, not cutime/cstime
    with open("/proc/self/stat") if os.path.exists("/proc/self/stat") else open(os.devnull) as f:
        text = f.read()
    if text:
        assert parse_self_stat(text) >= 0


def test_parse_cgroup_files():
    assert parse_cgroup_v2_cpu_max("max 100000\n") is None
    assert parse_cgroup_v2_cpu_max("150000 100000\n") == 1.5
    assert parse_cgroup_v1_quota("-1\n", "100000\n") is None
    assert parse_cgroup_v1_quota("200000\n", "100000\n") == 2.0
    paths = parse_proc_cgroup("12:cpu,cpuacct:/docker/abc\n4:memory:/x\n0::/user.slice/app\n")
    assert paths["cpu"] == paths["cpuacct"] == "/docker/abc" and paths[""] == "/user.slice/app"


def test_parse_loaded_openmp():
    maps = (
        "7f0000000000-7f0000001000 r-xp 00000000 08:01 1234   /venv/torch/lib/libgomp.so.1\n"
        "7f0000001000-7f0000002000 r--p 00001000 08:01 1234   /venv/torch/lib/libgomp.so.1\n"
        "7f0000003000-7f0000004000 r-xp 00000000 08:01 99     /usr/lib/libiomp5.so\n"
        "7f0000005000-7f0000006000 rw-p 00000000 00:00 0 \n"
        "7f0000007000-7f0000008000 r-xp 00000000 08:01 98     /usr/lib/libm.so.6\n"
    )
    assert parse_loaded_openmp(maps) == ["/venv/torch/lib/libgomp.so.1", "/usr/lib/libiomp5.so"]


def test_usable_cpus_is_within_affinity():
    n = usable_cpus()
    assert 1 <= n <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert n <= len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("bad", [0, -1])
def test_choose_threads_rejects_non_positive(bad):
    with pytest.raises(EdgewiseError, match=f"--threads must be at least 1, got {bad}"):
        choose_threads(bad)
    with pytest.raises(EdgewiseError, match="at least 1"):
        ThreadGovernor(requested=bad)


def test_choose_threads_requested_is_returned_as_is():
    assert choose_threads(3, sample=sample(others=2.0)) == 3  # never second-guessed
    with pytest.raises(EdgewiseError, match="whole number"):
        choose_threads(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n_cpus", "others", "expected"),
    [
        (2, 1.0, 1),  # one competitor at 100% of a core
        (2, 0.67, 1),  # a competitor sharing the cores with our 2 spinning threads gets ~2/3 CPU
        (2, 0.5, 2),  # exactly half a CPU rounds up: free 1.5 -> 2
        (2, 0.3, 2),  # background noise
        (2, 0.2, 2),
        (2, 0.0, 2),
        (2, 2.0, 1),  # never below 1
        (4, 2.6, 1),  # free 1.4 -> 1
        (4, 2.4, 2),  # free 1.6 -> 2
        (4, 0.1, 4),
        (1, 0.0, 1),
    ],
)
def test_threads_for_rule(n_cpus, others, expected):
    assert threads_for(sample(others, n_cpus)) == expected
    assert choose_threads(None, sample=sample(others, n_cpus)) == expected


def test_threads_for_cgroup_quota():
    assert threads_for(sample(0.0, n_cpus=8, limit=2.0)) == 2  # quota caps
    assert threads_for(sample(5.0, n_cpus=8, limit=2.0)) == 2  # 3 CPUs free, the quota still caps at 2
    assert threads_for(sample(0.0, n_cpus=8, limit=1.5)) == 2  # 1.5 rounds up
    assert threads_for(sample(0.0, n_cpus=8, limit=0.5)) == 1
    unmeasured = CpuSample(0.0, 4, 4.0, 0.0, 0.0, 0.0, measured=False)
    assert threads_for(unmeasured) == 4  # no /proc: all usable CPUs


def test_choose_threads_with_injected_meter():
    class Meter:
        def sample(self):
            return sample(1.0)

    assert choose_threads(None, Meter()) == 1


# ----------------------------------------------------------------------------- the governor


class FakeMeter:
    def __init__(self, others: list[float | None], n_cpus: int = 2):
        self.others, self.n_cpus, self.calls = list(others), n_cpus, 0

    def sample(self):
        self.calls += 1
        value = self.others.pop(0)
        return None if value is None else sample(value, self.n_cpus)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def governor(others, requested=None, n_cpus=2, torch_threads=2, **kw):
    clock, set_calls, releases = Clock(), [], []
    g = ThreadGovernor(
        requested,
        meter=FakeMeter(others, n_cpus),
        set_threads=set_calls.append,
        get_threads=lambda: torch_threads,
        release=lambda: releases.append(clock.t),
        clock=clock,
        **kw,
    )
    return g, clock, set_calls, releases


def run(g, clock, seconds, step=0.0625):  # binary fractions: exact clock sums
    """Tick like a decoder making a token every `step` seconds; return the thread count per tick."""
    seen = []
    for _ in range(round(seconds / step)):
        clock.t += step
        seen.append(g.tick())
    return seen


def decode_passes(g, clock, cost, passes, step=0.0625):
    """Passes as LanguageModel.generate runs them (`passes`: each one's rows): pass_started(rows), the pass (seconds = cost(threads, rows)),
    pass_done, tick. Returns the thread count of each pass."""
    seen = []
    for rows in passes:
        n = g.pass_started(rows)
        seconds = cost(n, rows)
        clock.t += step
        g.pass_done(rows, seconds)
        g.tick()
        seen.append(n)
    return seen


@pytest.mark.parametrize("faster", [1, 2])
def test_hold_back_tries_both_counts_then_keeps_the_faster_and_explores(faster):
    g, clock, set_calls, releases = governor([0.0] * 200)
    g.hold_back = HoldBack(explore=8)
    g.start()
    seen = decode_passes(g, clock, lambda n, kind: 0.3 if n == faster else 0.5, [1] * 40)
    assert seen[:2] == [2, 1]  # the free count first, then one fewer
    settled = seen[2:]
    other = 3 - faster
    explored = [i for i, n in enumerate(settled) if n == other]
    assert explored == [i for i in range(len(settled)) if (i + 3) % 8 == 0]  # every 8th choice (pass k is choice k)
    assert g.free_threads == 2 and g.changes == 0  # holding back is not a change of the rule's count
    if faster == 1:
        assert releases  # dropping to 1 releases the spinning OpenMP workers, as the rule's decreases do


def test_hold_back_keeps_passes_of_different_rows_apart():
    # checking a draft (5 rows) is compute-bound: 2 threads win; a plain pass is read-bound: 1 wins
    g, clock, _, _ = governor([0.0] * 200)
    g.hold_back = HoldBack(explore=1000)
    g.start()
    cost = {(2, 5): 0.8, (1, 5): 1.2, (2, 1): 0.5, (1, 1): 0.35}
    kinds = [5, 1] * 10
    seen = decode_passes(g, clock, lambda n, kind: cost[(n, kind)], kinds)
    assert seen[4:] == [2, 1] * 8
    assert "5 rows 800 ms on 2, 1200 ms on 1" in g.hold_back.line(2) and "plain 500 ms on 2, 350 ms on 1" in g.hold_back.line(2)


def test_hold_back_follows_the_rule_and_leaves_requested_counts_alone():
    # a competitor takes a CPU: the rule says 1 and nothing is held back below it
    g, clock, _, _ = governor([0.0] + [1.0] * 100)
    g.hold_back = HoldBack()
    g.start()
    seen = decode_passes(g, clock, lambda n, kind: 0.3 if n == 1 else 0.5, [1] * 40, step=0.25)
    assert g.free_threads == 1 and seen[-10:] == [1] * 10 and g.changes == 1
    # --threads fixes the count: no trial
    g, clock, set_calls, _ = governor([], requested=2)
    g.hold_back = HoldBack()
    g.start()
    assert decode_passes(g, clock, lambda n, kind: 0.3 if n == 1 else 0.5, [1] * 10) == [2] * 10
    assert not g.hold_back.trial.costs
    with pytest.raises(ValueError):
        HoldBack(explore=1)


def test_governor_changes_only_after_two_agreeing_measurements():
    # start: quiet -> 2; then a competitor appears (1.0, 1.0) -> 1 on the 2nd measurement; it leaves -> 2 after two
    g, clock, set_calls, releases = governor([0.1, 1.0, 1.0, 0.9, 0.1, 0.2])
    assert g.start() == 2 and set_calls == [2] and releases == []
    run(g, clock, 0.5)  # first measurement at t=0.5: 1.0 -> pending only
    assert g.threads == 2 and g.measurements == 2
    run(g, clock, 0.5)  # second: 1.0 again -> 1
    assert g.threads == 1 and set_calls == [2, 1] and len(releases) == 1  # a decrease releases idle workers
    run(g, clock, 1.0)  # 0.9 (stays 1), 0.1 (pending 2)
    assert g.threads == 1
    run(g, clock, 0.5)  # 0.2 -> 2
    assert g.threads == 2 and set_calls == [2, 1, 2] and len(releases) == 1
    assert g.changes == 2 and g.min_threads == 1 and g.max_threads == 2
    assert [m.best for m in g.history] == [2, 1, 1, 1, 2, 2]
    stats = g.stats()
    assert stats["threads"] == 2 and stats["changes"] == 2 and stats["ticks"] == 40


def test_governor_does_not_flap_on_alternating_noise():
    g, clock, set_calls, _ = governor([0.1] + [1.0, 0.2] * 5)
    g.start()
    run(g, clock, 5.0)
    assert set_calls == [2] and g.changes == 0 and g.measurements == 11


def test_governor_measures_at_most_every_period():
    g, clock, _, _ = governor([0.1] * 50)
    g.start()
    seen = run(g, clock, 2.0, step=1 / 64)  # 128 tokens in 2 s
    assert len(seen) == 128 and g.meter.calls == 1 + 4  # start + every 0.5 s


def test_governor_retries_soon_when_the_window_is_too_short():
    g, clock, _, _ = governor([0.1, None, 1.0, 1.0])
    g.start()
    run(g, clock, 0.5, step=0.5)  # None: retried a quarter period later
    run(g, clock, 0.125, step=0.125)  # 1.0
    assert g.meter.calls == 3 and g.threads == 2
    run(g, clock, 0.5, step=0.5)  # 1.0 -> 1
    assert g.threads == 1


def test_governor_with_requested_never_changes_or_measures():
    g, clock, set_calls, releases = governor([], requested=2)
    assert g.meter is None or isinstance(g.meter, FakeMeter)
    assert g.start() == 2
    run(g, clock, 5.0)
    assert set_calls == [2] and releases == [] and g.threads == 2 and g.measurements == 0
    g1, _, set1, rel1 = governor([], requested=1, torch_threads=2)
    g1.start()
    assert set1 == [1] and len(rel1) == 1  # fewer than torch had: the extra workers are released


def test_governor_moves_to_the_closest_agreeing_count_on_4_cpus():
    g, clock, set_calls, _ = governor([0.0, 2.6, 1.4], n_cpus=4, torch_threads=4)
    assert g.start() == 4
    run(g, clock, 1.0)  # wants 1, then 3: both down -> 3 (the closer), not 1
    assert g.threads == 3 and set_calls == [4, 3]


def test_governor_start_waits_for_a_first_window_and_stop_restores():
    g, clock, set_calls, _ = governor([None, 1.0], start_wait_s=0.0)
    assert g.start() == 1  # None, then 1.0 after the (zero) wait
    g.stop()
    assert set_calls == [1, 2]  # torch's count as start() found it


def test_tick_fast_path_is_cheap():
    g, clock, _, _ = governor([0.1])
    g.start()
    per_call = min(timeit.repeat(g.tick, number=20_000, repeat=5)) / 20_000
    assert per_call < 20e-6  # ~0.2 us here; generous for a loaded CI machine


# ----------------------------------------------------------------------------- real measurements

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")


@needs_proc
def test_meter_counts_a_competing_process():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it start and spin
        meter = CpuMeter()
        time.sleep(0.5)
        s = meter.sample()
    finally:
        burner.kill()
        burner.wait()
    assert s is not None and s.measured
    assert 0.4 <= s.interval_s <= 2.0
    assert s.others_busy_cpus >= 0.6, s  # ~1.0: the burner (plus whatever else runs here)
    assert threads_for(s) <= max(1, s.n_cpus - 1)  # on 2 CPUs: 1


@needs_proc
def test_meter_does_not_count_our_own_threads():
    # Two busy threads of ours: this one in a Python loop, a helper hashing (sha256 of 1 MiB
    # releases the GIL, so both run). Counted as others, they would add ~own_cpus to the baseline.
    # The machine is shared: compare with a baseline measured just before, retry a few times, and
    # skip only if no attempt could tell.
    data = b"x" * (1 << 20)
    results = []
    for _ in range(3):
        meter = CpuMeter()
        time.sleep(0.25)
        baseline = meter.sample()
        assert baseline is not None
        stop = threading.Event()

        def hash_until_stopped():
            while not stop.is_set():
                hashlib.sha256(data).digest()

        helper = threading.Thread(target=hash_until_stopped)
        meter.reset()
        helper.start()
        try:
            end = time.perf_counter() + 0.3
            while time.perf_counter() < end:
                hashlib.sha256(data).digest()
        finally:
            stop.set()
            helper.join()
        s = meter.sample()
        assert s is not None
        bound = max(0.5, baseline.others_busy_cpus + 0.3)
        # Conclusive only if counting our own time would clearly break the bound: on a saturated
        # machine busy stays at n_cpus whoever runs, and the check could not tell.
        conclusive = s.own_cpus >= 0.5 and s.busy_cpus >= bound + 0.3
        results.append((round(baseline.others_busy_cpus, 2), round(s.own_cpus, 2), round(s.others_busy_cpus, 2), conclusive))
        if conclusive and s.others_busy_cpus < bound:
            return
    if not any(r[-1] for r in results):
        pytest.skip(f"machine too busy to tell (baseline, own, others, conclusive): {results}")
    pytest.fail(f"our own threads counted as others (baseline, own, others, conclusive): {results}")


def test_meter_arithmetic_on_fixture_files(tmp_path):
    def write(cpu0, cpu1, utime, stime):
        lines = [f"cpu  {' '.join(str(a + b) for a, b in zip(cpu0, cpu1))}", f"cpu0 {' '.join(map(str, cpu0))}", f"cpu1 {' '.join(map(str, cpu1))}"]
        (tmp_path / "stat").write_text("\n".join(lines) + "\nintr 0\n")
        (tmp_path / "self" / "stat").write_text(f"7 (x) R 1 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0\n")

    (tmp_path / "self").mkdir()
    #      user nice sys idle iowait irq softirq steal
    write([100, 0, 10, 500, 5, 0, 0, 0], [100, 0, 10, 500, 5, 0, 0, 0], utime=40, stime=10)
    meter = CpuMeter(cpus=[0, 1], proc=str(tmp_path), min_interval_s=0.0)
    assert meter.available and meter.quota is None
    # 50 jiffies per CPU pass: cpu0 fully busy (40 user + 5 irq + 5 steal), cpu1 30 busy + 20 idle;
    # of the 80 busy jiffies 30 are ours (utime +25, stime +5): others = 50 / 50 = 1.0 CPU.
    write([140, 0, 10, 500, 5, 5, 0, 5], [120, 5, 15, 515, 10, 0, 0, 0], utime=65, stime=15)
    time.sleep(0.001)
    s = meter.sample()
    assert s is not None and s.n_cpus == 2
    assert s.interval_s == pytest.approx(50 / meter.hz)
    assert (s.busy_cpus, s.own_cpus, s.others_busy_cpus) == pytest.approx((1.6, 0.6, 1.0))
    assert s.free_cpus == pytest.approx(1.0) and threads_for(s) == 1
    assert meter.sample() is None  # no jiffies passed since: nothing to measure, baseline kept
    # our own time can exceed what /proc/stat's ticks saw (different clocks): others clamp at 0
    write([150, 0, 10, 540, 5, 5, 0, 5], [125, 5, 15, 560, 10, 0, 0, 0], utime=95, stime=15)
    s = meter.sample()
    assert s is not None and s.others_busy_cpus == 0.0 and threads_for(s) == 2


def test_meter_unavailable_without_proc(tmp_path):
    meter = CpuMeter(cpus=[0, 1], proc=str(tmp_path))
    s = meter.sample()
    assert not meter.available and s is not None and not s.measured and threads_for(s) == 2


@needs_proc
def test_own_time_covers_all_our_threads():
    # What the meter subtracts must be the whole process's CPU time, the helper thread's too:
    # compare it with each thread's own clock (thread_time), which needs no quiet machine.
    data = b"x" * (1 << 20)
    helper_cpu: list[float] = []
    stop = threading.Event()

    def hash_until_stopped():
        t0 = time.thread_time()
        while not stop.is_set():
            hashlib.sha256(data).digest()
        helper_cpu.append(time.thread_time() - t0)

    meter = CpuMeter()
    process0 = time.process_time()  # every thread of this process, OpenMP workers left spinning by earlier tests included
    main0 = time.thread_time()
    helper = threading.Thread(target=hash_until_stopped)
    helper.start()
    end = time.perf_counter() + 0.4
    while time.perf_counter() < end:
        hashlib.sha256(data).digest()
    stop.set()
    helper.join()
    main_cpu = time.thread_time() - main0
    s = meter.sample()
    process_cpu = time.process_time() - process0
    assert s is not None
    own_s = s.own_cpus * s.interval_s
    if helper_cpu[0] < 0.05:
        pytest.skip(f"the helper thread got no CPU to speak of ({helper_cpu[0]:.3f} s)")
    # jiffy granularity (10 ms) on each end. The reference is the process's own CPU clock, not the sum
    # of the two threads': in the full suite torch's OpenMP workers (OMP_WAIT_POLICY=ACTIVE) may still
    # be spinning from earlier tests, and they are ours too (measured 0.79 s own against 0.50 s for the
    # two threads).
    assert own_s == pytest.approx(process_cpu, abs=0.04 + 0.1 * own_s), (own_s, process_cpu, main_cpu, helper_cpu)
    assert own_s > main_cpu + 0.5 * helper_cpu[0]


@needs_proc
def test_release_stops_idle_openmp_workers():
    torch = pytest.importorskip("torch")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: no OpenMP workers")
    runtimes = OpenMPRuntimes()
    if not runtimes:
        pytest.skip("no OpenMP runtime with omp_pause_resource_all loaded")

    def n_tasks():
        return len(os.listdir("/proc/self/task"))

    saved = torch.get_num_threads()
    a = torch.randn(512, 512)
    try:
        torch.set_num_threads(2)
        a @ a
        with_workers = n_tasks()
        torch.set_num_threads(1)
        assert runtimes.release()
        deadline = time.monotonic() + 2.0
        while n_tasks() >= with_workers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert n_tasks() < with_workers  # the parked worker exited instead of spinning on
        a @ a  # and 1-thread work still runs
    finally:
        torch.set_num_threads(saved)
