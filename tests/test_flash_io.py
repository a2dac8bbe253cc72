"""edgewise.flash.io: exact bytes from O_DIRECT and buffered reads, short reads, read planning, the probe."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgewise.errors import EdgewiseError
from edgewise.flash.io import (
    PAGE,
    CostModel,
    DirectReader,
    ProbeResult,
    aligned_buffer,
    probe,
)


def _supports_direct(directory: Path) -> bool:
    path = directory / ".direct-check"
    path.write_bytes(b"x" * PAGE)
    buf = aligned_buffer(PAGE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [buf], 0) == PAGE
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        buf.close()
        path.unlink()


@pytest.fixture
def direct_dir(tmp_path):
    """tmp_path, or a directory under the repo's .pytest_cache where /tmp refuses O_DIRECT."""
    if _supports_direct(tmp_path):
        yield tmp_path
        return
    cache = Path(__file__).parents[1] / ".pytest_cache"
    cache.mkdir(exist_ok=True)
    if not _supports_direct(cache):
        pytest.skip("no directory here supports O_DIRECT")
    with tempfile.TemporaryDirectory(dir=cache) as d:
        yield Path(d)


@pytest.fixture
def fallback_dir(tmp_path, monkeypatch):
    """A tmpfs directory if there is one that refuses O_DIRECT, else O_DIRECT refused by hand."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and not _supports_direct(shm):
        with tempfile.TemporaryDirectory(dir=shm) as d:
            yield Path(d)
        return
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: _refuse() if flags & os.O_DIRECT else real_open(p, flags, *a))
    yield tmp_path


def _refuse():
    raise OSError(22, "Invalid argument")


def _random_file(path: Path, nbytes: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return data


def _check_random_runs(path: Path, data: np.ndarray, threads: int, use_native: bool = True) -> DirectReader:
    rng = np.random.default_rng(1)
    n_pages = len(data) // PAGE
    lengths = rng.integers(1, 9, 40) * PAGE
    offsets = rng.integers(0, n_pages - 8, 40) * PAGE
    at = np.r_[0, np.cumsum(lengths)[:-1]]
    buf = aligned_buffer(int(lengths.sum()))
    reader = DirectReader(path, threads=threads, use_native=use_native)
    reader.read(np.stack([offsets, lengths, at], axis=1), buf)
    got = np.frombuffer(buf, dtype=np.uint8)
    for off, n, a in zip(offsets, lengths, at):
        np.testing.assert_array_equal(got[a : a + n], data[off : off + n])
    assert reader.bytes_read == lengths.sum() and reader.reads_issued == 40 and reader.read_seconds > 0
    return reader


@pytest.mark.parametrize("threads", [1, 3, 16])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
def test_direct_reads_return_the_exact_bytes(direct_dir, threads, use_native):
    path = direct_dir / "w.bin"
    data = _random_file(path, 64 * PAGE)
    with _check_random_runs(path, data, threads, use_native) as reader:
        assert (reader._native is not None) == use_native
        assert reader.direct
        reader.reset_counters()
        assert (reader.bytes_read, reader.reads_issued, reader.read_seconds) == (0, 0, 0.0)
        reader.set_threads(2)
        assert reader.threads == 2


def test_fallback_warns_and_reads_the_exact_bytes(fallback_dir):
    path = fallback_dir / "w.bin"
    data = _random_file(path, 64 * PAGE)
    with pytest.warns(RuntimeWarning, match="page cache"):
        reader = _check_random_runs(path, data, 4)
    assert not reader.direct
    reader.close()


def test_misaligned_run_is_refused(direct_dir):
    path = direct_dir / "w.bin"
    _random_file(path, 8 * PAGE)
    with DirectReader(path, threads=2) as reader, pytest.raises(EdgewiseError, match=r"run 1 .*multiple of 4096"):
        reader.read(np.array([[0, PAGE, 0], [PAGE + 512, PAGE, PAGE]]), aligned_buffer(2 * PAGE))


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "python"])
def test_truncated_file_gives_a_short_read_error(direct_dir, use_native):
    path = direct_dir / "w.bin"
    _random_file(path, 4 * PAGE + 100)
    short = r"short read at offset 16384 \(got 100 of 8192 bytes\).*flash convert"
    with DirectReader(path, threads=2, use_native=use_native) as reader, pytest.raises(EdgewiseError, match=short):
        reader.read(np.array([[0, PAGE, 0], [4 * PAGE, 2 * PAGE, PAGE]]), aligned_buffer(3 * PAGE))


def test_plan_covers_every_page_within_max_read():
    rng = np.random.default_rng(0)
    pages = np.unique(rng.integers(0, 5000, 1500))
    model = CostModel.default()
    for max_read in (PAGE, 16 * PAGE, 1 << 20):
        runs = model.plan(pages, max_read=max_read)
        assert (runs[:, 1] * PAGE <= max_read).all() and (runs[1:, 0] >= runs[:-1].sum(axis=1)).all()
        covered = np.concatenate([np.arange(f, f + n) for f, n in runs])
        assert np.isin(pages, covered).all()
        assert np.isin(runs[:, 0], pages).all() and np.isin(runs.sum(axis=1) - 1, pages).all()  # no needless ends
    assert model.predict_seconds(model.plan(pages)[:, 1] * PAGE) < model.predict_seconds(model.plan_adjacent(pages)[:, 1] * PAGE)


def test_plan_merges_a_small_gap_but_not_a_large_one():
    model = CostModel.default()
    np.testing.assert_array_equal(model.plan(np.array([10, 11, 13])), [[10, 4]])
    np.testing.assert_array_equal(model.plan(np.array([10, 211])), [[10, 1], [211, 1]])
    np.testing.assert_array_equal(model.plan_adjacent(np.array([3, 4, 5, 7, 9, 10])), [[3, 3], [7, 1], [9, 2]])
    np.testing.assert_array_equal(model.plan_adjacent(np.arange(600), max_read=256 * PAGE), [[0, 256], [256, 256], [512, 88]])
    assert model.plan(np.array([], dtype=np.int64)).shape == (0, 2)
    with pytest.raises(EdgewiseError, match="sorted"):
        model.plan(np.array([5, 3]))


def test_cost_model_interpolates_and_picks_threads():
    result = ProbeResult([4096, 65536], [1, 8], [[0.05, 0.2], [0.6, 0.5]], True, "8:0")
    model = CostModel.from_probe(result)
    assert model.read_seconds(4096) == pytest.approx(4096 / 0.2e9)
    assert model.read_seconds(16384) == pytest.approx(16384 / (0.2e9 * 3 ** 0.5))  # halfway in log-log
    assert model.read_seconds(1 << 20) == pytest.approx((1 << 20) / 0.6e9)  # clamped
    assert (model.best_threads(4096), model.best_threads(1 << 20)) == (8, 1)


def test_probe_measures_and_round_trips(tmp_path):
    calls = []
    result = probe(tmp_path, sizes=(4096, 65536), threads=(1, 2), seconds_per_point=0.05, file_bytes=8 << 20,
                   progress=lambda done, total: calls.append((done, total)))
    assert np.array(result.gbps).shape == (2, 2) and (np.array(result.gbps) > 0).all()
    assert calls[-1] == (4, 4) and list(tmp_path.iterdir()) == []  # the scratch file is gone
    saved = tmp_path / "probe.json"
    result.save(saved)
    assert ProbeResult.load(saved) == result
    assert CostModel.from_probe(result).read_seconds(PAGE) > 0


def test_probe_load_names_the_file_and_field(tmp_path):
    bad = tmp_path / "probe.json"
    bad.write_text("{not json")
    with pytest.raises(EdgewiseError, match=f"{bad}: not valid JSON"):
        ProbeResult.load(bad)
    bad.write_text('{"sizes": [4096], "threads": [1], "gbps": [[0.1, 0.2]], "direct": true, "device": "8:0", "created": "x"}')
    with pytest.raises(EdgewiseError, match="field `gbps`"):
        ProbeResult.load(bad)
    with pytest.raises(EdgewiseError, match="missing.json: cannot read"):
        ProbeResult.load(tmp_path / "missing.json")
