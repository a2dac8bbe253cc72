"""Reading weight pages from flash storage, and a cost model that decides how to read them.

`DirectReader` reads page-aligned runs of a file with O_DIRECT, bypassing the page cache, so
that what a model reads costs what the storage costs and never pollutes or relies on RAM. The
runs of one `read()` go to edgewise's native `read_runs` (C++ threads pulling runs off a shared
counter, `pread`, no GIL), or, without the native kernels, are split into one task per thread of
a persistent pool, each task looping over its share with `os.preadv`. Where O_DIRECT is refused
(tmpfs, some network file systems) it falls back to buffered reads, each followed by
`POSIX_FADV_DONTNEED` so the cache does not hold what was read, and warns.

`probe()` measures random-read throughput per (read size, thread count) on the actual device;
`CostModel` turns that into seconds per read, interpolating log-log between probed sizes, and
plans which pages to read: needed pages become runs, and a gap of unneeded pages between two
runs is read too when one larger read is predicted cheaper than two (flash is IOPS-bound at
small sizes, so reading a few extra pages is often free).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import numpy as np

from edgewise.errors import EdgewiseError
from edgewise.files import write_text_atomic

PAGE = 4096
MIN_PROBE_FILE = 64 << 20  # an existing file smaller than this is mostly in the drive's own cache


def _native_reader():
    """torch.ops.edgewise (with `read_runs`) when the native kernels are built here, else None."""
    from edgewise.kernels import quant_matmul_ops

    ops = quant_matmul_ops()
    return ops if ops is not None and hasattr(ops, "read_runs") else None


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous memory of at least `nbytes` (rounded up to PAGE), page-aligned as O_DIRECT needs."""
    return mmap.mmap(-1, max(PAGE, -(-nbytes // PAGE) * PAGE))


class DirectReader:
    """Reads (file_offset, length, buffer_offset) runs of one file into a buffer, in parallel."""

    def __init__(self, path: str | Path, threads: int = 16, use_native: bool = True, eof_tail_ok: bool = False) -> None:
        """`eof_tail_ok`: a run that passes the file's end may stop there (the caller's data ends before it: a GGUF whose
        last tensor is streamed, its run aligned up to PAGE); otherwise any short read means a truncated file."""
        self.path, self.threads, self.eof_tail_ok = str(path), 0, eof_tail_ok
        self._pool: ThreadPoolExecutor | None = None
        self.set_threads(threads)  # first: refuses a bad count before a file is opened
        self.fd, self.direct = self._open()
        self.size = os.fstat(self.fd).st_size  # a run may pass the end (aligned up to PAGE): its read stops there
        self._native = _native_reader() if use_native else None
        if not self.direct:
            warnings.warn(
                f"{self.path}: the file system refuses O_DIRECT; reading through the page cache, "
                "dropping each read from it with POSIX_FADV_DONTNEED (timings are less faithful)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.reset_counters()

    def _open(self) -> tuple[int, bool]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except FileNotFoundError:
            raise EdgewiseError(f"{self.path}: no such file; check the path or re-run `edgewise flash convert`") from None
        except OSError:
            return os.open(self.path, os.O_RDONLY), False
        probe_buf = aligned_buffer(PAGE)
        try:
            os.preadv(fd, [probe_buf], 0)  # some file systems accept the flag but refuse the read
            return fd, True
        except OSError:
            os.close(fd)
            return os.open(self.path, os.O_RDONLY), False
        finally:
            probe_buf.close()

    def set_threads(self, threads: int) -> None:
        """Use `threads` reader threads (the pool is recreated only if the number changes)."""
        if threads < 1:
            raise EdgewiseError(f"{self.path}: threads = {threads}; use at least 1 reader thread")
        if threads != self.threads:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="edgewise-read")
            self.threads = threads

    def reset_counters(self) -> None:
        self.bytes_read = 0
        self.reads_issued = 0
        self.read_seconds = 0.0

    def read(self, runs: np.ndarray, buffer: mmap.mmap) -> None:
        """Read every run: `length` bytes at `file_offset` into `buffer[buffer_offset:]`, all multiples of PAGE."""
        runs = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
        if len(runs) == 0:
            return
        bad = np.flatnonzero((runs % PAGE != 0).any(axis=1) | (runs[:, 1] <= 0) | (runs[:, 2] + runs[:, 1] > len(buffer)))
        if len(bad):
            off, n, at = runs[bad[0]].tolist()
            raise EdgewiseError(
                f"{self.path}: run {bad[0]} (file_offset {off}, length {n}, buffer_offset {at}) is not page-aligned or does "
                f"not fit the {len(buffer)}-byte buffer; every field must be a multiple of {PAGE} and length > 0"
            )
        start = time.perf_counter()
        if self.direct and self._native is not None:
            self._read_native(runs, buffer)
            self.read_seconds += time.perf_counter() - start
            self.reads_issued += len(runs)
            self.bytes_read += int(runs[:, 1].sum())
            return
        tasks = min(self.threads, len(runs))
        view = memoryview(buffer)
        try:
            shares = [runs[k::tasks].tolist() for k in range(tasks)]  # strided: long and short runs spread evenly
            if tasks == 1:
                results = [self._read_share(shares[0], view)]
            else:
                assert self._pool is not None, "read() after close()"
                futures = [self._pool.submit(self._read_share, share, view) for share in shares]
                wait(futures)  # all of them, even if one failed: none may still write into the buffer
                results = [f.result() for f in futures]
        except OSError as e:
            raise EdgewiseError(f"{self.path}: read failed ({e.strerror}); check the device and the file") from None
        finally:
            view.release()
        self.read_seconds += time.perf_counter() - start
        self.reads_issued += len(runs)
        self.bytes_read += int(runs[:, 1].sum())
        for short in results:
            if short is not None and not self._ends_at_eof(*short):
                off, got, n = short
                raise EdgewiseError(
                    f"{self.path}: short read at offset {off} (got {got} of {n} bytes): the file is truncated; "
                    "re-run `edgewise flash convert`"
                )

    def _read_native(self, runs: np.ndarray, buffer: mmap.mmap) -> None:
        """The same reads from C++ threads (edgewise's native `read_runs`): no GIL hand-offs between reads."""
        import torch

        target = torch.frombuffer(buffer, dtype=torch.uint8)
        try:
            short = int(self._native.read_runs(self.fd, torch.from_numpy(np.ascontiguousarray(runs)), target, self.threads))
        except RuntimeError as e:
            raise EdgewiseError(f"{self.path}: read failed ({str(e).splitlines()[0]}); check the device and the file") from None
        if short >= 0:
            off, n, at = runs[short].tolist()
            with memoryview(buffer) as view:
                got = os.preadv(self.fd, [view[at : at + n]], off)  # again, for the byte count
            if self._ends_at_eof(off, got, n) and short == len(runs) - 1:  # the last run, aligned past the end: complete
                return
            raise EdgewiseError(f"{self.path}: short read at offset {off} (got {got} of {n} bytes): the file is truncated; re-run `edgewise flash convert`")

    def _ends_at_eof(self, off: int, got: int, n: int) -> bool:
        """A short read that is only the run's page-aligned tail past the file's end (a tensor ending the file)."""
        return self.eof_tail_ok and off + n > self.size and off + got == self.size

    def _read_share(self, share: list[list[int]], view: memoryview) -> tuple[int, int, int] | None:
        """Read one task's runs in order; the first short read, or None."""
        for off, n, at in share:
            got = os.preadv(self.fd, [view[at : at + n]], off)
            if not self.direct:
                os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)
            if got != n:
                return off, got, n
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ProbeResult:
    """Random-read throughput `gbps[i][j]` (GB/s, 1e9) for read size `sizes[i]` bytes with `threads[j]` threads."""

    sizes: list[int]
    threads: list[int]
    gbps: list[list[float]]
    direct: bool
    device: str
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "probe result") -> ProbeResult:
        redo = "delete it and re-run the probe"
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise EdgewiseError(f"{source}: not valid JSON ({e}); {redo}") from None
        if not isinstance(d, dict):
            raise EdgewiseError(f"{source}: expected a JSON object; {redo}")
        checks: dict[str, Callable[[object], bool]] = {
            "sizes": _positive_list,
            "threads": _positive_list,
            "gbps": lambda v: isinstance(v, list) and len(v) == len(d["sizes"])
            and all(_positive_list(row, (int, float)) and len(row) == len(d["threads"]) for row in v),
            "direct": lambda v: isinstance(v, bool),
            "device": lambda v: isinstance(v, str),
            "created": lambda v: isinstance(v, str),
        }
        for name, ok in checks.items():
            if name not in d or not ok(d[name]):
                raise EdgewiseError(f"{source}: field `{name}` is missing or malformed; {redo}")
        return cls(d["sizes"], d["threads"], [[float(x) for x in r] for r in d["gbps"]], d["direct"], d["device"], d["created"])

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise EdgewiseError(f"{path}: cannot read the probe result ({e.strerror}); run the probe to write it") from None
        return cls.from_json(text, source=str(path))


def _positive_list(v: object, kind: type | tuple[type, ...] = int) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, kind) and not isinstance(x, bool) and x > 0 for x in v)


