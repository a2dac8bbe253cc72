"""The decoder of Llama, Qwen2/3 and Gemma 3 for batch-1 on-device inference: RMSNorm, RoPE, GQA,
gated FFN (SwiGLU or GeGLU). Where the architectures differ, `ModelConfig.traits` says how: QKV
biases, per-head q/k norms, post-norms, the embedding scale, sliding-window layers with their own
RoPE base (`edgewise.lm.config.ARCHITECTURES`).

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
from edgewise.kernels import exact_rows
from edgewise.lm.config import ModelConfig, check_tensor_shapes
from edgewise.lm.weights import (
    Precision,
    activation_dtype,
    cache_dtype,
    check_tensor_types,
    dequantize,
    load_embedding,
    load_fused_linear,
    load_linear,
    rope_row_order,
)

# How finely the native kernels round each layer role's input activations, per block of 32 (for the
# K-quants' int8, a 5-bit multiple of a scale per 256: config.ALL_INT8):
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
    """`wqkv` maps x to Q, K and V side by side ([T, (H + 2 Hkv) hd]), one matmul for all three; then
    the optional biases (`qkv_bias`), per-head norms of Q and K (`q_norm`, `k_norm`), and RoPE."""

    def __init__(self, wqkv: nn.Module, wo: nn.Module, cfg: ModelConfig, qkv_bias: torch.Tensor | None = None, q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        super().__init__()
        self.wqkv, self.wo = wqkv, wo
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.register_buffer("qkv_bias", None if qkv_bias is None else qkv_bias.float())
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache):
        T = x.shape[0]
        H, Hkv, hd = self.n_heads, self.n_kv, self.head_dim
        G = H // Hkv  # query heads per KV head; query head h uses KV head h // G
        qkv = self.wqkv(x)
        if self.qkv_bias is not None:
            qkv = qkv.float() + self.qkv_bias
        q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q, k = q.reshape(T, H, hd), k.reshape(T, Hkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q.float()), self.k_norm(k.float())
        q = rotate(q.transpose(0, 1), cos, sin)
        k = rotate(k.transpose(0, 1), cos, sin)
        v = v.reshape(T, Hkv, hd).transpose(0, 1)
        k_cache.index_copy_(1, positions, k.to(k_cache.dtype))
        v_cache.index_copy_(1, positions, v.to(v_cache.dtype))
        L = mask.shape[-1]
        keys = k_cache.narrow(1, 0, L).float()
        values = v_cache.narrow(1, 0, L).float()
        q = q.reshape(Hkv, G, T, hd) * hd**-0.5
        if T == 1:
            out = attend_one(q[:, :, 0], keys, values, mask[0]).reshape(1, H * hd)
        elif T <= exact_rows():
            # a short batch (a speculative check): row by row, each bit for bit as decode computes it, over
            # the slots up to its own position (the mask is causal: row t's last open slot is L - T + t)
            out = torch.cat([attend_one(q[:, :, t], keys[:, : L - T + 1 + t], values[:, : L - T + 1 + t], mask[t, : L - T + 1 + t]).reshape(1, H * hd)
                             for t in range(T)])
        else:
            scores = (q.reshape(Hkv, G * T, hd) @ keys.transpose(1, 2)).view(Hkv, G, T, L) + mask
            out = scores.softmax(-1).view(Hkv, G * T, L) @ values  # [Hkv, G*T, hd]
            out = out.view(H, T, hd).transpose(0, 1).reshape(T, H * hd)
        return self.wo(out.to(x.dtype))


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query position: q [Hkv, G, hd] (pre-scaled) over keys, values [Hkv, L, hd] with mask [L]; [Hkv, G, hd].
    Broadcast-multiply and sum: inductor fuses it into the compiled decode step, where two tiny bmm calls would not."""
    scores = (q[:, :, None, :] * keys[:, None, :, :]).sum(-1) + mask  # [Hkv, G, L]
    return (scores.softmax(-1)[..., None] * values[:, None, :, :]).sum(-2)


