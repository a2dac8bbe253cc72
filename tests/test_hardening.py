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
        (["tiny", "plan", "--width", "inf"], "argument --width: must be > 0.0 and at most 4.0, got inf"),
        (["tiny", "train", "--lr", "inf"], "argument --lr: must be > 0.0, got inf"),
        (["tiny", "compile", "--budget", "0KB"], "argument --budget: must be at least 1 byte, got 0KB"),
        (["tiny", "firmware", "--sram", "lots"], "argument --sram: size 'lots': expected a size like 256KB"),
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


# -- faults the fuzzing harness found (tests/fuzz), one test each ------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(model_path, tmp_path_factory):
    from tests.fuzz.seeds import write_gguf

    return write_gguf(tmp_path_factory.mktemp("seed") / "tiny.gguf", model_path)


def _with_field(src, dst, kind: str, value: int, nth: int = 0):
    """A copy of GGUF `src` with the nth field of `kind` (tests/fuzz/mutators.py's walk) set to `value`."""
    from tests.fuzz.mutators import gguf_fields

    data = bytearray(src.read_bytes())
    f = [f for f in gguf_fields(bytes(data)) if f.kind == kind][nth]
    data[f.offset : f.offset + f.size] = value.to_bytes(f.size, "little")
    dst.write_bytes(bytes(data))
    return dst


def _cli_error(capsys, path) -> str:
    assert main(["generate", "--model", str(path), "--no-compile", "--max-tokens", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_tiny_gguf_seed_runs(tiny_gguf):
    assert main(["generate", "--model", str(tiny_gguf), "--no-compile", "--max-tokens", "2", "hi"]) == 0


def test_damaged_tensor_dimension_is_named(tiny_gguf, tmp_path, capsys):
    """A weight's dimension 64 -> 32 reached the kernel ("q4_1_linear: x has 64 columns ...")."""
    bad = _with_field(tiny_gguf, tmp_path / "dim.gguf", "dim", 32, nth=5)
    err = _cli_error(capsys, bad)
    assert "has shape" in err and "but the metadata" in err and "implies" in err


def _with_key_value(src, dst, key: str, value: int):
    """A copy of GGUF `src` whose 32-bit metadata value `key` is `value`."""
    from tests.fuzz.mutators import gguf_fields

    data = bytearray(src.read_bytes())
    f = next(f for f in gguf_fields(bytes(data)) if f.kind == "key_bytes" and bytes(data[f.offset : f.offset + f.size]) == key.encode())
    value_at = f.offset + f.size + 4  # after the value's type
    data[value_at : value_at + 4] = value.to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


def test_absurd_context_length_is_refused_before_allocating(tiny_gguf, tmp_path, capsys):
    """context_length 2^31 made the RoPE tables ask for 16 GB."""
    err = _cli_error(capsys, _with_key_value(tiny_gguf, tmp_path / "ctx.gguf", "llama.context_length", 1 << 31))
    assert "metadata 'llama.context_length' is 2147483648; expected an integer in 1..16777216" in err


def test_out_of_range_special_token_is_named(tiny_gguf, tmp_path, capsys):
    err = _cli_error(capsys, _with_key_value(tiny_gguf, tmp_path / "eos.gguf", "tokenizer.ggml.eos_token_id", 1 << 31))
    assert "metadata 'tokenizer.ggml.eos_token_id' is 2147483648, not a token id 0..1023" in err


def test_overlapping_tensors_are_refused(tiny_gguf, tmp_path, capsys):
    """A damaged data offset made two tensors read the same bytes: garbage weights, silently."""
    bad = _with_field(tiny_gguf, tmp_path / "offset.gguf", "tensor_offset", 0, nth=3)
    err = _cli_error(capsys, bad)
    assert "starts at byte" in err and "inside tensor" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"bias_depth": 2, "weights": {"features.16.conv.0.0": \xff}}', "cannot read the scheme as UTF-8 JSON"),
        (b'{"weights": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nests too deeply"),
        (b'{"bias_depth": true}', "bias_depth must be a non-negative integer, got True"),
        (b'{"classifier": "yes"}', "classifier must be true or false, got 'yes'"),
    ],
)
def test_damaged_schemes_are_one_line_errors(tmp_path, capsys, content, message):
    """Found by the fuzzer: bytes that are not UTF-8 and deep nesting gave tracebacks; booleans and
    strings passed as numbers and flags."""
    scheme = tmp_path / "scheme.json"
    scheme.write_bytes(content)
    assert main(["tiny", "plan", "--scheme", str(scheme), "--resolution", "32", "--png", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: "a string", "a manifest is a JSON object, got str"),
        (lambda m: m["dims"].pop("n_layers"), "field 'dims.n_layers' is None, expected a non-negative integer"),
        (lambda m: m["resident_tensors"]["output_norm.weight"].update(qtype=["F32"]), "field 'resident_tensors.output_norm.weight'"),
        (lambda m: m["predictor"].update(k_units=[0, 2]), "field 'predictor.k_units' must list positive integers"),
    ],
)
def test_damaged_flash_manifest_names_the_field(tiny_gguf, tmp_path, capsys, damage, message):
    """Found by the fuzzer: a manifest that was not an object, or a field of the wrong type, gave a
    KeyError or TypeError wherever the field was first used."""
    import json

    from tests.fuzz.seeds import write_flash_store

    store = write_flash_store(tmp_path / "store", tiny_gguf)
    capsys.readouterr()
    manifest = json.loads((store / "manifest.json").read_text())
    replaced = damage(manifest)
    (store / "manifest.json").write_text(json.dumps(replaced if isinstance(replaced, str) else manifest))
    assert main(["generate", "--flash", str(store), "--model", str(tiny_gguf), "--dram-budget", "100%", "--max-tokens", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_flash_convert_never_replaces_a_folder_that_is_not_a_store(tmp_path, capsys):
    """Convert swaps the store folder whole (files.atomic_dir): a folder of other files is refused
    before any work, and so is `.` (the review of issue 13's change)."""
    folder = tmp_path / "my-project"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["flash", "convert", str(folder)]) == 1
    assert "not a flash store and not empty" in capsys.readouterr().err and (folder / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--speculate", "8", "hi"], "speculative draft length 8: expected 1 to 7 tokens"),
        (["generate", "--speculate", "2", "--temperature", "0.7", "hi"], "--speculate checks drafts against the greedy choice"),
        (["chat", "--speculate", "2", "--temperature", "0.7"], "--speculate checks drafts against the greedy choice"),
    ],
)
def test_bad_speculation_is_refused_before_loading(capsys, argv, message):
    t0 = time.perf_counter()
    assert main(argv) != 0 and time.perf_counter() - t0 < 5  # nothing loaded
    assert message in capsys.readouterr().err