def probe(
    path_or_dir: str | Path,
    sizes: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576),
    threads: tuple[int, ...] = (1, 4, 16, 32),
    seconds_per_point: float = 0.3,
    file_bytes: int = 256 << 20,
    progress: Callable[[int, int], None] | None = None,
) -> ProbeResult:
    """Random-offset (PAGE-aligned) read throughput per (size, threads), on `path_or_dir`'s device.

    A directory gets a scratch file of `file_bytes` random bytes, deleted afterwards; an existing
    file (at least MIN_PROBE_FILE bytes) is only read.
    """
    if any(s <= 0 or s % PAGE for s in sizes):
        raise EdgewiseError(f"probe sizes {list(sizes)}: every read size must be a positive multiple of {PAGE}")
    target = Path(path_or_dir)
    scratch = target.is_dir()
    if scratch:
        if file_bytes < max(sizes):
            raise EdgewiseError(f"probe file_bytes = {file_bytes}: must be at least the largest read size {max(sizes)}")
        target = target / f".edgewise-probe-{os.getpid()}.bin"
        _write_random(target, file_bytes)
    elif not target.is_file():
        raise EdgewiseError(f"{target}: no such file or directory to probe; give a directory on the device to measure")
    try:
        file_size = target.stat().st_size
        if not scratch and file_size < MIN_PROBE_FILE:
            raise EdgewiseError(f"{target}: {file_size} bytes is too small to probe (the drive would cache it); "
                                f"give a file of at least {MIN_PROBE_FILE >> 20} MiB or a directory")
        rng = np.random.default_rng()
        gbps = [[0.0] * len(threads) for _ in sizes]
        with DirectReader(target, threads=max(threads)) as reader:
            buffer = aligned_buffer(max(sizes) * max(threads))
            for i, s in enumerate(sizes):
                for j, t in enumerate(threads):
                    reader.set_threads(t)
                    gbps[i][j] = _measure(reader, buffer, rng, file_size, s, t, seconds_per_point)
                    if progress is not None:
                        progress(i * len(threads) + j + 1, len(sizes) * len(threads))
            buffer.close()
        st_dev = target.stat().st_dev
        return ProbeResult(list(sizes), list(threads), gbps, reader.direct, f"{os.major(st_dev)}:{os.minor(st_dev)}")
    finally:
        if scratch:
            target.unlink(missing_ok=True)


