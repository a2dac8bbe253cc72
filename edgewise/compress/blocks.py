"""GGUF block formats as the compressor writes them: one table row per format, one packer per layout.

Every format stores, per sub-block of `sub` elements, integer codes q in [lo, hi] and a value
`scale * q - min` (symmetric formats have min = 0 and signed codes; the stored code is q - lo).
The K-quants (256 elements per super-block) store each sub-block's scale (and min) as a small
integer times one fp16 super-scale `d` (and `dmin`); the 32-element formats store an fp16 scale
per block. The byte layouts are ggml's (ggml-common.h); `tests/test_compress_quantize.py` checks
every packer against `gguf.quants.dequantize`, the reading side's own definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES


@dataclass(frozen=True)
class BlockFormat:
    qtype: QT
    sub: int  # elements per scale
    lo: int  # codes q in [lo, hi]: value = scale * q - min
    hi: int
    affine: bool  # a min per sub-block (q >= 0); else symmetric (min = 0)
    scale_lo: int = 0  # K-quants: integer sub-block scales in [scale_lo, scale_hi] times d (mins in [0, scale_hi] times dmin)
    scale_hi: int = 0  # 0: the scale (and min) is one fp16 per block

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def super_scaled(self) -> bool:
        return self.scale_hi > 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_bytes / self.block


FORMATS: dict[QT, BlockFormat] = {
    f.qtype: f
    for f in (
        BlockFormat(QT.Q8_0, 32, -127, 127, affine=False),
        BlockFormat(QT.Q5_0, 32, -16, 15, affine=False),
        BlockFormat(QT.Q4_0, 32, -8, 7, affine=False),
        BlockFormat(QT.Q4_1, 32, 0, 15, affine=True),
        BlockFormat(QT.Q6_K, 16, -32, 31, affine=False, scale_lo=-128, scale_hi=127),
        BlockFormat(QT.Q5_K, 32, 0, 31, affine=True, scale_lo=0, scale_hi=63),
        BlockFormat(QT.Q4_K, 32, 0, 15, affine=True, scale_lo=0, scale_hi=63),
        BlockFormat(QT.Q3_K, 16, -4, 3, affine=False, scale_lo=-32, scale_hi=31),
        BlockFormat(QT.Q2_K, 16, 0, 3, affine=True, scale_lo=0, scale_hi=15),
    )
}


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """[nb] float -> [nb, 2] bytes of fp16."""
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo | (hi << 4)).astype(np.uint8)


def _pairs(q: np.ndarray) -> np.ndarray:
    """2-bit codes [nb, 256] -> [nb, 64] bytes: bits 2j of byte 32h + l hold element 128h + 32j + l (Q2_K, Q3_K)."""
    q = q.reshape(-1, 2, 4, 32)  # [nb, h, j, l]
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64).astype(np.uint8)


def _k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [nb, 8] -> the 12 bytes of Q4_K/Q5_K: sub-blocks 0-3 in the low 6 bits of bytes 0-3
    (scales) and 4-7 (mins); 4-7 as nibbles of bytes 8-11 with their top 2 bits in bytes 0-7's top bits."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)).astype(np.uint8)
    out[:, 4:8] = (mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)).astype(np.uint8)
    out[:, 8:12] = ((sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)).astype(np.uint8)
    return out


def _k3_scales(sc: np.ndarray) -> np.ndarray:
    """6-bit stored scales [nb, 16] (scale + 32) -> the 12 bytes of Q3_K: low nibbles of scales 0-7 and 8-15 as
    the nibbles of bytes 0-7; the top 2 bits of scale j at bits 2 (j // 4) of byte 8 + j % 4."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = _nibbles(sc[:, 0:8] & 15, sc[:, 8:16] & 15)
    top = (sc >> 4) & 3
    out[:, 8:12] = (top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)).astype(np.uint8)
    return out


def pack(fmt: BlockFormat, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, d: np.ndarray | None, dmin: np.ndarray | None) -> np.ndarray:
    """Blocks [nb, block] of codes in [lo, hi] and their (integer, for K-quants; float, else) sub-block scales
    [nb, block // sub] (and mins) -> [nb, type_bytes] bytes. `d`/`dmin` [nb]: the K-quants' super-scales."""
    nb = codes.shape[0]
    q = (codes.astype(np.int64) - fmt.lo).astype(np.uint8).astype(np.int64)  # stored codes, unsigned
    t = fmt.qtype
    if t == QT.Q8_0:
        return np.concatenate([_f16_bytes(scales[:, 0]), codes.astype(np.int8).view(np.uint8)], 1)
    if t == QT.Q4_0:
        return np.concatenate([_f16_bytes(scales[:, 0]), _nibbles(q[:, :16], q[:, 16:])], 1)
    if t == QT.Q4_1:
        return np.concatenate([_f16_bytes(scales[:, 0]), _f16_bytes(-mins[:, 0]), _nibbles(q[:, :16], q[:, 16:])], 1)
    if t == QT.Q5_0:
        high = (q >> 4) & 1
        qh = (high << np.arange(32)).sum(1).astype("<u4").view(np.uint8).reshape(nb, 4)
        return np.concatenate([_f16_bytes(scales[:, 0]), qh, _nibbles(q[:, :16] & 15, q[:, 16:] & 15)], 1)
    if t in (QT.Q4_K, QT.Q5_K):
        sub = q.reshape(nb, 4, 2, 32)  # 64-element chunks: sub-block 2c in the low nibbles, 2c + 1 in the high
        qs = _nibbles(sub[:, :, 0] & 15, sub[:, :, 1] & 15).reshape(nb, 128)
        head = [_f16_bytes(d), _f16_bytes(dmin), _k4_scales(scales.astype(np.int64), mins.astype(np.int64))]
        if t == QT.Q4_K:
            return np.concatenate([*head, qs], 1)
        high = (q.reshape(nb, 8, 32) >> 4) & 1  # bit s of byte l: element l of sub-block s
        qh = (high << np.arange(8)[None, :, None]).sum(1).astype(np.uint8)
        return np.concatenate([*head, qh, qs], 1)
    if t == QT.Q6_K:
        halves = q.reshape(nb, 2, 4, 32)  # [h, j, l]: element 128h + 32j + l
        ql = np.concatenate([_nibbles(halves[:, :, 0] & 15, halves[:, :, 2] & 15), _nibbles(halves[:, :, 1] & 15, halves[:, :, 3] & 15)], 2)
        top = halves >> 4
        qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).astype(np.uint8)
        return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), scales.astype(np.int8).view(np.uint8), _f16_bytes(d)], 1)
    if t == QT.Q3_K:
        high = (q.reshape(nb, 8, 32) >> 2) & 1  # bit c of byte l: element l of 32-block c
        hmask = (high << np.arange(8)[None, :, None]).sum(1).astype(np.uint8)
        return np.concatenate([hmask, _pairs(q & 3), _k3_scales(scales.astype(np.int64) + 32), _f16_bytes(d)], 1)
    if t == QT.Q2_K:
        return np.concatenate([_nibbles(scales.astype(np.int64), mins.astype(np.int64)), _pairs(q), _f16_bytes(d), _f16_bytes(dmin)], 1)
    raise ValueError(f"no packer for {t.name}")
