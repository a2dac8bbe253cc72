"""Linear layers over GGUF weights, kept quantized.

Three precisions (`Precision`):
- "quant": the GGUF's own quantized weights.
  - With edgewise's native kernels (`edgewise.kernels`, AVX2): Q4_1, Q4_0 and Q8_0 stay in their
    GGUF blocks, bit for bit (`Q4Linear`, `Q8Linear`), and so do the K-quants Q2_K to Q6_K
    (`KQuantLinear`: the GGUF's super-block rows as they are); activations are fp32 and each kernel
    rounds them per block of 32 to int8 (as llama.cpp does) or int16, per layer (`act_bits`). The
    K-quants' int8 step per block of 32 is a 5-bit multiple of one scale per super-block, so that a
    super-block sums exactly in integers (kernels/blocks.h, ActivationsK).
  - Without them, torch's weight-only kernels with bf16 activations: Q4_x goes onto the int4
    kernel exactly (it computes `(q - 8) * s + z` per group of 32, and Q4_1 is `q * d + m`, so
    `s = d, z = m + 8d`; the only loss is rounding the fp16 d and m to bf16); Q8_0 onto the int8
    per-channel kernel (per-block scales re-expressed per row, a small requantization).
  - Q5_0 runs on the Q8_0 kernel: its 5-bit codes minus 16 are int8 codes under the same fp16
    scale, so the weights are exact (1.5x the bytes).
  - Q5_1 is dequantized to bf16, with a warning; other quantized types
    (the IQ family, ...) are refused by name (`check_tensor_types`).
- "bf16" and "fp32": every weight dequantized (the fp32 one is the reference path).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from gguf import quants
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile, GGUFTensor

Precision = Literal["quant", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("quant", "bf16", "fp32")
GROUP = 32  # elements per Q4/Q8 block, and the int4 kernel's group size
INT4_INNER_K_TILES = 8  # fallback kernel; of 2, 4, 8 the fastest on the AVX2 test machine (1536x576: 91, 82, 75 us)
KQUANT_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)  # kernels/kquant_matmul.cpp
NATIVE_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q5_0, *KQUANT_TYPES)  # on edgewise's kernels
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
Q8_CODE_TYPES = (QT.Q8_0, QT.Q5_0)  # both are integer codes times one fp16 scale per 32: Q5_0 runs as Q8_0 codes, exactly
DEQUANTIZED_TYPES = (QT.Q5_1,)  # run as bf16, with a warning


def check_tensor_types(gguf: GGUFFile) -> None:
    """Refuse, before any loading, a tensor type edgewise cannot run; warn once about those it dequantizes."""
    for t in gguf.tensors.values():
        if t.qtype not in NATIVE_TYPES + FLOAT_TYPES + DEQUANTIZED_TYPES:
            raise EdgewiseError(
                f"{gguf.path}: tensor '{t.name}' has type {t.qtype.name}, which edgewise does not run (it runs"
                f" {', '.join(q.name for q in NATIVE_TYPES + FLOAT_TYPES)}; {', '.join(q.name for q in DEQUANTIZED_TYPES)} as bf16)."
                " Requantize the model with llama.cpp's `llama-quantize --allow-requantize IN.gguf OUT.gguf Q4_K_M`, or run it in llama.cpp"
            )
    slow = Counter(t.qtype.name for t in gguf.tensors.values() if t.qtype in DEQUANTIZED_TYPES)
    if slow:
        kinds = ", ".join(f"{n} {name}" for name, n in sorted(slow.items()))
        warnings.warn(f"{gguf.path.name}: {kinds} tensors are dequantized to bf16 (more memory, slower): edgewise's kernels run {', '.join(q.name for q in NATIVE_TYPES)}", stacklevel=3)


def native_kernels():
    """torch.ops.edgewise when the native quantized kernels are built for this CPU, else None."""
    from edgewise.kernels import quant_matmul_ops

    return quant_matmul_ops()


def activation_dtype(precision: Precision) -> torch.dtype:
    """What the linear layers take: fp32 for the reference and for the native kernels, bf16 for torch's."""
    if precision == "fp32" or (precision == "quant" and native_kernels() is not None):
        return torch.float32
    return torch.bfloat16


