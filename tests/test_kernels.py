"""Native AVX2 kernels (edgewise/kernels/quant_matmul.cpp) against a numpy model of the same
arithmetic and against the fp32 dequantized weights; and the fallback when they are absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from edgewise.lm import weights
from edgewise.lm.weights import GROUP, Q4Linear, Q8Linear

ops = pytest.importorskip("edgewise.kernels").quant_matmul_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="native kernels not built on this CPU")


def numpy_model(x: np.ndarray, w_int: np.ndarray, d: np.ndarray, m: np.ndarray | None, act_bits: int) -> np.ndarray:
    """The kernel's arithmetic: x quantized to int8/int16 per block of 32 (scale max|x|/127 or /32767,
    round half to even), exact integer block dots with the weight's integer codes, then fp32 scaling."""
    rows, k = x.shape
    xb = x.reshape(rows, k // GROUP, GROUP).astype(np.float32)
    dx = np.abs(xb).max(-1) / np.float32(127 if act_bits == 8 else 32767)
    inv = np.where(dx > 0, np.float32(1) / np.where(dx > 0, dx, 1), 0).astype(np.float32)
    xq = np.rint(xb * inv[..., None]).astype(np.int32)
    wb = w_int.reshape(w_int.shape[0], k // GROUP, GROUP).astype(np.int64)
    dots = np.einsum("rbi,nbi->rnb", xq.astype(np.int64), wb)  # exact integers
    out = np.einsum("rnb,nb,rb->rn", dots.astype(np.float64), d.astype(np.float64), dx.astype(np.float64))
    if m is not None:
        out += np.einsum("nb,rb->rn", m.astype(np.float64), (dx * xq.sum(-1)).astype(np.float64))
    return out.astype(np.float32)


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 12])  # row by row up to EXACT_ROWS (8); beyond, tiles of 4 with and without a remainder
def test_q4_1_kernel_matches_numpy_model(gguf, rows, act_bits):
    t = gguf.tensors["blk.7.ffn_up.weight"]
    layer = Q4Linear.from_raw(np.asarray(t.raw), t.shape[1], with_min=True, act_bits=act_bits)
    x = torch.randn(rows, t.shape[1], generator=torch.Generator().manual_seed(rows))
    q, d, m = weights._q4_unpack(np.asarray(t.raw), t.shape[1], with_min=True)
    ref = numpy_model(x.numpy(), q, d, m, act_bits)
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-4)
    # and against the exact fp32 weights: only the activation rounding separates them
    exact = x @ torch.from_numpy(np.array(quants.dequantize(t.raw, QT.Q4_1))).T
    assert ((layer(x) - exact).norm() / exact.norm()) < (1e-2 if act_bits == 8 else 1e-4)


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n, k", [(7, 96), (9, 32), (6, 1600), (13, 2080)])
def test_q4_1_kernel_shapes(rows, act_bits, n, k):
    """The kernel's edge paths: an odd last block after the block pairs (K = 96, 32, 2080), output
    rows that do not fill a tile of four (n = 7, 9, 6, 13), and long rows (K > 1024, single-row tiles)."""
    rng = np.random.default_rng(n * k + rows)
    raw = quants.quantize(rng.standard_normal((n, k)).astype(np.float32), QT.Q4_1)
    layer = Q4Linear.from_raw(raw, k, with_min=True, act_bits=act_bits)
    x = torch.from_numpy(rng.standard_normal((rows, k)).astype(np.float32))
    q, d, m = weights._q4_unpack(raw, k, with_min=True)
    np.testing.assert_allclose(layer(x).numpy(), numpy_model(x.numpy(), q, d, m, act_bits), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("n, k", [(7, 96), (6, 1600)])
def test_q8_0_kernel_shapes(act_bits, n, k):
    rng = np.random.default_rng(n + k)
    layer = Q8Linear.from_raw(quants.quantize(rng.standard_normal((n, k)).astype(np.float32), QT.Q8_0), k, act_bits)
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    ref = numpy_model(x.numpy(), layer.qs.numpy(), layer.d.float().numpy(), None, act_bits)
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-4)


def test_q4_0_maps_exactly_onto_the_q4_1_layout():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    raw = quants.quantize(w, QT.Q4_0)
    layer = Q4Linear.from_raw(raw, 128, with_min=False)
    d = layer.d.float()
    m = layer.m.float()
    nib = torch.cat([layer.qs.reshape(64, 4, 16) & 15, layer.qs.reshape(64, 4, 16) >> 4], -1).float()
    ours = (nib * d[..., None] + m[..., None]).reshape(64, 128)
    np.testing.assert_array_equal(ours.numpy(), quants.dequantize(raw, QT.Q4_0))


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("rows", [1, 5, 10])
def test_q8_0_kernel_matches_numpy_model(gguf, rows, act_bits):
    t = gguf.tensors["token_embd.weight"]
    raw = np.asarray(t.raw)[:2048]
    layer = Q8Linear.from_raw(raw, t.shape[1], act_bits)
    x = torch.randn(rows, t.shape[1], generator=torch.Generator().manual_seed(rows))
    ref = numpy_model(x.numpy(), layer.qs.numpy(), layer.d.float().numpy(), None, act_bits)
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-4)
    exact = np.array(quants.dequantize(raw, QT.Q8_0))
    np.testing.assert_array_equal(layer.rows(torch.arange(2048)).numpy(), exact)  # the embedding is exact


