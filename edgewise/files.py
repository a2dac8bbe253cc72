"""Writing files and folders so that nothing is ever half-written.

A file goes into a temp file beside the target, then is renamed over it (atomic on POSIX); the temp
file is removed if anything fails.

A folder (a generated C project, a firmware build, a flash store) is written whole into a hidden temp
folder beside the target, then swapped in: the old folder is moved aside, the new one renamed into
place, the old one removed. A run killed at any point leaves the target either the old complete
folder or the new complete one, plus at most a hidden `.tmp-PID-NAME` or `.old-PID-NAME` beside it;
the next write to that target (or `recover_dir`) removes them, and moves an old folder back if the
kill fell between the two renames.
"""

from __future__ import annotations

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
def atomic_dir(path: str | Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """An empty temp folder beside `path` to fill; on leaving the block without an error it takes
    `path`'s place (`swap_dir`), else it is removed. `keep`: files of the old folder carried over
    into the new one when the new one has none of that name (e.g. a measurement saved beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
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
    """Move the complete folder `new` to `path`: an old `path` is moved aside first, then removed."""
    old = path.with_name(f".old-{os.getpid()}-{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)  # a kill here leaves `old` and no `path`: recover_dir moves it back
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_dir(path: str | Path) -> None:
    """Clean up after a killed folder write to `path`: temp and old folders of processes that are gone
    are removed, except that an old folder is moved back when `path` itself is missing."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.(tmp|old)-(\d+)-{re.escape(path.name)}")
    for leftover in sorted(path.parent.iterdir()):
        m = pattern.fullmatch(leftover.name)
        if m is None or _pid_alive(int(m.group(2))) and int(m.group(2)) != os.getpid():
            continue
        if m.group(1) == "old" and not path.exists():
            os.replace(leftover, path)
        elif leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
