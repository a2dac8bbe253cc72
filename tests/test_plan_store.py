"""The streaming plan store (`edgewise flash convert STORE --budget SIZE`, `generate|eval ppl --flash STORE`): it runs the
dense model's output from the saved plan; a one-buffer ring where the budget cannot hold two; and every bad store, model
or flag is one error naming what is wrong and what to do."""

from __future__ import annotations

import json
import shutil

import pytest

from edgewise.cli import main
from edgewise.errors import EdgewiseError
from edgewise.flash.plan_store import PlanStore
from edgewise.flash.residency import _ring_bytes, model_parts, plan_residency
from edgewise.flash.runtime import StreamingLanguageModel
from edgewise.gguf_io import read_gguf
from edgewise.lm.runtime import LanguageModel
from edgewise.models import resolve_model

PROMPT = "One, two, three, four, one, two,"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "smollm2.plan"
    PlanStore.write(path, None, "60%")
    return path


def test_convert_prints_the_plan_and_generate_runs_it_as_the_dense_model(tmp_path, capsys):
    path = tmp_path / "s.flash"
    assert main(["flash", "convert", str(path), "--budget", "60%"]) == 0
    out = capsys.readouterr().out
    assert "| prefetch ring |" in out and "| **total** |" in out and "MB streamed from" in out
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "edgewise-stream-plan" and manifest["ring_depth"] == 2 and (path / "plan.md").is_file()
    assert main(["generate", "--no-compile", "--max-tokens", "10", PROMPT]) == 0
    dense = capsys.readouterr().out
    assert main(["generate", "--flash", str(path), "--speculate", "3", "--max-tokens", "10", PROMPT]) == 0
    got = capsys.readouterr()
    assert got.out == dense
    assert "MB read per token" in got.err and "I/O wait" in got.err


def test_eval_ppl_through_the_plan_equals_the_dense_model(store, capsys):
    argv = ["eval", "ppl", "--text", "shakespeare", "--ctx", "128", "--max-tokens", "256"]
    assert main(argv) == 0
    dense = float(capsys.readouterr().out.split("ppl = ")[1])
    assert main([*argv, "--flash", str(store)]) == 0
    out = capsys.readouterr().out
    assert "streamed under a" in out
    # scored in chunks of 32 rows: the kernels group rows into tiles differently, which moves logits (runtime.SCORE_BYTES)
    assert float(out.split("ppl = ")[1]) == pytest.approx(dense, rel=5e-3)


def test_a_budget_too_small_for_two_buffers_gets_one_and_the_same_tokens():
    gguf = read_gguf(resolve_model(None))
    parts = model_parts(gguf)
    streamed = [p for p in parts if p.layer >= 0]
    fixed = sum(p.nbytes for p in parts if p.required)
    one, two = fixed + _ring_bytes(streamed, 1), fixed + _ring_bytes(streamed, 2)
    plan = plan_residency(parts, (one + two) // 2)
    assert plan.ring_depth == 1 and plan.dram_bytes <= plan.budget_bytes
    assert plan_residency(parts, two).ring_depth == 2
    with pytest.raises(EdgewiseError, match=f"resident minimum of {one / 1e6:.1f} MB"):
        plan_residency(parts, one - 1)
    dense = LanguageModel.load(compile=False)
    ids = dense.tokenizer.encode(PROMPT)
    want = list(dense.generate(ids, 8, stop_at_eot=False))
    with StreamingLanguageModel.open(budget=(one + two) // 2) as lm:
        assert lm.ring.depth == 1
        assert list(lm.generate(ids, 8, stop_at_eot=False)) == want


def _copy(store, tmp_path):
    bad = tmp_path / "bad.plan"
    shutil.copytree(store, bad)
    return bad, json.loads((bad / "manifest.json").read_text())


def test_bad_stores_are_one_error_each(store, tmp_path):
    with pytest.raises(EdgewiseError, match="no such flash store directory"):
        PlanStore.open(tmp_path / "missing")
    bad, manifest = _copy(store, tmp_path)
    for field, value, message in [
        ("version", 99, "plan version 99"),
        ("ring_depth", 0, "field 'ring_depth' is 0"),
        ("resident", ["blk.0.attn_q.weight", "no.such.tensor"], "keeps tensor 'no.such.tensor' resident"),
        ("resident", ["blk.0.attn_q.weight"], "the plan streams"),
        ("budget_bytes", 1000, "more than its budget"),
        ("model", {**manifest["model"], "bytes": manifest["model"]["bytes"] + 1}, "truncated, or another model"),
        ("model", {**manifest["model"], "sha256": "0" * 64}, "checksum mismatch"),
        ("model", {**manifest["model"], "name": "/nowhere/model.gguf", "file": "/nowhere/model.gguf"}, "is missing; give it with --model"),
    ]:
        (bad / "manifest.json").write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(EdgewiseError, match=message):
            PlanStore.open(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(EdgewiseError, match="unreadable manifest"):
        PlanStore.open(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(EdgewiseError, match="no manifest.json"):
        PlanStore.open(bad)


def test_a_store_over_another_model_is_refused(store, tmp_path):
    other = tmp_path / "other.gguf"
    shutil.copy(resolve_model(None), other)
    with open(other, "r+b") as f:  # one byte of the last tensor's data changed: the same size, another model
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EdgewiseError, match="this plan is for smollm2"):
        PlanStore.open(store, model=other)
    with pytest.raises(EdgewiseError, match="no such model file"):
        PlanStore.open(store, model=tmp_path / "absent.gguf")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--flash", "{store}", "--dram-budget", "50%", "hi"], "made for one budget: --dram-budget applies to the bundled store only"),
        (["flash", "convert", "{tmp}/s", "--budget", "lots"], "--budget 'lots': expected a size"),
        (["flash", "convert", "{tmp}/s", "--budget", "1MB"], "below this model's resident minimum"),
        (["flash", "convert", "{tmp}/s", "--budget", "100%"], "nothing to stream"),
    ],
)
def test_bad_plan_flags_are_one_line_errors(store, tmp_path, capsys, argv, message):
    argv = [a.format(store=store, tmp=tmp_path) for a in argv]
    assert main(argv) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_gguf_whose_last_tensor_streams_is_read_to_its_end(tmp_path):
    """The last streamed run is aligned up past the file's end; its read stops there (found by the fuzz seed: a tiny
    GGUF ending with an FFN tensor failed with "short read ... the file is truncated")."""
    from tests.fuzz.seeds import write_gguf, write_plan_store

    gguf = write_gguf(tmp_path / "tiny.gguf", resolve_model(None))
    g = read_gguf(gguf)
    last = max(g.tensors.values(), key=lambda t: t.offset)
    assert ".ffn_" in last.name and (last.offset + last.nbytes) % 4096 != 0  # the case: an FFN tensor ends the file mid-page
    store = write_plan_store(tmp_path / "tiny.plan", gguf)
    dense = LanguageModel.load(gguf, compile=False)
    ids = dense.tokenizer.encode("hi there")
    want = list(dense.generate(ids, 3, stop_at_eot=False))
    with StreamingLanguageModel.from_store(store) as lm:
        assert lm.plan.streamed and list(lm.generate(ids, 3, stop_at_eot=False)) == want
