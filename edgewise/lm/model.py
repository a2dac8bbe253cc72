"""A Llama-family decoder for batch-1 on-device inference: RMSNorm, RoPE, GQA, SwiGLU.

One forward serves prefill (T tokens) and decode (T = 1). The caller owns the KV cache: one
preallocated (K, V) pair per layer, written in place at `positions`; `mask` is additive
[T, L] over the first L cache slots, so L (the live length) is a shape, not a value, and the
decode step exports with a dynamic L (see `edgewise.lm.compiled`).

The residual stream stays fp32; each linear layer sees the precision's activation dtype (fp32
for edgewise's kernels and the reference, bf16 for torch's int4/int8 fallback). `Block.ffn` is
any module mapping [T, D] -> [T, D]: the flash engine swaps in its sparse FFN there,
compression swaps the linears inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgewise.gguf_io import GGUFFile
from edgewise.lm.config import LlamaConfig
from edgewise.lm.weights import (
    Precision,
    activation_dtype,
    cache_dtype,
    dequantize,
    load_embedding,
    load_fused_linear,
    load_linear,
    rope_row_order,
)

# How finely the native kernels round each layer role's input activations, per block of 32:
# 16 bits wherever 8 measurably cost perplexity (benchmarks/act_bits.py), 8 elsewhere (faster).
ACT_BITS = {"attn_qkv": 16, "attn_output": 8, "ffn_gate_up": 8, "ffn_down": 16, "output": 16}


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout; x [heads, T, hd], cos/sin [T, hd/2] (fp32)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """`wqkv` maps x to Q, K and V side by side ([T, (H + 2 Hkv) hd]), one matmul for all three."""

    def __init__(self, wqkv: nn.Module, wo: nn.Module, cfg: LlamaConfig):
        super().__init__()
        self.wqkv, self.wo = wqkv, wo
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache):
        T = x.shape[0]
        H, Hkv, hd = self.n_heads, self.n_kv, self.head_dim
        G = H // Hkv  # query heads per KV head; query head h uses KV head h // G
        q, k, v = self.wqkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = rotate(q.reshape(T, H, hd).transpose(0, 1), cos, sin)
        k = rotate(k.reshape(T, Hkv, hd).transpose(0, 1), cos, sin)
        v = v.reshape(T, Hkv, hd).transpose(0, 1)
        k_cache.index_copy_(1, positions, k.to(k_cache.dtype))
        v_cache.index_copy_(1, positions, v.to(v_cache.dtype))
        L = mask.shape[-1]
        keys = k_cache.narrow(1, 0, L).float()
        values = v_cache.narrow(1, 0, L).float()
        q = q.reshape(Hkv, G, T, hd) * hd**-0.5
        if T == 1:
            # batch-1 decode as broadcast-multiply + sum: inductor fuses it, where two tiny bmm calls would not
            scores = (q[:, :, 0, None, :] * keys[:, None, :, :]).sum(-1) + mask  # [Hkv, G, L]
            out = (scores.softmax(-1)[..., None] * values[:, None, :, :]).sum(-2)  # [Hkv, G, hd]
            out = out.reshape(1, H * hd)
        else:
            scores = (q.reshape(Hkv, G * T, hd) @ keys.transpose(1, 2)).view(Hkv, G, T, L) + mask
            out = scores.softmax(-1).view(Hkv, G * T, L) @ values  # [Hkv, G*T, hd]
            out = out.view(H, T, hd).transpose(0, 1).reshape(T, H * hd)
        return self.wo(out.to(x.dtype))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate x) * up x); `gate_up` computes gate and up side by side in one matmul."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).float().chunk(2, dim=-1)
        return self.down((F.silu(gate) * up).to(x.dtype))


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, ffn: nn.Module):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, h, cos, sin, positions, mask, k_cache, v_cache, act_dtype: torch.dtype):
        h = h + self.attn(self.attn_norm(h).to(act_dtype), cos, sin, positions, mask, k_cache, v_cache).float()
        return h + self.ffn(self.ffn_norm(h).to(act_dtype)).float()


@dataclass
class KVCache:
    """One (K, V) pair per layer, [n_kv_heads, capacity, head_dim]; zero-filled so masked slots stay finite."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, cfg: LlamaConfig, capacity: int, dtype: torch.dtype) -> "KVCache":
        shape = (cfg.n_kv_heads, capacity, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)], [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, precision: Precision, embedding: nn.Module, blocks: list[Block], norm: RMSNorm, output: nn.Module):
        super().__init__()
        self.cfg, self.precision = cfg, precision
        self.act_dtype = activation_dtype(precision)
        self.embedding, self.blocks, self.norm, self.output = embedding, nn.ModuleList(blocks), norm, output
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float64), inv_freq)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], last_only: bool = False) -> torch.Tensor:
        """tokens, positions [T] int64; mask [T, L] fp32 additive; returns fp32 logits [T or 1, vocab]."""
        h = self.embedding.rows(tokens)
        cos = self.rope_cos.index_select(0, positions)
        sin = self.rope_sin.index_select(0, positions)
        for block, k_cache, v_cache in zip(self.blocks, k_caches, v_caches):
            h = block(h, cos, sin, positions, mask, k_cache, v_cache, self.act_dtype)
        if last_only:
            h = h[-1:]
        return self.output(self.norm(h).to(self.act_dtype)).float()

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache.allocate(self.cfg, capacity, cache_dtype(self.precision))

    @classmethod
    def from_gguf(
        cls, gguf: GGUFFile, precision: Precision = "quant", progress=None, act_bits: dict[str, int] | None = None, ffn_of_layer: Callable[[int], nn.Module] | None = None
    ) -> "Llama":
        """Build the decoder from a GGUF; `act_bits` overrides `ACT_BITS` (the native kernels' input rounding per role).
        `ffn_of_layer(i)` supplies layer i's FFN instead of loading it (the flash engine, whose GGUF has no FFN tensors)."""
        cfg = LlamaConfig.from_gguf(gguf)
        bits = {**ACT_BITS, **(act_bits or {})}
        q_order = rope_row_order(cfg.n_heads, cfg.head_dim)
        k_order = rope_row_order(cfg.n_kv_heads, cfg.head_dim)

        def norm(name: str) -> RMSNorm:
            return RMSNorm(dequantize(gguf.tensor(name)), cfg.norm_eps)

        embedding = load_embedding(gguf.tensor("token_embd.weight"), precision, tied=cfg.tied_embeddings, act_bits=bits["output"])
        output = embedding if cfg.tied_embeddings else load_linear(gguf.tensor("output.weight"), precision, act_bits=bits["output"])
        blocks = []
        for i in range(cfg.n_layers):
            t = lambda name: gguf.tensor(f"blk.{i}.{name}.weight")  # noqa: E731
            attn = Attention(
                load_fused_linear([t("attn_q"), t("attn_k"), t("attn_v")], precision, [q_order, k_order, None], bits["attn_qkv"]),
                load_linear(t("attn_output"), precision, act_bits=bits["attn_output"]),
                cfg,
            )
            ffn = ffn_of_layer(i) if ffn_of_layer is not None else FeedForward(
                load_fused_linear([t("ffn_gate"), t("ffn_up")], precision, [None, None], bits["ffn_gate_up"]),
                load_linear(t("ffn_down"), precision, act_bits=bits["ffn_down"]),
            )
            blocks.append(Block(RMSNorm(dequantize(t("attn_norm")), cfg.norm_eps), attn, RMSNorm(dequantize(t("ffn_norm")), cfg.norm_eps), ffn))
            if progress is not None:
                progress(i + 1, cfg.n_layers)
        return cls(cfg, precision, embedding, blocks, norm("output_norm.weight"), output).eval()


def causal_mask(start: int, n_tokens: int, width: int | None = None) -> torch.Tensor:
    """Additive mask [n_tokens, width] for tokens at positions start..start+n_tokens-1 over
    cache slots 0..width-1 (width defaults to start + n_tokens; wider slots are masked)."""
    width = start + n_tokens if width is None else width
    slots = torch.arange(width)
    pos = torch.arange(start, start + n_tokens)[:, None]
    return torch.where(slots[None, :] <= pos, 0.0, float("-inf")).to(torch.float32)



