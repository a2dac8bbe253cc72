"""The K-quant kernel (edgewise/kernels/kquant_matmul.cpp) against two references: gguf's own
dequantization (the meaning of the bytes) and a numpy model of the kernel's integer arithmetic
(activations rounded to int8 with a step per block of 32 that is a 5-bit multiple of one scale per
super-block, or to int16 per block of 32; exact integer block dots, scales applied in float)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from edgewise.lm.weights import KQuantLinear

ops = pytest.importorskip("edgewise.kernels").quant_matmul_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="native kernels not built on this CPU")

BYTES = {QT.Q2_K: 84, QT.Q3_K: 110, QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210}
KQUANTS = [pytest.param(q, id=q.name) for q in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)]


def random_rows(qtype: QT, n: int, k: int, seed: int) -> np.ndarray:
    """N rows of K/256 valid super-blocks: random codes and scales, finite fp16 super-scales."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // 256, BYTES[qtype]), dtype=np.uint8)
    d = (rng.standard_normal((n, k // 256)) * 0.01).astype(np.float16)
    if qtype == QT.Q6_K:
        raw[..., 208:210] = d[..., None].view(np.uint8)
    elif qtype == QT.Q3_K:
        raw[..., 108:110] = d[..., None].view(np.uint8)
    elif qtype == QT.Q2_K:
        raw[..., 80:82] = d[..., None].view(np.uint8)
        raw[..., 82:84] = np.abs(rng.standard_normal((n, k // 256)) * 0.01).astype(np.float16)[..., None].view(np.uint8)
    else:
        raw[..., 0:2] = d[..., None].view(np.uint8)
        raw[..., 2:4] = np.abs(rng.standard_normal((n, k // 256)) * 0.01).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(n, -1)


def k4_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K/Q5_K [..., 12] -> 6-bit scales and mins [..., 8], byte by byte as ggml defines them."""
    sc = sc.astype(np.int64)
    scale = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 15) | ((sc[..., 0:4] >> 6) << 4)], -1)
    mins = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], -1)
    return scale, mins


def unpack(raw: np.ndarray, qtype: QT, k: int):
    """-> integer codes q [N, K], per-element integer scale s [N, K], per-element min term m [N, K] (float),
    super-scale d [N, K]: w = d * s * q - m (Q6_K, Q3_K: q already has its offset subtracted, m = 0)."""
    n = raw.shape[0]
    b = raw.reshape(n, k // 256, BYTES[qtype])
    f16 = lambda a: a.copy().view(np.float16)[..., 0].astype(np.float64)  # noqa: E731
    if qtype == QT.Q2_K:  # blocks.h: (scale, min) nibbles per 16, 2-bit pairs as Q3_K's, d, dmin
        sc, pairs, d, dmin = b[..., 0:16].astype(np.int64), b[..., 16:80].astype(np.int64), f16(b[..., 80:82]), f16(b[..., 82:84])
        q = np.stack([(pairs[..., 32 * (c // 4) : 32 * (c // 4) + 32] >> (2 * (c % 4))) & 3 for c in range(8)], 2)
        m = np.repeat(dmin[..., None] * (sc >> 4), 16, -1)
        return q.reshape(n, k), np.repeat(sc & 15, 16, -1).reshape(n, k), m.reshape(n, k), np.repeat(d, 256, -1)
    if qtype == QT.Q3_K:  # blocks.h: high bits, 2-bit pairs, 12 scale bytes, d
        hm, pairs, sc, d = b[..., 0:32].astype(np.int64), b[..., 32:96].astype(np.int64), b[..., 96:108].astype(np.int64), f16(b[..., 108:110])
        q = np.zeros((n, k // 256, 8, 32), dtype=np.int64)
        for c in range(8):  # block c of 32: pair bits 2 (c % 4) of bytes 32 (c // 4) + l, high bit c of byte l
            q[:, :, c] = ((pairs[..., 32 * (c // 4) : 32 * (c // 4) + 32] >> (2 * (c % 4))) & 3) | (((hm >> c) & 1) << 2)
        low = np.concatenate([sc[..., 0:8] & 15, sc[..., 0:8] >> 4], -1)  # scales 0-7, 8-15
        top = np.stack([(sc[..., 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], -1)  # bits 2 (j / 4) of byte 8 + j % 4
        scale = (low | (top << 4)) - 32
        return (q.reshape(n, k) - 4), np.repeat(scale, 16, -1).reshape(n, k), np.zeros((n, k)), np.repeat(d, 256, -1)
    if qtype in (QT.Q4_K, QT.Q5_K):
        d, dmin = f16(b[..., 0:2]), f16(b[..., 2:4])
        scale, mins = k4_scale_min(b[..., 4:16])
        qs = b[..., 16:144] if qtype == QT.Q4_K else b[..., 48:176]
        nib = np.stack([qs.reshape(n, -1, 4, 32) & 15, qs.reshape(n, -1, 4, 32) >> 4], axis=3).reshape(n, -1, 8, 32).astype(np.int64)
        if qtype == QT.Q5_K:
            qh = b[..., 16:48].astype(np.int64)  # bit s of byte l: element l of sub-block s
            nib = nib + (((qh[:, :, None, :] >> np.arange(8)[None, None, :, None]) & 1) << 4)
        q = nib
        s = np.repeat(scale, 32, -1).reshape(q.shape)
        m = (dmin[..., None] * mins)[..., None].repeat(32, -1)
        return q.reshape(n, k), s.reshape(n, k), m.reshape(n, k), np.repeat(d, 256, -1)
    ql, qh, sc, d = b[..., 0:128], b[..., 128:192].astype(np.int64), b[..., 192:208].view(np.int8).astype(np.int64), f16(b[..., 208:210])
    q = np.zeros((n, k // 256, 2, 4, 32), dtype=np.int64)
    for half in range(2):
        lo = ql[..., 64 * half : 64 * half + 64].astype(np.int64)
        h = qh[..., 32 * half : 32 * half + 32]
        for blk in range(4):
            nibble = (lo[..., 32 * (blk & 1) : 32 * (blk & 1) + 32] >> (4 if blk >= 2 else 0)) & 15
            q[:, :, half, blk] = nibble | (((h >> (2 * blk)) & 3) << 4)
    q = q.reshape(n, k // 256, 256) - 32
    s = np.repeat(sc, 16, -1)
    return q.reshape(n, k), s.reshape(n, k), np.zeros((n, k)), np.repeat(d, 256, -1)


def int8_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """blocks.h's ActivationsK in float32, op for op: per super-block of 256 D = max|x| / (127 * 31), per block of 32
    e = ceil(31 * max|x_b| / max|x|) in 1..31, codes rint(x / (D * e)) -> (codes [rows, K], step D * e per element)."""
    rows, k = x.shape
    xb = x.reshape(rows, k // 256, 8, 32).astype(np.float32)
    amax = np.abs(xb).max(-1)
    top = amax.max(-1, keepdims=True)
    D = top / np.float32(127 * 31)
    per_block = np.where(top > 0, np.float32(31) / np.where(top > 0, top, 1), 0).astype(np.float32)
    e = np.clip(np.ceil(amax * per_block), 1, 31).astype(np.float32)
    step = (D * e).astype(np.float32)
    inv = np.where(step > 0, np.float32(1) / np.where(step > 0, step, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xb * inv[..., None]), -128, 127).astype(np.int64)
    return xq.reshape(rows, k), np.repeat(step.astype(np.float64), 32, -1).reshape(rows, k)


def numpy_model(x: np.ndarray, raw: np.ndarray, qtype: QT, act_bits: int) -> np.ndarray:
    """The kernel's arithmetic in float64: x rounded (half to even) to int8 with a step per block of 32 (int8_activations)
    or per block of 32 to int16; exact integer dots inside each (sub-)block, then
    sum(d * s * (q . xq)) * dx - m * dx * sum(xq) with dx the activation step of each element."""
    rows, k = x.shape
    if act_bits == 8:
        xq, dx_e = int8_activations(x)
    else:
        xb = x.reshape(rows, k // 32, 32).astype(np.float32)
        dx = np.abs(xb).max(-1) / np.float32(32767)
        inv = np.where(dx > 0, np.float32(1) / np.where(dx > 0, dx, 1), 0).astype(np.float32)
        xq = np.rint(xb * inv[..., None]).astype(np.int64).reshape(rows, k)
        dx_e = np.repeat(dx.astype(np.float64), 32, -1)  # per element
    q, s, m, d = unpack(raw, qtype, k)
    # group the integer products by (sub-)block: every element of a group shares d * s * dx
    prod = np.einsum("rk,nk->rnk", xq, q * s)
    out = np.einsum("rnk,nk,rk->rn", prod.astype(np.float64), d, dx_e)
    out -= np.einsum("nk,rk->rn", m, xq * dx_e)
    return out.astype(np.float32)


@pytest.mark.parametrize("qtype", KQUANTS)
def test_numpy_unpacking_equals_gguf_dequantize(qtype):
    """The numpy model reads the bytes as gguf does (so it is a fair model of what they mean)."""
    raw = random_rows(qtype, 5, 768, seed=int(qtype))
    q, s, m, d = unpack(raw, qtype, 768)
    np.testing.assert_allclose(d * s * q - m, quants.dequantize(raw, qtype), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("qtype", KQUANTS)
def test_rows_dequantize_exactly(qtype):
    raw = random_rows(qtype, 9, 512, seed=1)
    layer = KQuantLinear.from_raw(raw, qtype, 512)
    np.testing.assert_array_equal(layer.rows(torch.tensor([8, 0, 3, 3])).numpy(), quants.dequantize(raw, qtype)[[8, 0, 3, 3]])
    with pytest.raises(RuntimeError, match="out of range"):
        layer.rows(torch.tensor([9]))
    out = torch.full((6, 512), float("nan"))
    np.testing.assert_array_equal(layer.rows_into(2, out).numpy(), quants.dequantize(raw, qtype)[2:8])  # into a reused buffer
    with pytest.raises(RuntimeError, match="out of range"):
        layer.rows_into(4, out)


@pytest.mark.parametrize("qtype", KQUANTS)
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 9, 12, 14, 15])  # exact up to EXACT_ROWS (8), 4 rows at a time; beyond, tiles of 4 and remainders
@pytest.mark.parametrize("n, k", [(7, 256), (13, 768), (5, 8960)])  # one super-block, an odd count, a long row (35)
def test_kernel_matches_numpy_model(qtype, act_bits, rows, n, k):
    raw = random_rows(qtype, n, k, seed=n * k + rows)
    layer = KQuantLinear.from_raw(raw, qtype, k, act_bits)
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    ours = layer(torch.from_numpy(x)).numpy()
    ref = numpy_model(x, raw, qtype, act_bits)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * scale)
    # and against gguf's fp32 weights: only the activation rounding separates them (int8 rounding
    # measured up to 1.2% here: random codes with large mins are a harsh case; real rows: test below)
    exact = x @ quants.dequantize(raw, qtype).T
    assert np.linalg.norm(ours - exact) / np.linalg.norm(exact) < (2.5e-2 if act_bits == 8 else 1e-4)


@pytest.mark.parametrize("qtype", KQUANTS)
@pytest.mark.parametrize("act_bits", [8, 16])
def test_short_batches_equal_decode_bit_for_bit(qtype, act_bits):
    """Batch invariance (blocks.h, EXACT_ROWS): each row of a batch of up to EXACT_ROWS rows is the one-row product,
    bit for bit, whatever the other rows hold; speculative decoding's check relies on it."""
    from edgewise.kernels import exact_rows

    raw = random_rows(qtype, 37, 1536, seed=5)
    layer = KQuantLinear.from_raw(raw, qtype, 1536, act_bits)
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((exact_rows(), 1536)).astype(np.float32))
    one = torch.cat([layer(x[i : i + 1]) for i in range(exact_rows())])
    for rows in range(2, exact_rows() + 1):
        assert torch.equal(layer(x[:rows]), one[:rows]), rows


@pytest.mark.parametrize("qtype", KQUANTS)
def test_int8_rows_equal_decode_bit_for_bit_at_any_batch_size(qtype):
    """The int8 path sums each super-block exactly in integers and scales it the same way whatever the tile: a row's
    product is bit for bit the one-row product at any batch size and any position in the batch (prefill included)."""
    raw = random_rows(qtype, 21, 2048, seed=7)
    layer = KQuantLinear.from_raw(raw, qtype, 2048, act_bits=8)
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((19, 2048)).astype(np.float32) * 3)
    one = torch.cat([layer(x[i : i + 1]) for i in range(19)])
    for rows in (2, 3, 4, 5, 7, 8, 9, 13, 19):
        assert torch.equal(layer(x[:rows]), one[:rows]), rows
    assert torch.equal(layer(x[5:12]), one[5:12])  # rows in other tile positions


def test_bad_inputs_raise():
    raw = random_rows(QT.Q4_K, 4, 256, seed=0)
    layer = KQuantLinear.from_raw(raw, QT.Q4_K, 256)
    with pytest.raises(RuntimeError, match="x has 128 columns, weights expect 256"):
        layer(torch.randn(1, 128))
    with pytest.raises(RuntimeError, match="act_bits must be 8 or 16"):
        torch.ops.edgewise.kquant_linear(torch.randn(1, 256), layer.raw, int(QT.Q4_K), 4, 256, 4)
    with pytest.raises(RuntimeError, match="not a K-quant"):
        torch.ops.edgewise.kquant_linear(torch.randn(1, 256), layer.raw, int(QT.Q8_0), 4, 256, 8)


@pytest.fixture(scope="module")
def qwen():
    from edgewise.gguf_io import read_gguf
    from edgewise.models import resolve_model

    try:
        return read_gguf(resolve_model("qwen2.5-coder-1.5b"))
    except Exception as exc:  # not installed: scripts/setup.sh --test installs it
        pytest.skip(f"Qwen2.5-Coder-1.5B not available: {exc}")


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.5.ffn_down.weight", "blk.27.ffn_up.weight", "output.weight"])
def test_real_qwen_tensors(qwen, name):
    """The 1.5B model's own Q4_K and Q6_K rows (a slice of each), against gguf and the numpy model."""
    t = qwen.tensors[name]
    raw = np.array(t.raw[:48])
    layer = KQuantLinear.from_raw(raw, t.qtype, t.shape[1], act_bits=8)
    x = np.random.default_rng(0).standard_normal((2, t.shape[1])).astype(np.float32)
    ours = layer(torch.from_numpy(x)).numpy()
    ref = numpy_model(x, raw, t.qtype, 8)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(layer.rows(torch.arange(48)).numpy(), quants.dequantize(raw, t.qtype))
    exact = x @ quants.dequantize(raw, t.qtype).T
    assert np.linalg.norm(ours - exact) / np.linalg.norm(exact) < 1e-2
