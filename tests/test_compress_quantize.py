"""`edgewise compress`: block packers against gguf's own dequantization (the reading side's definition of the
bytes), the scale search against plain min-max rounding on real layers, importance weighting against none,
and whole files: plan, metadata, edgewise loading them, no half-written output, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from edgewise.cli import main
from edgewise.compress import pipeline
from edgewise.compress.blocks import FORMATS, pack
from edgewise.compress.calibrate import importance, second_moments
from edgewise.compress.gptq import calibration_loss, gptq_quantize, inverse_cholesky
from edgewise.compress.pipeline import compress_gguf, plan_types
from edgewise.compress.quantize import quantize_matrix
from edgewise.data.text import load_text
from edgewise.errors import EdgewiseError
from edgewise.gguf_io import read_gguf
from edgewise.lm.runtime import LanguageModel
from tests.test_other_llama_gguf import write_tiny

ALL = [pytest.param(q, id=q.name) for q in FORMATS]


def random_fields(fmt, nb: int, rng):
    """Random codes in [lo, hi] and scales (integers for K-quants) -> (pack arguments, the values they mean)."""
    codes = rng.integers(fmt.lo, fmt.hi + 1, size=(nb, fmt.block))
    per = fmt.block // fmt.sub
    if fmt.super_scaled:
        sc = rng.integers(fmt.scale_lo, fmt.scale_hi + 1, size=(nb, per))
        mc = rng.integers(0, fmt.scale_hi + 1, size=(nb, per)) if fmt.affine else None
        d = rng.uniform(0.001, 0.01, nb).astype(np.float16).astype(np.float64)
        dmin = rng.uniform(0.001, 0.01, nb).astype(np.float16).astype(np.float64) if fmt.affine else None
        scale = np.repeat(d[:, None] * sc, fmt.sub, 1)
        minimum = np.repeat(dmin[:, None] * mc, fmt.sub, 1) if fmt.affine else 0.0
        return (codes, sc, mc, d, dmin), scale * codes - minimum
    s = rng.uniform(0.001, 0.01, (nb, 1)).astype(np.float16).astype(np.float64)
    m = rng.uniform(-0.05, 0.05, (nb, 1)).astype(np.float16).astype(np.float64) if fmt.affine else None
    return (codes, s, m, None, None), s * codes - (m if fmt.affine else 0.0)


@pytest.mark.parametrize("qtype", ALL)
def test_packed_bytes_mean_what_gguf_reads(qtype):
    """Every packer, on random fields: gguf.quants.dequantize of the bytes equals scale * q - min, exactly."""
    fmt = FORMATS[qtype]
    fields, values = random_fields(fmt, 24, np.random.default_rng(int(qtype)))
    raw = pack(fmt, *fields)
    assert raw.shape == (24, fmt.type_bytes) and raw.dtype == np.uint8
    np.testing.assert_allclose(quants.dequantize(raw, qtype).astype(np.float64), values, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def real_layers(gguf):
    """Two real matrices of the embedded model, fp32: ffn_down (1536 columns: K-quants apply) and attn_q (576)."""
    out = {}
    for name in ("blk.3.ffn_down.weight", "blk.3.attn_q.weight"):
        t = gguf.tensors[name]
        out[name] = quants.dequantize(t.raw, t.qtype).reshape(t.shape)[:128]
    return out


def weighted_error(w, raw, qtype, imp):
    deq = quants.dequantize(raw, qtype).astype(np.float64)
    return float(((deq - w) ** 2 * imp).sum())


@pytest.fixture(scope="module")
def real_hessians(model_path):
    """Each layer input's E[x x^T] on 1024 tokens of Shakespeare, through the runtime's forward."""
    lm = LanguageModel.load(model_path, compile=False)
    ids = lm.tokenizer.encode(load_text("shakespeare")[:12000])[:1024]
    return second_moments(lm, ids, ctx=512, full=True)


@pytest.fixture(scope="module")
def real_importance(real_hessians):
    return {name: torch.diagonal(h).double().numpy() for name, h in real_hessians.items()}


def test_importance_is_the_hessians_diagonal(model_path, real_hessians, monkeypatch):
    assert real_hessians["blk.0.attn_q.weight"].shape == (576, 576) and real_hessians["blk.0.ffn_down.weight"].shape == (1536, 1536)
    assert real_hessians["blk.0.attn_q.weight"] is real_hessians["blk.0.attn_v.weight"]  # one input, one statistic
    monkeypatch.setattr("edgewise.compress.calibrate.MIN_CALIB_TOKENS", 64)  # short windows keep this test quick
    lm = LanguageModel.load(model_path, compile=False)
    ids = lm.tokenizer.encode(load_text("shakespeare")[:2000])[:256]
    imp, full = importance(lm, ids, ctx=128), second_moments(lm, ids, ctx=128, full=True)
    assert set(imp) == set(full) == set(real_hessians)
    for name in ("blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"):
        np.testing.assert_allclose(imp[name], torch.diagonal(full[name]).double().numpy(), rtol=1e-4)
    # by hand: the first layer's attention input is the normed embedding
    x = lm.model.blocks[0].attn_norm(lm.model.embedding.rows(torch.tensor(ids[:64]))).double()
    np.testing.assert_allclose(second_moments(lm, ids[:64] * 2, ctx=64)["blk.0.attn_k.weight"].numpy(), (x**2).mean(0).numpy(), rtol=1e-4)
    # the sink: each window's first row counts `sink_weight` times
    sunk = (x[0] ** 2 * 63 + (x**2).sum(0)) / 64
    np.testing.assert_allclose(second_moments(lm, ids[:64] * 2, ctx=64, sink_weight=64)["blk.0.attn_k.weight"].numpy(), sunk.numpy(), rtol=1e-4)


@pytest.mark.parametrize("qtype", ALL)
def test_search_never_loses_to_min_max_rounding_on_a_real_layer(real_layers, real_importance, qtype):
    """Searched scales against min-max ones, under the same weighting: never a larger error (plain, and importance-weighted
    with real activation statistics), and importance weighting lowers the weighted error against plain search. (The source
    is Q4_1, so Q4_1 itself reproduces it exactly: every error is 0 there.)"""
    fmt = FORMATS[qtype]
    for name, w in real_layers.items():
        if w.shape[1] % fmt.block:
            continue
        imp = real_importance[name]
        plain = weighted_error(w, quantize_matrix(w, qtype, None, search=False), qtype, 1.0)
        searched = weighted_error(w, quantize_matrix(w, qtype, None), qtype, 1.0)
        assert searched <= plain, (name, searched, plain)
        plain_w = weighted_error(w, quantize_matrix(w, qtype, imp, search=False), qtype, imp)
        searched_w = weighted_error(w, quantize_matrix(w, qtype, imp), qtype, imp)
        unweighted = weighted_error(w, quantize_matrix(w, qtype, None), qtype, imp)
        assert searched_w <= plain_w and (searched_w < unweighted or unweighted == 0), (name, searched_w, plain_w, unweighted)


@pytest.mark.parametrize("qtype", [pytest.param(q, id=q.name) for q in (QT.Q4_0, QT.Q4_K, QT.Q3_K, QT.Q2_K)])
def test_gptq_never_increases_the_calibration_loss_over_plain_rounding(real_layers, real_hessians, qtype):
    """On real layers and their real Hessians: GPTQ's calibration loss tr(dW H dW^T) is below the searched rounding's,
    which is below min-max rounding's; its bytes are ordinary blocks (gguf reads them)."""
    fmt = FORMATS[qtype]
    for name, w in real_layers.items():
        if w.shape[1] % fmt.block:
            continue
        h = real_hessians[name]
        imp = torch.diagonal(h).double().numpy()
        loss = {
            "plain": calibration_loss(w, quants.dequantize(quantize_matrix(w, qtype, None, search=False), qtype), h),
            "search": calibration_loss(w, quants.dequantize(quantize_matrix(w, qtype, imp), qtype), h),
            "gptq": calibration_loss(w, quants.dequantize(gptq_quantize(w, qtype, h), qtype), h),
        }
        assert loss["gptq"] <= loss["search"] <= loss["plain"], (name, loss)
        # the factor computed once and handed in (measure_rungs: one per matrix, all its types) changes no byte
        assert gptq_quantize(w, qtype, h, factor=inverse_cholesky(h)).tobytes() == gptq_quantize(w, qtype, h).tobytes()


