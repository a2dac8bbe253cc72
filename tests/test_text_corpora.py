"""Text corpora for perplexity: the two shipped corpora load offline, and user files are read as strict UTF-8."""

from __future__ import annotations

import pytest

from edgewise.data.text import CORPORA, load_text
from edgewise.errors import EdgewiseError


def test_shakespeare_is_plain_text_of_all_plays():
    text = load_text("shakespeare")
    assert len(text) > 4_000_000
    assert "HAMLET\nTo be, or not to be: that is the question:\n" in text
    assert "Exeunt\n\nEdward III\n\nACT I\n" in text  # plays separated by blank lines, headings kept as text
    assert not any(mark in text for mark in ("**", "_", "#", "\\[", "&amp;"))  # markdown removed
    assert load_text("shakespeare") is text  # cached


def test_austen_is_six_novels_in_publication_order():
    text = load_text("austen")
    assert len(text) > 3_500_000
    assert "It is a truth universally acknowledged, that a single man in possession\n" in text
    titles = ["SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA", "NORTHANGER ABBEY", "Persuasion"]
    assert text.startswith(titles[0])
    starts = [text.index(f"\n\n{title}\n") for title in titles[1:]]
    assert starts == sorted(starts)


def test_utf8_file_round_trips(tmp_path):
    path = tmp_path / "poem.txt"
    content = "Naïve café — 東京\nsecond line\n"
    path.write_text(content, encoding="utf-8")
    assert load_text(str(path)) == content


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc café".encode("latin-1"))
    with pytest.raises(EdgewiseError, match="offset 7") as error:
        load_text(str(path))
    assert str(path) in str(error.value)


def test_missing_file_and_directory_are_clear_errors(tmp_path):
    with pytest.raises(EdgewiseError, match="UTF-8 text file") as error:
        load_text(str(tmp_path / "missing.txt"))
    assert "missing.txt" in str(error.value)
    with pytest.raises(EdgewiseError, match="is a directory"):
        load_text(str(tmp_path))


def test_unknown_name_lists_corpora():
    with pytest.raises(EdgewiseError) as error:
        load_text("hemingway")
    message = str(error.value)
    assert all(name in message for name in CORPORA)
    assert "UTF-8" in message