def _write_random(path: Path, nbytes: int) -> None:
    """`nbytes` random bytes, written beside `path` then renamed, and synced so reads hit the device."""
    rng, tmp = np.random.default_rng(), path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.writelines(rng.bytes(min(8 << 20, nbytes - start)) for start in range(0, nbytes, 8 << 20))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _measure(reader: DirectReader, buffer: mmap.mmap, rng: np.random.Generator,
             file_size: int, size: int, threads: int, seconds: float) -> float:
    """GB/s of random `size`-byte reads with `threads` threads, in batches, for about `seconds`."""
    batch = threads * max(4, min(1024, (32 << 20) // (size * threads)))
    runs = np.empty((batch, 3), dtype=np.int64)
    runs[:, 1] = size
    runs[:, 2] = (np.arange(batch) % threads) * size  # read() gives run i to task i % threads: a slot per task
    reader.reset_counters()
    while reader.read_seconds < seconds:
        runs[:, 0] = rng.integers(0, (file_size - size) // PAGE + 1, batch) * PAGE
        reader.read(runs, buffer)
    return reader.bytes_read / reader.read_seconds / 1e9


class CostModel:
    """Seconds per read as a function of its size, from a probe: the best thread count's throughput."""

    def __init__(self, sizes: list[int], gbps: list[float], threads: list[int]) -> None:
        order = np.argsort(sizes)
        self.sizes = np.asarray(sizes, dtype=np.int64)[order]
        self.gbps = np.asarray(gbps, dtype=np.float64)[order]
        self.threads = np.asarray(threads, dtype=np.int64)[order]
        if not (self.gbps > 0).all():
            raise EdgewiseError(f"cost model: throughputs {self.gbps.tolist()} GB/s must all be positive; re-run the probe")

    @classmethod
    def from_probe(cls, result: ProbeResult) -> CostModel:
        g = np.asarray(result.gbps)
        best = g.argmax(axis=1)
        return cls(result.sizes, g.max(axis=1).tolist(), [result.threads[b] for b in best])

    @classmethod
    def default(cls) -> CostModel:
        """The development machine's measurement (random O_DIRECT reads, 4-16 threads): 50K IOPS at
        4 KiB, 35K IOPS at 16 KiB, 0.65 GB/s at 64 KiB, 0.8 GB/s at 1 MiB. Used when no probe was saved."""
        return cls([4096, 16384, 65536, 1 << 20], [50e3 * 4096 / 1e9, 35e3 * 16384 / 1e9, 0.65, 0.8], [16, 16, 16, 16])

    def _seconds(self, nbytes: np.ndarray) -> np.ndarray:
        n = np.asarray(nbytes, dtype=np.float64)
        log_gbps = np.interp(np.log(np.maximum(n, 1)), np.log(self.sizes), np.log(self.gbps))  # clamped at the ends
        return n / (np.exp(log_gbps) * 1e9)

    def read_seconds(self, nbytes: int) -> float:
        """What one read of `nbytes` costs within a parallel batch at the best thread count."""
        return float(self._seconds(nbytes))

    def best_threads(self, nbytes: int) -> int:
        nearest = np.abs(np.log(self.sizes) - math.log(max(nbytes, 1))).argmin()
        return int(self.threads[nearest])

    def predict_seconds(self, run_lengths_bytes: np.ndarray) -> float:
        return float(self._seconds(run_lengths_bytes).sum())

    def plan_adjacent(self, pages: np.ndarray, page_bytes: int = PAGE, max_read: int = 1 << 20) -> np.ndarray:
        """Runs [n, 2] of (first_page, n_pages) joining only consecutive pages, each at most `max_read` bytes."""
        pages = _check_pages(pages)
        max_pages = _max_pages(page_bytes, max_read)
        if len(pages) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        starts = pages[np.r_[0, breaks]]
        lengths = pages[np.r_[breaks - 1, len(pages) - 1]] - starts + 1
        pieces = -(-lengths // max_pages)  # a run longer than max_read becomes several
        k = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        first = np.repeat(starts, pieces) + k * max_pages
        return np.stack([first, np.minimum(max_pages, np.repeat(lengths, pieces) - k * max_pages)], axis=1)

    def plan(self, pages: np.ndarray, page_bytes: int = PAGE, max_read: int = 1 << 20) -> np.ndarray:
        """Runs [n, 2] of (first_page, n_pages) covering the sorted unique `pages`, gaps read where cheaper.

        Greedy, left to right over the adjacent runs: the next run joins the current one (with the
        unneeded pages between them) when reading the joined span is predicted faster than reading
        the current span and the next run separately, and the span stays within `max_read` bytes.
        """
        runs = self.plan_adjacent(pages, page_bytes, max_read)
        max_pages = _max_pages(page_bytes, max_read)
        cost = self._seconds(np.arange(max_pages + 1) * page_bytes).tolist()  # by page count
        out: list[tuple[int, int]] = []
        for first, n in runs.tolist():
            if out:
                cur_first, cur_n = out[-1]
                joined = first + n - cur_first
                if joined <= max_pages and cost[joined] < cost[cur_n] + cost[n]:
                    out[-1] = (cur_first, joined)
                    continue
            out.append((first, n))
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _check_pages(pages: np.ndarray) -> np.ndarray:
    pages = np.asarray(pages, dtype=np.int64)
    if pages.ndim != 1 or (len(pages) and (pages[0] < 0 or (np.diff(pages) <= 0).any())):
        raise EdgewiseError("plan: `pages` must be a 1-D array of sorted, unique, non-negative page indices; sort with np.unique")
    return pages


def _max_pages(page_bytes: int, max_read: int) -> int:
    if page_bytes <= 0 or max_read < page_bytes:
        raise EdgewiseError(f"plan: max_read = {max_read} must hold at least one page of {page_bytes} bytes; raise max_read")
    return max_read // page_bytes