def test_gptq_with_an_identity_hessian_is_nearest_rounding():
    """H = I decouples the columns: nothing to pass on, so GPTQ rounds each weight to its grid's nearest point."""
    w = np.random.default_rng(2).standard_normal((8, 512)) * 0.05
    for qtype in (QT.Q4_K, QT.Q4_0):
        assert gptq_quantize(w, qtype, torch.eye(512), damp=0.0).tobytes() == quantize_matrix(w, qtype, np.ones(512)).tobytes()


def test_low_bits_cost_more_error():
    """On weights that lie on no grid (heavy-tailed random): more bits, less error. (On the Q4_1 source's own layers
    Q4_K and Q5_K nearly reproduce its 32-element affine grid and beat Q6_K: a requantized source is no fresh matrix.)"""
    w = np.random.default_rng(1).standard_t(5, size=(64, 1024)) * 0.02
    errors = [weighted_error(w, quantize_matrix(w, q), q, 1.0) for q in (QT.Q6_K, QT.Q5_K, QT.Q4_K, QT.Q3_K, QT.Q2_K)]
    assert errors == sorted(errors), errors


def test_constant_and_zero_blocks_are_exact():
    w = np.zeros((4, 512), dtype=np.float32)
    w[1] = 0.25
    w[2, :256] = -1.0
    for qtype in FORMATS:
        np.testing.assert_allclose(quants.dequantize(quantize_matrix(w, qtype), qtype), w, atol=2e-3, err_msg=qtype.name)


