"""Structured pruning: a pruned model equals the source with the pruned parts cut out of its computation (checked
through the runtime on rewritten files and on the source's own blocks), its parameter count is right, and the real
model runs pruned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from edgewise.compress.gguf_write import tensor_bytes, write_gguf
from edgewise.compress.mixed import KLProbe
from edgewise.compress.pipeline import source_weight
from edgewise.compress.prune import PrunePlan, ffn_importance, head_importance, parameter_count, plan_pruning, prune_gguf
from edgewise.data.text import load_text
from edgewise.errors import EdgewiseError
from edgewise.gguf_io import read_gguf
from edgewise.lm.runtime import LanguageModel
from tests.test_other_llama_gguf import DIM, FFN, HEADS, KV_HEADS, LAYERS, write_tiny

TEXT = "Pruning keeps what the calibration text says matters, and the rest goes. " * 4


def with_float_down(src, path):
    """The tiny model with every ffn_down and attn_output as F16 (its Q4_0 dequantized): pruning slices them exactly."""
    tensors = {n: (t.qtype, tensor_bytes(t.raw, t.shape)) for n, t in src.tensors.items()}
    for n, t in src.tensors.items():
        if n.endswith(("ffn_down.weight", "attn_output.weight")):
            tensors[n] = (QT.F16, tensor_bytes(source_weight(t).astype(np.float16), t.shape))
    return read_gguf(write_gguf(src, path, tensors))


@pytest.fixture(scope="module")
def tiny(gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune")
    return with_float_down(read_gguf(write_tiny(gguf, folder / "q.gguf", "llama")), folder / "tiny.gguf")


def logits(path, ids):
    lm = LanguageModel.load(path, precision="fp32", compile=False)
    return lm.prefill(ids, lm.new_cache(len(ids)), last_only=False)


def test_pruned_neurons_are_cut_out_of_the_computation(tiny, tmp_path):
    rng = np.random.default_rng(0)
    plan = PrunePlan({i: np.sort(rng.choice(FFN, 96, replace=False)) for i in range(LAYERS)}, ())
    out = prune_gguf(tiny, tmp_path / "pruned.gguf", plan)
    pruned = read_gguf(out)
    assert pruned.metadata["llama.feed_forward_length"] == 96
    assert pruned.tensors["blk.0.ffn_gate.weight"].shape == (96, DIM) and pruned.tensors["blk.1.ffn_down.weight"].shape == (DIM, 96)
    gate = tiny.tensors["blk.1.ffn_gate.weight"]
    assert pruned.tensors["blk.1.ffn_gate.weight"].raw.tobytes() == gate.raw[plan.keep[1]].tobytes()  # whole rows: bytes kept
    assert parameter_count(tiny) - parameter_count(pruned) == LAYERS * 3 * DIM * (FFN - 96)
    # the reference: the source, every pruned neuron's ffn_down column zeroed (its h_j then adds nothing)
    tensors = {n: (t.qtype, tensor_bytes(t.raw, t.shape)) for n, t in tiny.tensors.items()}
    for i in range(LAYERS):
        w = source_weight(tiny.tensors[f"blk.{i}.ffn_down.weight"])
        w[:, np.setdiff1d(np.arange(FFN), plan.keep[i])] = 0
        tensors[f"blk.{i}.ffn_down.weight"] = (QT.F16, tensor_bytes(w.astype(np.float16), w.shape))
    zeroed = write_gguf(tiny, tmp_path / "zeroed.gguf", tensors)
    ids = LanguageModel.load(out, compile=False).tokenizer.encode(TEXT)[:40]
    torch.testing.assert_close(logits(out, ids), logits(zeroed, ids), rtol=1e-4, atol=1e-4)


HEAD_DIM = DIM // HEADS
KEPT_HEADS = {0: np.array([0, 2, 5, 7]), 1: np.array([1, 3, 4, 6])}  # two of each KV group's four query heads


def test_pruned_heads_are_cut_out_of_the_computation(tiny, tmp_path):
    plan = PrunePlan({i: np.arange(FFN) for i in range(LAYERS)}, (), KEPT_HEADS)
    out = prune_gguf(tiny, tmp_path / "heads.gguf", plan)
    pruned = read_gguf(out)
    assert pruned.metadata["llama.attention.head_count"] == 4 and pruned.metadata["llama.attention.head_count_kv"] == KV_HEADS
    assert pruned.metadata["llama.attention.key_length"] == HEAD_DIM  # DIM / 4 heads would say 32
    assert pruned.tensors["blk.0.attn_q.weight"].shape == (4 * HEAD_DIM, DIM) and pruned.tensors["blk.1.attn_output.weight"].shape == (DIM, 4 * HEAD_DIM)
    rows = (KEPT_HEADS[1][:, None] * HEAD_DIM + np.arange(HEAD_DIM)).reshape(-1)
    assert pruned.tensors["blk.1.attn_q.weight"].raw.tobytes() == tiny.tensors["blk.1.attn_q.weight"].raw[rows].tobytes()  # whole rows
    assert pruned.tensors["blk.0.attn_k.weight"].raw.tobytes() == tiny.tensors["blk.0.attn_k.weight"].raw.tobytes()  # the K/V heads stay
    assert parameter_count(tiny) - parameter_count(pruned) == LAYERS * 2 * DIM * 4 * HEAD_DIM
    # the reference: the source with every pruned head's attn_output columns zeroed (its output then adds nothing)
    tensors = {n: (t.qtype, tensor_bytes(t.raw, t.shape)) for n, t in tiny.tensors.items()}
    for i in range(LAYERS):
        w = source_weight(tiny.tensors[f"blk.{i}.attn_output.weight"])
        for h in np.setdiff1d(np.arange(HEADS), KEPT_HEADS[i]):
            w[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
        tensors[f"blk.{i}.attn_output.weight"] = (QT.F16, tensor_bytes(w.astype(np.float16), w.shape))
    zeroed = write_gguf(tiny, tmp_path / "zeroed.gguf", tensors)
    ids = LanguageModel.load(out, compile=False).tokenizer.encode(TEXT)[:40]
    torch.testing.assert_close(logits(out, ids), logits(zeroed, ids), rtol=1e-4, atol=1e-4)


def test_head_importance_is_each_heads_mean_squared_output(tiny):
    """tr(W_h H W_h^T) from the calibration Hessian against the heads' outputs W_h z_h measured in the forward."""
    from edgewise.compress.calibrate import second_moments

    lm = LanguageModel.load(tiny.path, precision="fp32", compile=False)
    ids = lm.tokenizer.encode(TEXT * 30)[:1024]
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(LAYERS)}
    hooks = [b.attn.wo.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().reshape(-1, HEADS * HEAD_DIM).double())) for i, b in enumerate(lm.model.blocks)]
    moments = second_moments(lm, ids, ctx=256, full=True)
    for h in hooks:
        h.remove()
    scores = head_importance(tiny, moments)
    diag = head_importance(tiny, {n: torch.diagonal(m) for n, m in moments.items()})
    for i in range(LAYERS):
        z = torch.cat(seen[i])
        w = torch.from_numpy(source_weight(tiny.tensors[f"blk.{i}.attn_output.weight"])).double()
        want = [float(((z[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] @ w[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].T) ** 2).sum(1).mean()) for h in range(HEADS)]
        np.testing.assert_allclose(scores[i], want, rtol=1e-4)
        assert diag[i].shape == (HEADS,) and (diag[i] > 0).all()  # the Wanda-style diagonal: an approximation of it
    plan = plan_pruning({i: np.ones(FFN) for i in range(LAYERS)}, FFN, (), {0: np.array([5, 1, 3, 2, 0, 9, 8, 7.0])}, KV_HEADS, 2)
    assert plan.heads[0].tolist() == [0, 2, 5, 6]  # each group's two best


