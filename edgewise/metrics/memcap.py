"""A command run as if the machine had only so much RAM: a cgroup-v1 memory group with a hard limit.

The kernel counts everything the process touches against the limit: anonymous memory *and* the page
cache it faults in (a memory-mapped model's pages, buffered reads). Above the limit it reclaims the
group's own clean pages first (so an mmap'ed model thrashes through a small page cache), and kills the
process when nothing is left to reclaim. That is a device with X MB free, not an estimate of one.

Two things make such a run honest:
- **Cold files.** A page already in the page cache stays charged to whichever group first read it. A
  model cached by an earlier, uncapped run would be free to the capped one, so `run_capped` evicts the
  files it is given (`POSIX_FADV_DONTNEED`) before the command starts.
- **No swap escape.** Where the kernel has memsw accounting, memory+swap is capped at the same limit.

Reported: the exit status, whether the limit killed it (the group's OOM-kill count), the group's peak
usage (`memory.max_usage_in_bytes`) and its `memory.stat` at the end (cache, rss, mapped_file, ...).
Needs a cgroup-v1 memory controller it may write to (`available()`: root, `/sys/fs/cgroup/memory`).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgewise.errors import EdgewiseError

ROOT = Path("/sys/fs/cgroup/memory")
_names = itertools.count()


def available(root: Path = ROOT) -> bool:
    """True when memory groups can be made here (cgroup v1 memory controller, writable)."""
    return (root / "memory.limit_in_bytes").is_file() and os.access(root, os.W_OK)


def evict(paths: Iterable[str | os.PathLike]) -> None:
    """Drop the files' clean pages from the page cache (pages still mapped by a live process stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def parse_stat(text: str) -> dict[str, int]:
    """`memory.stat` or `memory.oom_control` text -> {key: value} (integer lines only)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


@dataclass
class CappedRun:
    returncode: int
    limit_bytes: int
    killed_by_limit: bool  # the kernel's OOM killer ran in the group
    peak_bytes: int  # the group's high-water mark: anonymous memory plus charged page cache
    seconds: float
    stat: dict[str, int] = field(default_factory=dict)  # memory.stat at the end (total_* include children)
    stdout: str = ""
    stderr: str = ""


def run_capped(
    cmd: Sequence[str],
    limit_bytes: int,
    *,
    evict_files: Iterable[str | os.PathLike] = (),
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
    root: Path = ROOT,
) -> CappedRun:
    """Run `cmd` inside a new memory group limited to `limit_bytes`, after evicting `evict_files` from the
    page cache; the group is removed afterwards. A command that outlives `timeout` is killed and raises."""
    if not available(root):
        raise EdgewiseError(f"{root}: no writable cgroup-v1 memory controller here (it needs root); memory caps cannot be applied")
    if limit_bytes < 1 << 20:
        raise EdgewiseError(f"memory limit {limit_bytes} bytes: at least 1 MiB is needed for any process")
    group = root / f"edgewise-{os.getpid()}-{next(_names)}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        if (group / "memory.memsw.limit_in_bytes").is_file():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        evict(evict_files)
        procs = str(group / "cgroup.procs")

        def enter_group() -> None:  # in the child, before exec: everything it ever touches is charged to the group
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=enter_group)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise EdgewiseError(f"{cmd[0]}: still running after {timeout} s under a {limit_bytes >> 20} MiB limit; killed") from None
        seconds = time.perf_counter() - start
        oom = parse_stat((group / "memory.oom_control").read_text())
        return CappedRun(
            returncode=proc.returncode,
            limit_bytes=limit_bytes,
            killed_by_limit=oom.get("oom_kill", 0) > 0,
            peak_bytes=int((group / "memory.max_usage_in_bytes").read_text()),
            seconds=seconds,
            stat=parse_stat((group / "memory.stat").read_text()),
            stdout=stdout,
            stderr=stderr,
        )
    finally:
        _remove(group)


def _remove(group: Path) -> None:
    """rmdir the group once its processes are gone (its page-cache charges move to the parent)."""
    for _ in range(100):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.05)