@pytest.fixture(scope="module")
def tiny_source(gguf, tmp_path_factory):
    return write_tiny(gguf, tmp_path_factory.mktemp("compress") / "tiny.gguf", "llama")


@pytest.mark.parametrize("qtype", [pytest.param(q, id=q.name) for q in (QT.Q4_K, QT.Q3_K, QT.Q4_0)])
def test_compressed_file_follows_its_plan_and_runs(tiny_source, tmp_path, qtype):
    src = read_gguf(tiny_source)
    out = tmp_path / "out.gguf"
    plans = compress_gguf(src, out, qtype)
    got = read_gguf(out)
    assert list(got.tensors) == list(src.tensors)
    for p in plans:
        assert got.tensors[p.name].qtype == p.target and got.tensors[p.name].shape == p.shape
        assert got.tensors[p.name].nbytes == p.target_bytes
    assert got.tensors["blk.0.ffn_down.weight"].qtype == qtype  # 256 columns: one super-block per row
    assert got.tensors["blk.0.attn_q.weight"].qtype == (pipeline.FALLBACK.get(qtype, qtype))  # 128 columns
    assert got.tensors["output.weight"].raw.tobytes() == src.tensors["output.weight"].raw.tobytes()  # Q8_0 (>= Q6_K) kept
    assert got.metadata["general.file_type"] == int(pipeline.FILE_TYPES[qtype])
    for key, value in src.metadata.items():
        if key not in ("general.file_type", "GGUF.tensor_count", "GGUF.kv_count"):
            assert got.metadata[key] == value, key
    ref = LanguageModel.load(tiny_source, precision="fp32", compile=False)
    ids = ref.tokenizer.encode("A compressed model reads the same way, nearly.")
    a = ref.prefill(ids, ref.new_cache(len(ids)), last_only=False)

    def logit_error(path):
        lm = LanguageModel.load(path, precision="fp32", compile=False)
        return float((lm.prefill(ids, lm.new_cache(len(ids)), last_only=False) - a).norm() / a.norm())

    compress_gguf(src, tmp_path / "plain.gguf", qtype, rounding="plain")
    searched, plain = logit_error(out), logit_error(tmp_path / "plain.gguf")
    # random weights, a random F16 embedding requantized too: a 2-layer model's logits move by (measured) Q4_K 0.11
    # searched / 0.13 plain, Q3_K 0.24 / 0.29, Q4_0 0.20 / 0.24 (Q8_0: 0.013 / 0.015)
    assert searched < plain < {QT.Q4_K: 0.16, QT.Q3_K: 0.35, QT.Q4_0: 0.3}[qtype], (searched, plain)
    lm = LanguageModel.load(out, compile=False)  # and on the quantized kernels
    assert torch.isfinite(lm.prefill(ids, lm.new_cache(len(ids)))).all()