def gated(gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """The gated FFN's hidden activation, act(gate) * up, act SiLU (SwiGLU) or tanh-GELU (GeGLU): its one definition
    (the streamed FFN, the flash engine and the predictors' calibration use it too)."""
    return (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up


class FeedForward(nn.Module):
    """Gated FFN: down(act(gate x) * up x), act SiLU (SwiGLU) or tanh-GELU (GeGLU); `gate_up` computes
    gate and up side by side in one matmul."""

    def __init__(self, gate_up: nn.Module, down: nn.Module, activation: str = "silu"):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.gelu = activation == "gelu_tanh"

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden activation h = act(gate x) * up x, in fp32."""
        gate, up = self.gate_up(x).float().chunk(2, dim=-1)
        return gated(gate, up, self.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x).to(x.dtype))


class Block(nn.Module):
    """Pre-norm residual block; `post_attn_norm` / `post_ffn_norm` (Gemma 3) also normalize each
    sub-layer's output before its residual add (nn.Identity elsewhere)."""

    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, ffn: nn.Module, post_attn_norm: nn.Module | None = None, post_ffn_norm: nn.Module | None = None, local: bool = False):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn
        self.post_attn_norm = post_attn_norm or nn.Identity()
        self.post_ffn_norm = post_ffn_norm or nn.Identity()
        self.local = local  # a sliding-window layer: it gets the local mask and RoPE tables

    def forward(self, h, cos, sin, positions, mask, k_cache, v_cache, act_dtype: torch.dtype):
        h = h + self.post_attn_norm(self.attn(self.attn_norm(h).to(act_dtype), cos, sin, positions, mask, k_cache, v_cache).float())
        return h + self.post_ffn_norm(self.ffn(self.ffn_norm(h).to(act_dtype)).float())


@dataclass
class KVCache:
    """One (K, V) pair per layer, [n_kv_heads, capacity, head_dim]; zero-filled so masked slots stay finite."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, capacity: int, dtype: torch.dtype, layers: int | None = None) -> "KVCache":
        shape, n = (cfg.n_kv_heads, capacity, cfg.head_dim), cfg.n_layers if layers is None else layers
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(n)], [torch.zeros(shape, dtype=dtype) for _ in range(n)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def rope_tables(theta: float, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class Llama(nn.Module):
    """The whole decoder (every architecture of `ARCHITECTURES`, despite the family's first name)."""

    def __init__(self, cfg: ModelConfig, precision: Precision, embedding: nn.Module, blocks: list[Block], norm: RMSNorm, output: nn.Module):
        super().__init__()
        self.cfg, self.precision = cfg, precision
        self.act_dtype = activation_dtype(precision)
        self.embedding, self.blocks, self.norm, self.output = embedding, nn.ModuleList(blocks), norm, output
        self.embedding_scale = cfg.embedding_scale
        cos, sin = rope_tables(cfg.rope_theta, cfg.head_dim, cfg.context_length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.has_local = any(b.local for b in blocks)
        if self.has_local:  # sliding-window layers: their own RoPE base
            cos, sin = rope_tables(cfg.traits.rope_theta_local or cfg.rope_theta, cfg.head_dim, cfg.context_length)
            self.register_buffer("rope_cos_local", cos, persistent=False)
            self.register_buffer("rope_sin_local", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], last_only: bool = False) -> torch.Tensor:
        """tokens, positions [T] int64; mask [T, L] fp32 additive; returns fp32 logits [T or 1, vocab]."""
        h = self.hidden(tokens, positions, mask, k_caches, v_caches)
        if last_only:
            h = h[-1:]
        return self.output(h.to(self.act_dtype)).float()

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
               run_block: Callable | None = None) -> torch.Tensor:
        """The final norm's output [T, D] (fp32), the output layer's input. `run_block(i, block, *args)` runs block i
        instead of `block(*args)`: training runs the blocks below its lowest trained layer without gradients, and
        recomputes the others in the backward (`edgewise.personalize`)."""
        h = self.embedding.rows(tokens)
        if self.embedding_scale != 1.0:
            h = h * self.embedding_scale
        rope = (self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions))
        if self.has_local:
            rope_local = (self.rope_cos_local.index_select(0, positions), self.rope_sin_local.index_select(0, positions))
            mask_local = sliding_window_mask(mask, positions, self.cfg.sliding_window)
        for i, (block, k_cache, v_cache) in enumerate(zip(self.blocks, k_caches, v_caches)):
            args = (h, *rope_local, positions, mask_local) if block.local else (h, *rope, positions, mask)
            args = (*args, k_cache, v_cache, self.act_dtype)
            h = block(*args) if run_block is None else run_block(i, block, *args)
        return self.norm(h)

    def new_cache(self, capacity: int, layers: int | None = None) -> KVCache:
        """A K/V cache of `capacity` tokens for every layer (or the first `layers`)."""
        return KVCache.allocate(self.cfg, capacity, cache_dtype(self.precision), layers)

    @classmethod
    def from_gguf(
        cls, gguf: GGUFFile, precision: Precision = "quant", progress=None, act_bits: dict[str, int] | None = None, ffn_of_layer: Callable[[int], nn.Module] | None = None,
        embedding: nn.Module | None = None,
    ) -> "Llama":
        """Build the decoder from a GGUF; `act_bits` overrides `ACT_BITS` and the architecture's own (the native
        kernels' input rounding per role).
        `ffn_of_layer(i)` supplies layer i's FFN instead of loading it (the flash engine, whose GGUF has no FFN tensors);
        `embedding` the token embedding of an untied model (the streaming engine keeps it memory-mapped)."""
        cfg = ModelConfig.from_gguf(gguf)
        check_tensor_types(gguf)
        check_tensor_shapes(gguf, cfg)
        bits = layer_act_bits(cfg, act_bits)
        if embedding is not None and cfg.tied_embeddings:
            raise ValueError("a tied embedding is the output layer too: it cannot be supplied")
        embedding = embedding or load_embedding(gguf.tensor("token_embd.weight"), precision, tied=cfg.tied_embeddings, act_bits=bits["output"])
        output = embedding if cfg.tied_embeddings else load_linear(gguf.tensor("output.weight"), precision, act_bits=bits["output"])
        blocks = []
        for i in range(cfg.n_layers):
            blocks.append(load_block(gguf, cfg, i, precision, bits, ffn_of_layer(i) if ffn_of_layer is not None else None))
            if progress is not None:
                progress(i + 1, cfg.n_layers)
        return cls(cfg, precision, embedding, blocks, load_norm(gguf, cfg, "output_norm.weight"), output).eval()


