"""Writing files and folders so that nothing is ever half-written.

A file goes into a temp file beside the target, then is renamed over it (atomic on POSIX); the temp
file is removed if anything fails.

A folder (a generated C project, a firmware build, a flash store) is written whole into a hidden temp
folder beside the target, then swapped in: the old folder is moved aside, the new one renamed into
place, the old one removed. A run killed at any point leaves the target either the old complete
folder or the new complete one, plus at most a hidden `.tmp-`, `.old-` or `.del-PID-NAME` beside it;
the next write to that target (or `recover_dir`) removes them, and moves an old folder back if the
kill fell between the two renames. Writers hold a lock on the parent folder, so leftovers are told
from a live writer's work by the lock, not by process ids (which get reused).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write; on leaving the block without an error it replaces `path`."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def _writers_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself (no lock file to leave behind): folder writes beside each
    other take turns, and `recover_dir` can tell leftovers of a live writer from those of a killed one."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def atomic_dir(path: str | Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """An empty temp folder beside `path` to fill; on leaving the block without an error it takes
    `path`'s place (`swap_dir`), else it is removed. `keep`: files of the old folder carried over
    into the new one when the new one has none of that name (e.g. a measurement saved beside it).
    A symlinked `path` is resolved, so the new folder lands where the old one was."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writers_lock(path.parent):
        _recover(path)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.mkdir()
        try:
            yield tmp
            for name in keep:
                if (path / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(path / name, tmp / name)
            swap_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def swap_dir(new: Path, path: Path) -> None:
    """Move the complete folder `new` to `path`: an old `path` is moved aside first, then removed.
    `.old-` always names a complete folder: it is renamed `.del-` before it is deleted."""
    old = path.with_name(f".old-{os.getpid()}-{path.name}")
    if path.exists():
        os.replace(path, old)  # a kill here leaves `old` and no `path`: recovery moves it back
    os.replace(new, path)
    if old.exists():
        doomed = path.with_name(f".del-{os.getpid()}-{path.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def recover_dir(path: str | Path) -> None:
    """Clean up after a killed folder write to `path` (unless a writer is at work beside it): temp and
    half-deleted folders are removed; an old complete folder is moved back when `path` is missing."""
    path = Path(path).resolve()
    if not path.parent.is_dir():
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a writer holds the folder: what lies beside `path` is its work in progress
        _recover(path)
    finally:
        os.close(fd)


def _recover(path: Path) -> None:
    """recover_dir's work, under the writers' lock."""
    pattern = re.compile(rf"\.(tmp|old|del)-\d+-{re.escape(path.name)}")
    for leftover in sorted(path.parent.iterdir()):
        m = pattern.fullmatch(leftover.name)
        if m is None:
            continue
        if m.group(1) == "old" and not path.exists():
            os.replace(leftover, path)
        elif leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