def cache_dtype(precision: Precision) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


def dequantize(t: GGUFTensor, rows: np.ndarray | None = None) -> torch.Tensor:
    """The tensor as fp32, optionally only some rows (the raw rows are independent blocks)."""
    raw = t.raw if rows is None else t.raw[rows]
    return torch.from_numpy(np.array(quants.dequantize(raw, t.qtype), dtype=np.float32, copy=True)).reshape(
        len(raw) if rows is not None else t.shape[0], *t.shape[1:]
    )


def _q4_unpack(raw: np.ndarray, k: int, with_min: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0/Q4_1 rows -> (q [N, K] int32 in 0..15, d [N, K/32], m [N, K/32]) with value = q*d + m."""
    n = raw.shape[0]
    block_bytes = 20 if with_min else 18
    blocks = raw.reshape(n, k // GROUP, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if with_min:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
    else:  # Q4_0: value = (q - 8) * d
        m = -8.0 * d
        qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k).astype(np.int32)
    return q, d, m


class Int4Linear(nn.Module):
    """y = x @ W.T with W in torch's packed int4 layout, one (scale, zero) per group of 32."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)

    @classmethod
    def from_q4(cls, raw: np.ndarray, k: int, with_min: bool) -> "Int4Linear":
        q, d, m = _q4_unpack(raw, k, with_min)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q), INT4_INNER_K_TILES)
        scale = torch.from_numpy(d)
        zero = torch.from_numpy(m) + 8.0 * scale
        scales_zeros = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # [K/32, N, 2]
        return cls(packed, scales_zeros, raw.shape[0], k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)


class Int8Linear(nn.Module):
    """y = (x @ Q.T) * s with int8 Q [N, K] and one bf16 scale per output row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Linear":
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows, for an embedding table that shares this weight."""
        return self.weight.index_select(0, ids).to(torch.float32) * self.scales.index_select(0, ids).to(torch.float32)[:, None]