def test_a_dropped_layer_is_skipped(tiny, tmp_path):
    plan = PrunePlan({i: np.arange(FFN) for i in range(LAYERS)}, (0,))
    out = prune_gguf(tiny, tmp_path / "dropped.gguf", plan)
    pruned = read_gguf(out)
    assert pruned.metadata["llama.block_count"] == LAYERS - 1
    assert pruned.tensors["blk.0.attn_q.weight"].raw.tobytes() == tiny.tensors["blk.1.attn_q.weight"].raw.tobytes()  # renumbered
    assert not any(n.startswith(f"blk.{LAYERS - 1}.") for n in pruned.tensors)
    ref = LanguageModel.load(tiny.path, precision="fp32", compile=False)
    ids = ref.tokenizer.encode(TEXT)[:40]
    del ref.model.blocks[0]  # the source with its first block taken out of the forward
    want = ref.prefill(ids, ref.new_cache(len(ids)), last_only=False)
    torch.testing.assert_close(logits(out, ids), want, rtol=1e-4, atol=1e-4)
    # and the probe's measure of dropping it is that model's KL from the source
    probe = KLProbe(tiny, torch.tensor([ids]))
    src = torch.log_softmax(logits(tiny.path, ids).double(), -1)
    kl = float((src.exp() * (src - torch.log_softmax(want.double(), -1))).sum(-1).mean())
    assert probe.kl_skipping(0) == pytest.approx(kl, rel=1e-3)