def layer_act_bits(cfg: ModelConfig, overrides: dict[str, int] | None = None) -> dict[str, int]:
    """The native kernels' input rounding per layer role: `ACT_BITS`, then the architecture's, then `overrides`."""
    return {**ACT_BITS, **dict(cfg.traits.act_bits), **(overrides or {})}


def load_norm(gguf: GGUFFile, cfg: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(dequantize(gguf.tensor(name)), cfg.norm_eps)


def load_block(gguf: GGUFFile, cfg: ModelConfig, i: int, precision: Precision, bits: dict[str, int], ffn: nn.Module | None = None) -> Block:
    """Block i from the GGUF; `ffn` replaces its FFN (then the FFN tensors are not read)."""
    traits = cfg.traits
    q_order = rope_row_order(cfg.n_heads, cfg.head_dim) if traits.rope_permuted else None
    k_order = rope_row_order(cfg.n_kv_heads, cfg.head_dim) if traits.rope_permuted else None
    t = lambda name, kind="weight": gguf.tensor(f"blk.{i}.{name}.{kind}")  # noqa: E731
    bias = None
    if traits.qkv_bias:
        bias = torch.cat([dequantize(t(name, "bias"))[order] if order is not None else dequantize(t(name, "bias")) for name, order in (("attn_q", q_order), ("attn_k", k_order), ("attn_v", None))])
    attn = Attention(
        load_fused_linear([t("attn_q"), t("attn_k"), t("attn_v")], precision, [q_order, k_order, None], bits["attn_qkv"]),
        load_linear(t("attn_output"), precision, act_bits=bits["attn_output"]),
        cfg,
        qkv_bias=bias,
        q_norm=load_norm(gguf, cfg, f"blk.{i}.attn_q_norm.weight") if traits.qk_norm else None,
        k_norm=load_norm(gguf, cfg, f"blk.{i}.attn_k_norm.weight") if traits.qk_norm else None,
    )
    if ffn is None:
        ffn = FeedForward(
            load_fused_linear([t("ffn_gate"), t("ffn_up")], precision, [None, None], bits["ffn_gate_up"]),
            load_linear(t("ffn_down"), precision, act_bits=bits["ffn_down"]),
            traits.ffn_activation,
        )
    post = (load_norm(gguf, cfg, f"blk.{i}.post_attention_norm.weight"), load_norm(gguf, cfg, f"blk.{i}.post_ffw_norm.weight")) if traits.post_norms else (None, None)
    return Block(load_norm(gguf, cfg, f"blk.{i}.attn_norm.weight"), attn, load_norm(gguf, cfg, f"blk.{i}.ffn_norm.weight"), ffn, *post, local=cfg.is_local(i))


def sliding_window_mask(mask: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """`mask` with the cache slots at least `window` positions before each token masked (a sliding-window layer's)."""
    slots = torch.arange(mask.shape[-1], device=mask.device)
    return mask.masked_fill(positions[:, None] - slots[None, :] >= window, float("-inf"))


def causal_mask(start: int, n_tokens: int, width: int | None = None) -> torch.Tensor:
    """Additive mask [n_tokens, width] for tokens at positions start..start+n_tokens-1 over
    cache slots 0..width-1 (width defaults to start + n_tokens; wider slots are masked)."""
    width = start + n_tokens if width is None else width
    slots = torch.arange(width)
    pos = torch.arange(start, start + n_tokens)[:, None]
    return torch.where(slots[None, :] <= pos, 0.0, float("-inf")).to(torch.float32)