@pytest.mark.parametrize("act_bits", [8, 16])
def test_short_batches_equal_decode_bit_for_bit(gguf, act_bits):
    """Batch invariance (blocks.h, EXACT_ROWS): each row of a batch of up to EXACT_ROWS rows is the one-row product,
    bit for bit (decode takes four weight rows per step, so the rows of a batch must take that path too)."""
    from edgewise.kernels import exact_rows

    q4 = gguf.tensors["blk.7.ffn_up.weight"]
    q8 = gguf.tensors["token_embd.weight"]
    for layer in (Q4Linear.from_raw(np.asarray(q4.raw), q4.shape[1], with_min=True, act_bits=act_bits),
                  Q8Linear.from_raw(np.asarray(q8.raw)[:1024], q8.shape[1], act_bits)):
        x = torch.randn(exact_rows(), layer.in_features, generator=torch.Generator().manual_seed(3))
        one = torch.cat([layer(x[i : i + 1]) for i in range(exact_rows())])
        for rows in range(2, exact_rows() + 1):
            assert torch.equal(layer(x[:rows]), one[:rows]), (type(layer).__name__, rows)


def test_q8_0_from_float_matches_gguf_quantize():
    w = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    ours = Q8Linear.from_float(torch.from_numpy(w)).rows(torch.arange(16)).numpy()
    np.testing.assert_array_equal(ours, quants.dequantize(quants.quantize(w, QT.Q8_0), QT.Q8_0))


def test_bad_shapes_raise():
    layer = Q8Linear.from_float(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="x has 32 columns, weights expect 64"):
        layer(torch.randn(1, 32))
    with pytest.raises(RuntimeError, match="act_bits must be 8 or 16"):
        torch.ops.edgewise.q8_0_linear(torch.randn(1, 64), layer.qs, layer.d, 8, 64, 4)


def test_fallback_without_native_kernels(model_path, monkeypatch, hf_model):
    """Where the kernels cannot be built, "quant" runs on torch's int4/int8 kernels with bf16 activations."""
    from edgewise.lm.runtime import LanguageModel

    monkeypatch.setattr(weights, "native_kernels", lambda: None)
    lm = LanguageModel.load(model_path, precision="quant", compile=False)
    assert isinstance(lm.model.blocks[0].ffn.gate_up, weights.Int4Linear) and lm.model.act_dtype == torch.bfloat16
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it ran into the woods")
    ours = lm.prefill(ids, lm.new_cache(len(ids)), last_only=False)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max() < 2.0
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_build_flags_add_avx_vnni_only_where_the_cpu_has_it(monkeypatch):
    """The AVX-VNNI build (blocks.h add_madd) is chosen from the CPU's flags, and is a separate cached build: its flags are
    part of the source hash. Both builds give the same bits, so the kernel tests above hold on either."""
    import edgewise.kernels as kernels

    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    plain, plain_hash = kernels.build_flags(), kernels.source_hash()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c", "avx_vnni"})
    vnni, vnni_hash = kernels.build_flags(), kernels.source_hash()
    assert plain == kernels.BASE_FLAGS and vnni == plain + ["-mavxvnni"]
    assert plain_hash != vnni_hash


def test_a_failed_avx_vnni_build_falls_back_to_avx2_with_a_warning(monkeypatch):
    """A compiler that refuses -mavxvnni (older than GCC 11) costs the fused instruction, not the native kernels."""
    from torch.utils import cpp_extension

    import edgewise.kernels as kernels

    tried = []

    def load(**kw):
        tried.append(kw["extra_cflags"])
        if "-mavxvnni" in kw["extra_cflags"]:
            raise RuntimeError("g++: error: unrecognized command-line option '-mavxvnni'")

    monkeypatch.delenv("EDGEWISE_NO_NATIVE", raising=False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c", "avx_vnni"})
    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.warns(UserWarning, match="AVX-VNNI build of the native kernels failed"):
        assert kernels.quant_matmul_ops.__wrapped__() is torch.ops.edgewise
    assert tried == [kernels.BASE_FLAGS + ["-mavxvnni"], kernels.BASE_FLAGS]