def test_bad_plans_are_refused(tiny, tmp_path):
    with pytest.raises(EdgewiseError, match="multiple of 32"):
        prune_gguf(tiny, tmp_path / "o.gguf", PrunePlan({i: np.arange(100) for i in range(LAYERS)}, ()))
    with pytest.raises(EdgewiseError, match="the same number of FFN neurons"):
        prune_gguf(tiny, tmp_path / "o.gguf", PrunePlan({0: np.arange(64), 1: np.arange(96)}, ()))
    with pytest.raises(EdgewiseError, match="drop layers"):
        prune_gguf(tiny, tmp_path / "o.gguf", PrunePlan({i: np.arange(FFN) for i in range(LAYERS)}, tuple(range(LAYERS))))
    for bad in ({0: np.array([0, 1, 2, 4]), 1: KEPT_HEADS[1]}, {0: np.array([0, 2]), 1: KEPT_HEADS[1]}, {0: np.array([0, 0, 4, 5]), 1: KEPT_HEADS[1]}, {0: KEPT_HEADS[0]}):
        with pytest.raises(EdgewiseError, match="the same number of query heads from each of its 2 KV groups"):
            prune_gguf(tiny, tmp_path / "o.gguf", PrunePlan({i: np.arange(FFN) for i in range(LAYERS)}, (), bad))
    assert not (tmp_path / "o.gguf").exists()