def test_the_output_head_keeps_q6_k_or_better(gguf):
    plans = {p.name: p for p in plan_types(gguf, QT.Q2_K)}
    assert plans["token_embd.weight"].target == QT.Q8_0  # tied head, 576 columns: Q6_K's fallback
    assert plans["blk.0.ffn_down.weight"].target == QT.Q2_K and plans["blk.0.ffn_up.weight"].target == QT.Q4_0
    assert plans["blk.0.attn_norm.weight"].target == QT.F32


def test_an_interrupted_compress_leaves_no_file(tiny_source, tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return quantize_matrix(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_matrix", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        compress_gguf(read_gguf(tiny_source), out, QT.Q4_K)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    compress_gguf(read_gguf(tiny_source), out, QT.Q4_K)  # a rerun completes it
    assert read_gguf(out).tensors["blk.1.ffn_down.weight"].qtype == QT.Q4_K


def test_cli_compresses_with_calibration_and_reports(tiny_source, tmp_path, capsys):
    out = tmp_path / "tiny-q4k.gguf"
    assert main(["compress", str(tiny_source), str(out), "--type", "q4_k", "--calib-tokens", "1024"]) == 0
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith(f"out = {out} size_mb = ") and " bpw = " in last
    assert "ffn_down.weight" in captured.err and "calibrated on 1024 tokens of shakespeare" in captured.err and "gptq" in captured.err
    assert read_gguf(out).tensors["blk.0.ffn_down.weight"].qtype == QT.Q4_K


def test_bad_input_is_refused_before_work(tiny_source, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_source), str(tmp_path / "o.gguf"), "--type", "IQ2_XS"])
    assert "unknown type 'IQ2_XS'" in capsys.readouterr().err
    assert main(["compress", str(tiny_source), str(tmp_path / "no" / "o.gguf"), "--type", "Q4_K"]) == 1
    assert "no such folder" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    assert main(["compress", str(tiny_source), str(tmp_path / "o.gguf"), "--type", "Q4_K", "--calib", str(short)]) == 1
    assert "at least 1024" in capsys.readouterr().err
    assert main(["compress", str(tiny_source), str(tiny_source), "--type", "Q4_K", "--calib", "none", "--rounding", "search"]) == 1
    assert "overwrite the source" in capsys.readouterr().err
    assert main(["compress", str(tiny_source), str(tmp_path / "o.gguf"), "--type", "Q4_K", "--calib", "none"]) == 1
    assert "GPTQ rounding needs calibration text" in capsys.readouterr().err
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_source.read_bytes()[:5000])
    assert main(["compress", str(broken), str(tmp_path / "o.gguf"), "--type", "Q4_K"]) == 1
    assert "broken.gguf" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()
    with pytest.raises(EdgewiseError, match="1536 finite values"):
        quantize_matrix(np.zeros((2, 1536), np.float32), QT.Q4_K, np.full(1536, -1.0))


@pytest.mark.parametrize("qtype", [pytest.param(q, id=q.name) for q in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q4_0)])
def test_llama_cpp_reads_what_compress_writes(tiny_source, tmp_path, qtype):
    """Interop, when the peer (llama-cpp-python, `scripts/setup.sh --bench`) is installed: llama.cpp loads each written
    type, its logits agree with edgewise's on the same file, and it generates."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / f"tiny-{qtype.name}.gguf"
    compress_gguf(read_gguf(tiny_source), out, qtype)
    lm = LanguageModel.load(out, precision="fp32", compile=False)
    ids = lm.tokenizer.encode("Both runtimes read the same bytes.")
    ours = lm.prefill(ids, lm.new_cache(len(ids)), last_only=False).numpy()
    peer = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    peer.eval(ids)
    theirs = np.array(peer.scores[: len(ids)])
    # llama.cpp rounds activations to 8 bits for its quantized dot products: agreement, not equality
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(ours)
    assert rel < 0.05, rel
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.8
    assert len(peer.create_completion("Once", max_tokens=8, temperature=0.0)["choices"][0]["text"]) > 0
