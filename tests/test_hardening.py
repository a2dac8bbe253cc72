"""Faults a hostile user found (issue 13), each pinned by a regression test: bad arguments refused
while parsing, before any model loads; corrupted files named with the field that is wrong."""

from __future__ import annotations

import shutil
import time

import pytest

from edgewise.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--max-tokens", "0", "hi"], "argument --max-tokens: must be at least 1, got 0"),
        (["generate", "--max-tokens", "-1", "hi"], "argument --max-tokens: must be at least 1, got -1"),
        (["generate", "--top-p", "nan", "hi"], "argument --top-p: must be > 0.0 and at most 1.0, got nan"),
        (["generate", "--temperature", "-0.5", "hi"], "argument --temperature: must be at least 0.0, got -0.5"),
        (["chat", "--seed", "-3"], "argument --seed: must be at least 0, got -3"),
        (["eval", "ppl", "--text", "shakespeare", "--ctx", "0"], "argument --ctx: must be at least 2, got 0"),
        (["eval", "ppl", "--text", "shakespeare", "--max-tokens", "ten"], "argument --max-tokens: expected a whole number, got 'ten'"),
        (["flash", "convert", "out", "--rank", "0"], "argument --rank: must be at least 1, got 0"),
        (["tiny", "train", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["tiny", "train", "--resolution", "16"], "argument --resolution: must be at least 32, got 16"),
        (["tiny", "plan", "--classes", "1"], "argument --classes: must be at least 2, got 1"),
        (["tiny", "compile", "--budget", "0KB"], "argument --budget: must be at least 1 byte, got 0KB"),
        (["tiny", "firmware", "--sram", "lots"], "argument --sram: cannot read the budget 'lots'"),
    ],
)
def test_bad_arguments_are_refused_while_parsing(capsys, argv, message):
    """Finding 4 (--max-tokens 0 and -1 were accepted) and 5 (`eval ppl --ctx 0` failed only after
    the model had loaded): every count, size and rate is an argparse type now."""
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and time.perf_counter() - t0 < 5  # nothing loaded
    assert message in capsys.readouterr().err


def test_corrupted_vocabulary_is_a_one_line_error(model_path, tmp_path, capsys):
    """Finding 1: bit 1 of byte 2089 of SmolLM2's GGUF lies in a token string of its vocabulary;
    the tokenizers library then refuses a merge ("Token ... out of vocabulary"), a traceback before."""
    bad = tmp_path / "flipped.gguf"
    shutil.copyfile(model_path, bad)
    with open(bad, "r+b") as f:
        f.seek(2089)
        byte = f.read(1)[0]
        f.seek(2089)
        f.write(bytes([byte ^ 0b10]))
    assert main(["generate", "--model", str(bad), "--no-compile", "--max-tokens", "2", "hi"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("edgewise: error:")]
    assert "Traceback" not in err and "loading model" not in err and len(errors) == 1  # refused before the weights load
    assert str(bad) in errors[0] and "tokenizer.ggml.tokens/merges is inconsistent" in errors[0] and "corrupted" in errors[0]


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 1, 2, 3, 1000], "the largest training label is 1000, which would make 1001 classes, but only 5 labels occur (class 4 has no image)"),
        ([0, 1, 2, 10**12], "which would make 1000000000001 classes, but only 4 labels occur (class 3 has no image)"),
        ([2, 2, 2, 2], "every training label is 2"),
    ],
)
def test_labels_must_be_every_class_0_to_k_minus_1(tmp_path, capsys, labels, message):
    """Findings 2 (a label of 10^12 asked for a 5 PB classifier: a traceback from the allocator) and
    3 (one label of 1000 among 0-3 silently made a 1001-class model)."""
    np = pytest.importorskip("numpy")
    y = np.array(labels * 4, dtype=np.int64)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((len(y), 8, 8), np.uint8), y=y)
    t0 = time.perf_counter()
    assert main(["tiny", "train", "--data", str(data), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert message in err and str(data) in err and "Traceback" not in err and time.perf_counter() - t0 < 30


def test_truncated_gguf_names_the_tensor_and_its_bytes(model_path, tmp_path, capsys):
    """Finding 7: errors passed on numpy's words ("cannot reshape array of size 0 into shape
    (49152,612)"); now they name the tensor, its type and shape, and the bytes it needs."""
    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(50_000_000))
    assert main(["generate", "--model", str(cut), "--no-compile", "hi"]) == 1
    err = capsys.readouterr().err
    assert "reshape" not in err and "Traceback" not in err
    assert "corrupted or truncated GGUF: tensor #" in err and "needs bytes" in err and "but the file ends at 50000000" in err


def test_corrupted_gguf_metadata_names_the_key(model_path, tmp_path):
    from edgewise.errors import EdgewiseError
    from edgewise.gguf_io import read_gguf

    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(3000))  # inside the vocabulary
    with pytest.raises(EdgewiseError, match=r"metadata key/value #\d+ of \d+ 'tokenizer.ggml.tokens' \(its value at byte \d+\) is unreadable"):
        read_gguf(cut)