def test_llama_cpp_runs_a_head_pruned_model(tiny, tmp_path):
    """Interop, when the peer is installed: head_count and key_length as llama.cpp reads them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = prune_gguf(tiny, tmp_path / "heads.gguf", PrunePlan({i: np.arange(0, FFN, 2) for i in range(LAYERS)}, (), KEPT_HEADS))
    ids = LanguageModel.load(out, compile=False).tokenizer.encode(TEXT)[:24]
    ours = logits(out, ids).numpy()
    peer = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    peer.eval(ids)
    theirs = np.array(peer.scores[: len(ids)])
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(ours) < 0.05  # llama.cpp's 8-bit activations: agreement


def test_the_real_model_pruned_runs_and_counts_right(model_path, gguf, tmp_path, monkeypatch):
    """SmolLM2-135M (Q4_1): a third of every FFN, one query head of each group of three and two layers pruned by
    calibrated importance; ffn_down and attn_output requantized by GPTQ on the kept columns' Hessian."""
    from edgewise.compress.calibrate import second_moments

    monkeypatch.setattr("edgewise.compress.calibrate.MIN_CALIB_TOKENS", 256)
    lm = LanguageModel.load(model_path, compile=False)
    ids = lm.tokenizer.encode(load_text("shakespeare")[:4000])[:256]
    moments = second_moments(lm, ids, ctx=256, full=True)
    scores = ffn_importance(gguf, moments)
    assert len(scores) == 30 and all(s.shape == (1536,) and (s >= 0).all() for s in scores.values())
    heads = head_importance(gguf, moments)
    assert len(heads) == 30 and all(s.shape == (9,) and (s > 0).all() for s in heads.values())
    plan = plan_pruning(scores, 1024, (12, 20), heads, kv_heads=3, heads_per_group=2)
    out = prune_gguf(gguf, tmp_path / "smol-pruned.gguf", plan, moments)
    pruned = read_gguf(out)
    assert parameter_count(gguf) - parameter_count(pruned) == 28 * (3 * 576 * 512 + 2 * 576 * 3 * 64) + 2 * sum(
        int(np.prod(t.shape)) for n, t in gguf.tensors.items() if n.startswith("blk.0.")
    )
    assert pruned.tensors["blk.0.ffn_down.weight"].qtype == QT.Q4_1 and pruned.tensors["blk.0.attn_output.weight"].qtype == QT.Q4_1
    small = LanguageModel.load(out, compile=False)
    assert small.cfg.n_layers == 28 and small.cfg.ffn_dim == 1024 and small.cfg.n_heads == 6 and small.cfg.head_dim == 64
    text = "It is a truth universally acknowledged"
    out_ids = list(small.generate(small.tokenizer.encode(text), 8, stop_at_eot=False))
    assert len(out_ids) == 8
    assert torch.isfinite(small.prefill(ids[:64], small.new_cache(64))).all()


# -- distillation -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tiny, tmp_path_factory):
    """The tiny model with half of every FFN pruned (by index: any half will do for training)."""
    path = tmp_path_factory.mktemp("student") / "student.gguf"
    return read_gguf(prune_gguf(tiny, path, PrunePlan({i: np.arange(0, FFN, 2) for i in range(LAYERS)}, ())))