def _blocks(raw: np.ndarray, k: int, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(raw.shape[0], k // GROUP, block_bytes)


def q5_0_codes(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0 rows -> (int8 codes q - 16 [N, K], fp16 d [N, K/32]). Element j of a block: the low (j < 16)
    or high nibble of byte j % 16, plus bit j of the block's 32-bit qh as its 5th bit."""
    blocks = _blocks(raw, k, 22)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    qh = blocks[..., 2:6].copy().view("<u4")[..., 0]
    qs = blocks[..., 6:22]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)
    high = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
    return (low + high - 16).astype(np.int8).reshape(raw.shape[0], k), np.ascontiguousarray(d)


def q8_0_codes(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows -> (int8 codes [N, K], fp16 d [N, K/32])."""
    blocks = _blocks(raw, k, 34)
    return blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], k), np.ascontiguousarray(blocks[..., :2].copy().view(np.float16)[..., 0])


def q8_codes(t: GGUFTensor, row_order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 or Q5_0 tensor as (int8 codes [N, K], fp16 scales [N, K/32]): w = code * scale per block of 32."""
    raw = t.raw if row_order is None else t.raw[row_order]
    return (q5_0_codes if t.qtype == QT.Q5_0 else q8_0_codes)(raw, t.shape[1])


class Q4Linear(nn.Module):
    """Q4_1 blocks as stored in GGUF, on the native kernel: qs [N, K/2] nibbles, d and m [N, K/32] fp16."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, act_bits: int = 16):
        super().__init__()
        self.out_features, self.in_features = qs.shape[0], qs.shape[1] * 2
        self.act_bits = act_bits
        self.register_buffer("qs", qs)
        self.register_buffer("d", d)
        self.register_buffer("m", m)

    @classmethod
    def from_raw(cls, raw: np.ndarray, k: int, with_min: bool, act_bits: int = 16) -> "Q4Linear":
        if with_min:  # Q4_1: d, m, 16 bytes of nibbles
            blocks = _blocks(raw, k, 20)
            dm = blocks[..., :4].copy().view(np.float16)
            qs = blocks[..., 4:]
        else:  # Q4_0: d, 16 bytes; (q - 8) * d == q * d + m with m = -8d, exact in fp16
            blocks = _blocks(raw, k, 18)
            d = blocks[..., :2].copy().view(np.float16)
            dm = np.concatenate([d, d * np.float16(-8)], axis=-1)
            qs = blocks[..., 2:]
        qs = torch.from_numpy(qs.reshape(raw.shape[0], k // 2).copy())
        return cls(qs, torch.from_numpy(np.ascontiguousarray(dm[..., 0])), torch.from_numpy(np.ascontiguousarray(dm[..., 1])), act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.edgewise.q4_1_linear(x, self.qs, self.d, self.m, self.out_features, self.in_features, self.act_bits)


class Q8Linear(nn.Module):
    """Q8_0 blocks as stored in GGUF, on the native kernel: qs [N, K] int8, d [N, K/32] fp16."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, act_bits: int = 16):
        super().__init__()
        self.out_features, self.in_features = qs.shape
        self.act_bits = act_bits
        self.register_buffer("qs", qs)
        self.register_buffer("d", d)

    @classmethod
    def from_raw(cls, raw: np.ndarray, k: int, act_bits: int = 16) -> "Q8Linear":
        qs, d = q8_0_codes(raw, k)
        return cls(torch.from_numpy(qs), torch.from_numpy(d), act_bits)

    @classmethod
    def from_float(cls, w: torch.Tensor, act_bits: int = 16) -> "Q8Linear":
        """Quantize to Q8_0 bit for bit as ggml does: d = max|w| / 127 per block of 32, codes
        round(w / d) half away from zero with the fp32 d, then d stored as fp16."""
        blocks = w.float().reshape(w.shape[0], -1, GROUP)
        d = blocks.abs().amax(-1) / 127.0
        scaled = blocks * torch.where(d > 0, 1.0 / d, 0.0)[..., None]
        qs = (scaled.sign() * (scaled.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8).reshape(w.shape)
        return cls(qs, d.to(torch.float16), act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.edgewise.q8_0_linear(x, self.qs, self.d, self.out_features, self.in_features, self.act_bits)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Exactly dequantized rows, for an embedding table that shares this weight."""
        q = self.qs.index_select(0, ids).to(torch.float32).reshape(ids.shape[0], -1, GROUP)
        return (q * self.d.index_select(0, ids).to(torch.float32)[..., None]).reshape(ids.shape[0], -1)


class KQuantLinear(nn.Module):
    """Q2_K, Q3_K, Q4_K, Q5_K or Q6_K rows as stored in GGUF (uint8 [N, K/256 * block bytes]), on the native kernel."""

    def __init__(self, raw: torch.Tensor, qtype: QT, in_features: int, act_bits: int = 16):
        super().__init__()
        self.out_features, self.in_features = raw.shape[0], in_features
        self.qtype, self.act_bits = int(qtype), act_bits
        self.register_buffer("raw", raw)

    @classmethod
    def from_raw(cls, raw: np.ndarray, qtype: QT, k: int, act_bits: int = 16) -> "KQuantLinear":
        return cls(torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)), qtype, k, act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.edgewise.kquant_linear(x, self.raw, self.qtype, self.out_features, self.in_features, self.act_bits)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Exactly dequantized rows, for an embedding table that shares this weight."""
        return torch.ops.edgewise.kquant_rows(self.raw, ids, self.qtype, self.in_features)

    def rows_into(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start .. start + len(out) - 1, exactly dequantized into `out` (contiguous fp32 [rows, in])."""
        torch.ops.edgewise.kquant_rows_into(self.raw, start, self.qtype, self.in_features, out)
        return out


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.index_select(0, ids).to(torch.float32)


def load_linear(t: GGUFTensor, precision: Precision, row_order: np.ndarray | None = None, act_bits: int = 16) -> nn.Module:
    """A linear layer for a GGUF weight [out, in], rows optionally permuted (RoPE un-permutation).

    `act_bits` (8 or 16) is how finely the native kernels round this layer's input activations."""
    raw = t.raw if row_order is None else t.raw[row_order]
    n, k = t.shape
    native = precision == "quant" and native_kernels() is not None
    if precision == "quant" and t.qtype in (QT.Q4_0, QT.Q4_1) and k % GROUP == 0:
        if native:
            return Q4Linear.from_raw(np.ascontiguousarray(raw), k, with_min=t.qtype == QT.Q4_1, act_bits=act_bits)
        return Int4Linear.from_q4(np.ascontiguousarray(raw), k, with_min=t.qtype == QT.Q4_1)
    if native and t.qtype in Q8_CODE_TYPES:
        qs, d = q8_codes(t, row_order)
        return Q8Linear(torch.from_numpy(qs), torch.from_numpy(d), act_bits)
    if native and t.qtype in KQUANT_TYPES:
        return KQuantLinear.from_raw(raw, t.qtype, k, act_bits)
    w = dequantize(t, row_order) if row_order is not None else dequantize(t)
    if precision == "quant" and t.qtype == QT.Q8_0:
        return Int8Linear.from_float(w)
    return DenseLinear(w.to(torch.float32 if precision == "fp32" else torch.bfloat16))


class ConcatLinear(nn.Module):
    """Several linear layers on one input, outputs concatenated (when they cannot be fused into one)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features, self.in_features = sum(p.out_features for p in parts), parts[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def load_fused_linear(tensors: list[GGUFTensor], precision: Precision, row_orders: list[np.ndarray | None], act_bits: int = 16) -> nn.Module:
    """One linear layer for weights that share an input (Q|K|V, gate|up): their rows stacked, so the
    input is quantized once and one kernel call streams them all. Mixed types are run side by side."""
    first = tensors[0]
    if precision == "quant" and native_kernels() is not None and all(t.qtype in Q8_CODE_TYPES and t.shape[1] == first.shape[1] for t in tensors):
        codes = [q8_codes(t, o) for t, o in zip(tensors, row_orders)]  # Q8_0 and Q5_0 mixed (Gemma's Q|K|V)
        return Q8Linear(torch.from_numpy(np.concatenate([c for c, _ in codes])), torch.from_numpy(np.concatenate([d for _, d in codes])), act_bits)
    if any(t.qtype != first.qtype or t.shape[1] != first.shape[1] for t in tensors):
        return ConcatLinear([load_linear(t, precision, o, act_bits) for t, o in zip(tensors, row_orders)])
    raw = np.concatenate([t.raw if o is None else t.raw[o] for t, o in zip(tensors, row_orders)])
    fused = GGUFTensor("+".join(t.name for t in tensors), first.qtype, (raw.shape[0], first.shape[1]), raw)
    return load_linear(fused, precision, act_bits=act_bits)


def load_embedding(t: GGUFTensor, precision: Precision, tied: bool, act_bits: int = 16) -> nn.Module:
    """The token embedding: a module with `rows(ids)`, also the output layer when `tied`."""
    if precision == "quant" and native_kernels() is not None:
        if t.qtype == QT.Q8_0:
            return Q8Linear.from_raw(t.raw, t.shape[1], act_bits)
        if t.qtype in KQUANT_TYPES:  # kept as stored: rows dequantized per lookup, and the output layer when tied
            return KQuantLinear.from_raw(t.raw, t.qtype, t.shape[1], act_bits)
        if tied:  # it is also the largest matmul of a token: quantize it to Q8_0
            return Q8Linear.from_float(dequantize(t), act_bits)
        return DenseLinear(dequantize(t).to(torch.float16 if t.qtype == QT.F16 else torch.bfloat16))  # lookups only
    w = dequantize(t)
    if precision == "quant":
        return Int8Linear.from_float(w)
    return DenseLinear(w.to(torch.float32 if precision == "fp32" else torch.bfloat16))


def rope_row_order(n_heads: int, head_dim: int) -> np.ndarray:
    """GGUF stores Q/K rows interleaved for llama.cpp's pairwise RoPE; this order restores
    the half-split layout (rotate_half), as transformers' GGUF loader does."""
    idx = np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2)
    return idx.swapaxes(1, 2).reshape(-1)
