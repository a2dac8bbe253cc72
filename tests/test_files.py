"""Atomic writes: the target is replaced whole or not at all, and no temp file is left behind."""

from __future__ import annotations

import pytest

from edgewise.files import atomic_path, write_text_atomic


def test_write_replaces_whole_and_a_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.md"
    write_text_atomic(target, "first\n")
    assert target.read_text() == "first\n"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.md"]