def test_the_trainable_student_computes_what_the_runtime_does(student):
    from edgewise.compress.distill import _log_probs, trainable_student

    model, params = trainable_student(student)
    assert set(params) == {f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert params["blk.0.attn_q.weight"].shape == student.tensors["blk.0.attn_q.weight"].shape  # the GGUF's own layout
    ids = LanguageModel.load(student.path, compile=False).tokenizer.encode(TEXT)[:40]
    torch.testing.assert_close(_log_probs(model, torch.tensor(ids)), torch.log_softmax(logits(student.path, ids), -1), rtol=1e-4, atol=1e-4)


def test_the_teachers_answers_are_the_fp32_teachers(tiny, student):
    """`TeacherAnswers` (the teacher a block at a time, its head shared with the student's where they are the same
    tensor) against the whole fp32 `Llama` teacher run window by window."""
    from edgewise.compress.distill import TeacherAnswers, _log_probs, trainable_student
    from edgewise.lm.model import Llama

    ids = LanguageModel.load(tiny.path, compile=False).tokenizer.encode(TEXT * 4)[:96]
    windows = torch.tensor(ids).reshape(3, 32)
    whole = Llama.from_gguf(tiny, "fp32")
    model, _ = trainable_student(student)
    shared = TeacherAnswers(tiny, windows, student, model.output)
    assert shared.head is model.output  # pruning left the head and the final norm as they were
    own = TeacherAnswers(tiny, windows)
    assert own.head is not model.output
    for w in range(3):
        want = _log_probs(whole, windows[w])
        torch.testing.assert_close(shared.log_probs(w), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(own.log_probs(w), want, rtol=1e-5, atol=1e-5)


def test_distillation_lowers_the_kl_and_resumes_where_it_stopped(tiny, student, tmp_path):
    from edgewise.compress.distill import distill

    lm = LanguageModel.load(tiny.path, compile=False)
    ids = lm.tokenizer.encode(TEXT * 12)[:256]
    full = distill(tiny, student, tmp_path / "full.gguf", ids, steps=12, ctx=64, lr=3e-3)
    assert full.last_kl < 0.7 * full.first_kl, (full.first_kl, full.last_kl)
    out = read_gguf(full.out)
    assert out.tensors["blk.0.ffn_down.weight"].qtype == QT.F32 and out.tensors["blk.0.attn_norm.weight"].raw.tobytes() == student.tensors["blk.0.attn_norm.weight"].raw.tobytes()

    ckpt = tmp_path / "run.distill"

    def stop_at_8(step, steps, kl):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(tiny, student, tmp_path / "cut.gguf", ids, steps=12, ctx=64, lr=3e-3, checkpoint=ckpt, every=5, progress=stop_at_8)
    assert ckpt.exists() and not (tmp_path / "cut.gguf").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    resumed = distill(tiny, student, tmp_path / "cut.gguf", ids, steps=12, ctx=64, lr=3e-3, checkpoint=ckpt, every=5)
    assert resumed.resumed_at == 5
    a, b = read_gguf(full.out), read_gguf(resumed.out)
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        np.testing.assert_allclose(b.tensors[name].raw, a.tensors[name].raw, rtol=1e-4, atol=1e-6)  # as if never stopped
    with pytest.raises(EdgewiseError, match="another distillation"):
        distill(tiny, student, tmp_path / "x.gguf", ids, steps=20, ctx=64, checkpoint=ckpt)
    ckpt.write_bytes(b"\x00" * 100)
    with pytest.raises(EdgewiseError, match="unreadable distillation checkpoint"):
        distill(tiny, student, tmp_path / "x.gguf", ids, steps=12, ctx=64, lr=3e-3, checkpoint=ckpt)


def test_cli_prunes_distills_and_quantizes(tiny, tmp_path, capsys):
    from edgewise.cli import main

    out = tmp_path / "small.gguf"
    args = ["compress", str(tiny.path), str(out), "--prune-ffn", "0.5", "--prune-heads", "0.5", "--drop-layers", "1", "--distill-steps", "3", "--type", "Q8_0", "--calib-tokens", "1024"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith(f"out = {out} size_mb = ")
    assert "dropping layers [" in captured.err and "pruned: FFN 256 -> 128 neurons a layer, 8 -> 4 query heads a layer, 2 -> 1 layers" in captured.err and "distilled 3 steps" in captured.err
    got = read_gguf(out)
    assert got.metadata["llama.block_count"] == 1 and got.metadata["llama.feed_forward_length"] == 128 and got.metadata["llama.attention.head_count"] == 4
    assert got.tensors["blk.0.ffn_down.weight"].qtype == QT.Q8_0
    assert [p.name for p in tmp_path.iterdir()] == ["small.gguf"]  # no work files, no checkpoint left
    lm = LanguageModel.load(out, compile=False)
    assert torch.isfinite(lm.prefill([1, 2, 3], lm.new_cache(8))).all()
    assert main(["compress", str(tiny.path), str(tmp_path / "o.gguf"), "--distill-steps", "3"]) == 1
    assert "give --type, --size or --bpw" in capsys.readouterr().err
    assert main(["compress", str(tiny.path), str(tmp_path / "o.gguf"), "--prune-heads", "0.1", "--type", "Q8_0"]) == 1  # 4 heads a group: 0.1 rounds to none
    assert "removes no head of tiny.gguf" in capsys.readouterr().err and not (tmp_path / "o.gguf").exists()
