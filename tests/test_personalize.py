"""Personalization (`edgewise.personalize`): backward through the frozen quantized base against torch autograd, the
chunked cross-entropy, the plan's budget, the adapter file, merging, kill-and-resume, and the keyboard's metrics."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgewise.errors import EdgewiseError

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. "
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well "
    "fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters. "
) * 6


@pytest.fixture(scope="module")
def smol():
    from edgewise.gguf_io import read_gguf
    from edgewise.models import resolve_model

    path = resolve_model(None)
    return path, read_gguf(path)


def _model(gguf, precision="quant"):
    from edgewise.lm.model import Llama

    return Llama.from_gguf(gguf, precision)


# -- the frozen base's backward ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.3.attn_q.weight", "token_embd.weight"])
def test_input_grad_matches_autograd(smol, name):
    """dL/dx through a frozen quantized layer equals autograd through its exact fp32 dequantization."""
    from edgewise.lm.weights import dequantize, load_embedding, load_linear
    from edgewise.personalize.frozen import Frozen, dequantized_rows

    t = smol[1].tensor(name)
    module = load_embedding(t, "quant", tied=True) if name.startswith("token") else load_linear(t, "quant", act_bits=16)
    w = dequantize(t)
    assert torch.equal(dequantized_rows(module, 5, 300), w[5:300])  # exact: the same blocks, decoded
    x = torch.randn(7, w.shape[1], requires_grad=True)
    g = torch.randn(7, w.shape[0])
    (Frozen(module)(x) * g).sum().backward()
    ref = g @ w
    # the same products, summed in another order (in row slices): float rounding grows with the rows summed (49k)
    torch.testing.assert_close(x.grad, ref, rtol=1e-4, atol=1e-8 * w.shape[0] ** 1.5)


def test_chunked_nll_matches_cross_entropy(smol):
    from edgewise.lm.weights import dequantize, load_embedding
    from edgewise.personalize.frozen import chunked_nll

    t = smol[1].tensor("token_embd.weight")
    head = load_embedding(t, "quant", tied=True)
    w = dequantize(t)
    h = torch.randn(9, w.shape[1]) * 0.5
    targets = torch.randint(0, w.shape[0], (9,))
    mine = h.clone().requires_grad_(True)
    loss = chunked_nll(mine, targets, head)
    loss.backward()
    ref_h = h.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_h @ w.T, targets, reduction="sum")
    ref.backward()
    # the forward's logits come from the native kernel, which rounds h to int16 per block: relative 1e-4 at most
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(mine.grad, ref_h.grad, rtol=1e-3, atol=1e-4)


def _terms(model):
    """One term of each kind (no biases in SmolLM2), on the top blocks, with non-zero values."""
    from edgewise.personalize.adapter import Term, attach, term_params

    terms = [Term("norm", "blk.28.ffn_norm"), Term("lora", "blk.29.ffn_down", 4), Term("rows", "blk.29.attn_q", 16), Term("norm", "output_norm")]
    terms = [Term(t.kind, t.target, t.size, term_params(t, model)) for t in terms]
    rows = {"blk.29.attn_q.rows16": list(range(0, 64, 4))}
    params = attach(model, terms, rows=rows, seed=3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return terms, rows, params


def test_trained_gradients_match_autograd(smol):
    """The training step (frozen base with its own backward, blocks below the cut without autograd, recomputation,
    chunked cross-entropy) gives the trained parameters the gradients plain autograd gives, on the fp32 model: the
    same arithmetic, so equal to float rounding. On the quantized model, the kernels' activation rounding moves them
    by a few percent at most (stated tolerance: cosine > 0.995)."""
    from edgewise.lm.model import causal_mask
    from edgewise.personalize.frozen import freeze
    from edgewise.personalize.train import window_loss

    window = list(range(1000, 1033))
    grads = {}
    for label, precision, ours in (("ref", "fp32", False), ("fp32", "fp32", True), ("quant", "quant", True)):
        model = _model(smol[1], precision)
        if ours:
            freeze(model)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
        _, _, params = _terms(model)
        if ours:
            loss = window_loss(model, window, cut=28, recompute=True)
        else:
            T = len(window) - 1
            cache = model.new_cache(T)
            logits = model(torch.tensor(window[:-1]), torch.arange(T), causal_mask(0, T), cache.keys, cache.values)
            loss = F.cross_entropy(logits, torch.tensor(window[1:]))
        loss.backward()
        grads[label] = {n: p.grad.clone() for n, p in params.items()}
    for n, ref in grads["ref"].items():
        assert ref.abs().max() > 0, n
        torch.testing.assert_close(grads["fp32"][n], ref, rtol=1e-3, atol=1e-5)  # float rounding: other summation orders
        cos = F.cosine_similarity(grads["quant"][n].flatten(), ref.flatten(), dim=0)
        assert cos > 0.995, (n, float(cos))


def test_own_adam_matches_torch():
    from edgewise.personalize.optim import Adam

    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    mine, ref = Adam({"a": a}, lr=1e-2, factored=False), torch.optim.AdamW([b], lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        g = torch.randn(5, 3, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        mine.begin_step()
        mine.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_factored_second_moment_against_numpy_and_exact_on_rank_one():
    """The factored rule (optim.py) against a numpy transcription of it on random gradients; and on gradients whose
    squares are rank 1 (s_t a b^T), where the factored estimate is exact, against torch.optim.AdamW."""
    from edgewise.personalize.optim import TINY, Adam

    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(6, 4, generator=gen)
    grads = [torch.randn(6, 4, generator=gen) for _ in range(6)]
    a = torch.nn.Parameter(p0.clone())
    mine = Adam({"a": a}, lr=1e-2)
    assert set(mine.state_tensors()) == {"exp_avg/a", "exp_avg_sq_row/a", "exp_avg_sq_col/a"}
    p, m, r, c = p0.double().numpy().copy(), np.zeros((6, 4)), np.zeros(6), np.zeros(4)
    for t, g in enumerate(grads, 1):
        a.grad = g.clone()
        mine.begin_step()
        mine.step()
        gd = g.double().numpy()
        m = 0.9 * m + 0.1 * gd
        r = 0.999 * r + 0.001 * (gd**2 + TINY).mean(1)
        c = 0.999 * c + 0.001 * (gd**2 + TINY).mean(0)
        v = np.outer(r, c) / r.mean()
        p -= 1e-2 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(a.detach().double().numpy(), p, rtol=1e-5, atol=1e-6)

    u, w = torch.randn(6, generator=gen), torch.randn(4, generator=gen)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    mine, ref = Adam({"a": a}, lr=1e-2), torch.optim.AdamW([b], lr=1e-2, weight_decay=0.0)
    for t in range(5):
        g = (1.0 + t) * (-1) ** t * torch.outer(u, w)
        a.grad, b.grad = g.clone(), g.clone()
        mine.begin_step()
        mine.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_factored_adam_resumes_from_a_whole_second_moment():
    """An adapter saved before the second moment was factored resumes: its whole v gives the row and column means.
    A moment missing or of the wrong shape (a damaged adapter) is refused, naming the tensor."""
    from edgewise.personalize.optim import Adam

    v = torch.rand(5, 3)
    opt = Adam({"a": torch.nn.Parameter(torch.zeros(5, 3)), "n": torch.nn.Parameter(torch.zeros(3))}, lr=1e-3)
    opt.load({"exp_avg/a": torch.ones(5, 3), "exp_avg_sq/a": v, "exp_avg/n": torch.ones(3), "exp_avg_sq/n": v[0]}, step=7)
    r, c = opt.factors["a"]
    assert torch.equal(r, v.mean(1)) and torch.equal(c, v.mean(0)) and torch.equal(opt.exp_avg_sq["n"], v[0]) and opt.step_count == 7
    with pytest.raises(EdgewiseError, match=r"adapter tensor exp_avg_sq_col/a: expected shape \(3,\), found \(4,\).*damaged"):
        opt.load({"exp_avg/a": torch.ones(5, 3), "exp_avg_sq_row/a": torch.ones(5), "exp_avg_sq_col/a": torch.ones(4)}, step=7)
    with pytest.raises(EdgewiseError, match="adapter tensor exp_avg_sq/n: expected shape"):
        opt.load({"exp_avg/n": torch.ones(3)}, step=7)


@pytest.mark.parametrize("recompute", [True, False])
def test_adam_inside_the_backward_equals_adam_after_it(monkeypatch, tmp_path, recompute):
    """tune's default (one window a step) applies each gradient inside the backward and drops it: the adapter after 3
    steps is bit-identical to stepping after the backward, on a plan with norms, LoRA and rows, blocks recomputed or
    kept (a tensor changed before a node that saved it ran would make autograd refuse, or change the numbers)."""
    from edgewise.personalize import optim, train
    from edgewise.personalize.adapter import Term, load_adapter
    from edgewise.personalize.plan import Plan, with_bytes

    def hand_made(net, frozen, windows, seq_len):
        terms = [Term("norm", "output_norm")] + [Term("norm", f"blk.{i}.{n}") for i in (28, 29) for n in ("attn_norm", "ffn_norm")]
        terms += [Term("lora", "blk.28.attn_q", 4), Term("lora", "blk.29.ffn_down", 2), Term("rows", "blk.29.ffn_up", 8), Term("rows", "blk.28.attn_v", 4)]
        terms = [with_bytes(t, net, 1) for t in terms]
        return Plan(terms, seq_len, 28, recompute, 1 << 30, 0, 0, 0.0, {t.name: list(range(1, 2 * t.size, 2)) for t in terms if t.kind == "rows"})

    held = []  # in the fused run: whether any gradient was still held when the step came

    class Fused(optim.Adam):
        def step(self):
            held.append(any(p.grad is not None for p in self.params.values()))
            super().step()

    class After(optim.Adam):
        def __init__(self, params, lr, in_backward=False):
            super().__init__(params, lr, in_backward=False)

    monkeypatch.setattr(train, "Adam", Fused)
    fused = _tune(tmp_path, "fused.adapter", make_plan=hand_made)
    monkeypatch.setattr(train, "Adam", After)
    after = _tune(tmp_path, "after.adapter", make_plan=hand_made)
    assert held == [False, False, False]
    a, b = load_adapter(fused.out)[1], load_adapter(after.out)[1]
    # value, first moment and whole second moment of 5 norms; value, first moment and the second's row and column
    # means of 6 matrices (2 LoRA's A and B, 2 row slices)
    assert a.keys() == b.keys() and len(a) == 5 * 3 + 6 * 4
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("blk.28.attn_q.lora4.B", "blk.29.ffn_down.lora2.B"):  # zero at the start: trained, they moved
        assert a[f"param/{name}"].abs().max() > 0, name


# -- the plan -------------------------------------------------------------------------------------------
def test_an_adapter_attaches_over_concatenated_layers():
    """Qwen's Q|K|V are a ConcatLinear (parts of different types): an adapter applied at load (no Frozen wrapper)
    reads its sizes from it; they were missing, and `generate|eval --adapter` failed on Qwen."""
    from edgewise.lm.weights import ConcatLinear, DenseLinear
    from edgewise.personalize.adapter import Adapted
    from edgewise.personalize.frozen import dequantized_rows

    gen = torch.Generator().manual_seed(0)
    parts = [DenseLinear(torch.randn(n, 16, generator=gen)) for n in (8, 4, 4)]
    cat = ConcatLinear(parts)
    assert (cat.out_features, cat.in_features) == (16, 16)
    adapted = Adapted(cat)
    assert (adapted.out_features, adapted.in_features) == (16, 16)
    x = torch.randn(3, 16, generator=gen)
    torch.testing.assert_close(adapted(x), x @ dequantized_rows(cat, 0, 16).T)


def test_energies_of_a_weight_gradient_never_formed():
    """Row energies and top squared singular values of g = a^T b, computed without g, against g itself (LAPACK's
    singular values as the reference; orthogonal iteration converges on a decaying spectrum)."""
    from edgewise.personalize.plan import row_energies, top_energies

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(24, 50, generator=gen) * torch.logspace(0, -2, 50)  # a [T, out], b [T, in]: a decaying spectrum
    b = torch.randn(24, 40, generator=gen) * torch.logspace(0, -1, 40)
    g = a.T @ b
    torch.testing.assert_close(row_energies(a, b), g.pow(2).sum(1), rtol=1e-5, atol=1e-6)
    ref = torch.linalg.svdvals(g.double()).pow(2)[:8].float()
    got = top_energies(a, b, 8, iters=30)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)
    assert (top_energies(a, b, 8).cumsum(0) <= ref.cumsum(0) * (1 + 1e-5)).all()  # partial sums are lower bounds (Ky Fan)


def test_plan_respects_budget_and_states_the_smallest(smol):
    from edgewise.lm.tokenizer import TextTokenizer
    from edgewise.personalize.frozen import freeze
    from edgewise.personalize.plan import analyse, min_budget, plan_fixed_bytes, search, state_bytes
    from edgewise.personalize.train import window_loss

    model = _model(smol[1])
    frozen = freeze(model)
    ids = TextTokenizer.from_gguf(smol[1]).encode(TEXT)
    c = analyse(model, frozen, [ids[:33], ids[40:73]], window_loss)
    assert all(v > 0 for v in c.norms.values()) and len(c.spectra) == 30 * 7
    previous = 0.0
    for mb in (16, 32, 64, 256):
        plan = search(model, c, mb << 20, 64)
        assert plan.total_bytes <= mb << 20
        assert plan.state_bytes == state_bytes(plan.terms, 1)
        assert plan.fixed_bytes == plan_fixed_bytes(model.cfg, 64, plan.cut, plan.recompute, plan.terms)
        assert all(t.layer is None or t.layer >= plan.cut for t in plan.terms)
        assert plan.gain >= previous  # more memory never buys less
        previous = plan.gain
    with pytest.raises(EdgewiseError, match="smallest feasible budget is"):
        search(model, c, min_budget(model.cfg, 64) - 1, 64)


# -- the adapter file, tuning, resuming, merging ---------------------------------------------------------
def _tune(tmp_path, out="me.adapter", **kw):
    from edgewise.personalize.train import tune

    args = {"budget": 16 << 20, "steps": 3, "seq_len": 32, "lr": 5e-3, "checkpoint_every": 1} | kw
    return tune(TEXT, tmp_path / out, **args)


def test_tune_adapter_round_trip_and_refusals(tmp_path, smol):
    from edgewise.lm.runtime import LanguageModel
    from edgewise.personalize.adapter import load_adapter

    result = _tune(tmp_path)
    assert result.plan.total_bytes <= 16 << 20 and result.plan.params > 0 and result.steps == 3
    header, tensors = load_adapter(result.out)
    assert header.base["sha256"] and header.state["complete"] and header.state["step"] == 3
    ids = list(range(2000, 2020))
    base = LanguageModel.load(None, compile=False)
    tuned = LanguageModel.load(None, compile=False, adapter=result.out)
    a = tuned.prefill(ids, tuned.new_cache(20), last_only=False)
    b = base.prefill(ids, base.new_cache(20), last_only=False)
    assert (a - b).abs().max() > 1e-3  # it learned something
    again = LanguageModel.load(None, compile=False, adapter=result.out)
    assert torch.equal(again.prefill(ids, again.new_cache(20), last_only=False), a)  # the file round-trips
    # a corrupt file names itself; a foreign base is refused naming both models
    bad = tmp_path / "bad.adapter"
    bad.write_bytes(result.out.read_bytes()[:200])
    with pytest.raises(EdgewiseError, match="bad.adapter"):
        LanguageModel.load(None, compile=False, adapter=bad)
    from edgewise.personalize.adapter import AdapterHeader, check_base

    other = AdapterHeader({"name": "other.gguf", "sha256": "0" * 64, "bytes": 1}, header.plan, header.training, header.state)
    with pytest.raises(EdgewiseError, match="other.gguf.*SmolLM2|other.gguf.*gguf"):
        check_base(other, result.out, smol[0], header.base["sha256"])
    # another text cannot resume this adapter
    from edgewise.personalize.train import tune

    with pytest.raises(EdgewiseError, match="other text"):
        tune(TEXT + " More.", result.out, 16 << 20, steps=4, seq_len=32)


def test_bad_text_and_budget(tmp_path):
    from edgewise.data.text import load_user_text
    from edgewise.personalize.train import tune

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    with pytest.raises(EdgewiseError, match="empty"):
        load_user_text(tmp_path / "empty.txt")
    with pytest.raises(EdgewiseError, match="binary"):
        load_user_text(tmp_path / "bin.txt")
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(EdgewiseError, match="no .txt or .md files"):
        load_user_text(tmp_path / "nothing-here")
    with pytest.raises(EdgewiseError, match="too short"):
        tune("Hello there.", tmp_path / "a.adapter", 64 << 20)
    with pytest.raises(EdgewiseError, match="smallest feasible budget is"):
        tune(TEXT, tmp_path / "a.adapter", 1 << 20)


def test_resume_equals_uninterrupted(tmp_path):
    """Stopped after 2 of 4 steps and resumed, training ends with the very tensors of an uninterrupted run."""
    from edgewise.personalize.adapter import load_adapter

    whole = _tune(tmp_path, "whole.adapter", steps=4)
    _tune(tmp_path, "part.adapter", steps=4, minutes=1e-9)  # stops after its first step, as a kill after a checkpoint
    assert load_adapter(tmp_path / "part.adapter")[0].state["step"] == 1
    resumed = _tune(tmp_path, "part.adapter", steps=4)
    assert resumed.resumed_at == 1 and resumed.steps == 4
    a, b = load_adapter(whole.out)[1], load_adapter(resumed.out)[1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_at_random_moments_never_leaves_a_corrupt_adapter(tmp_path):
    """`kill -9` at random moments of `edgewise tune`, many times: every time the adapter is absent (killed before its
    first checkpoint) or complete and loadable; a last run resumes it to the end."""
    from edgewise.personalize.adapter import load_adapter

    text = tmp_path / "me.txt"
    text.write_text(TEXT)
    out = tmp_path / "me.adapter"
    cmd = [sys.executable, "-m", "edgewise", "tune", "--text", str(text), "--out", str(out), "--budget", "16MB", "--steps", "60", "--seq-len", "32",
           "--checkpoint-every", "1"]
    env = dict(os.environ)
    rng = random.Random(0)
    steps_seen = []
    for _ in range(5):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(7.0, 16.0))  # startup is about 7 s; then a checkpoint a step
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            header, tensors = load_adapter(out)
            assert tensors and header.state["step"] >= 1
            steps_seen.append(header.state["step"])
    assert steps_seen, "no run reached its first checkpoint"
    assert steps_seen == sorted(steps_seen)  # each rerun resumed, none restarted
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"adapter = {out} peak_mb = ")
    assert load_adapter(out)[0].state["complete"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_merge_equals_adapter_within_requantization(tmp_path, smol):
    """The merged GGUF runs as the adapter does, up to requantizing the changed matrices: its logits are much nearer
    the adapter's than the base's are (stated: half the distance at most), and exactly so for norm-only adapters."""
    from edgewise.lm.runtime import LanguageModel
    from edgewise.personalize.merge import merge

    result = _tune(tmp_path, steps=4, lr=2e-2)
    merged = merge(result.out, tmp_path / "merged.gguf")
    assert merged.exact + merged.requantized == len(result.plan.terms)
    ids = list(range(3000, 3024))

    def logits(**kw):
        lm = LanguageModel.load(compile=False, **kw)
        return lm.prefill(ids, lm.new_cache(24), last_only=False)

    tuned, merged_logits, base = logits(adapter=result.out), logits(path=tmp_path / "merged.gguf"), logits()
    assert (merged_logits - tuned).abs().mean() < 0.5 * (base - tuned).abs().mean()


# -- the keyboard ----------------------------------------------------------------------------------------
def test_keystroke_savings_counts(monkeypatch):
    """The replay's arithmetic on a stubbed suggestion list: 'the' is in the bar before its first letter (1 tap of 4
    characters), 'cat' after typing 'c' (2 keystrokes), 'sat' never (4)."""
    from edgewise.personalize import keyboard

    lists = {"Hello ": ["the", "a", "my"], "Hello the ": ["dog", "cow", "car", "cat"], "Hello the cat ": ["is", "was", "ran"]}
    monkeypatch.setattr(keyboard, "suggest", lambda lm, text, k, beams: [(w, 0.1) for w in lists[text]])
    r = keyboard.keystroke_savings(None, "Hello the cat sat")
    # Hello: no text before it, typed in full (6); the: 1; cat: 'c' + tap = 2; sat: 4
    assert (r.words, r.top3_hits, r.characters, r.keystrokes) == (4, 1, 6 + 4 + 4 + 4, 6 + 1 + 2 + 4)
    assert r.top3_accuracy == 0.25 and r.savings == pytest.approx((18 - 13) / 18)


def test_suggest_real_model():
    from edgewise.lm.runtime import LanguageModel
    from edgewise.personalize.keyboard import suggest

    lm = LanguageModel.load(compile=False)
    words = [w for w, _ in suggest(lm, "The capital of France is ")]
    assert "Paris" in words, words
    completions = [w for w, _ in suggest(lm, "The capital of France is Par")]
    assert completions and all(w.startswith("Par") for w in completions) and "Paris" in completions


def test_cli_tune_suggest_eval(tmp_path):
    from edgewise.cli import main

    text = tmp_path / "notes"
    text.mkdir()
    (text / "a.txt").write_text(TEXT)
    (text / "b.md").write_text(TEXT)
    out = tmp_path / "me.adapter"
    assert main(["tune", "--text", str(text), "--out", str(out), "--budget", "16MB", "--steps", "2", "--seq-len", "32"]) == 0
    assert main(["suggest", "--adapter", str(out), "It is a truth universally"]) == 0
    assert main(["eval", "ppl", "--adapter", str(out), "--text", str(text / "a.txt"), "--ctx", "64", "--max-tokens", "128"]) == 0
    assert main(["tune", "--text", str(text), "--out", str(out), "--merge", str(out), str(tmp_path / "m.gguf")]) == 1
