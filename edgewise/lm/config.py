"""Decoder hyper-parameters, read from GGUF metadata, and the one table of how architectures differ.

Every architecture edgewise runs is the same pre-norm decoder (`edgewise.lm.model`); `ARCHITECTURES`
says, per GGUF `general.architecture`, which of its variations it uses. Adding an architecture of
this family is one row here (plus its tensor names, if they differ from llama.cpp's).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile


@dataclass(frozen=True)
class ArchTraits:
    """How one architecture departs from Llama's decoder."""

    rope_permuted: bool = False  # Q/K rows stored interleaved for llama.cpp's pairwise RoPE (llama); else NeoX halves
    qkv_bias: bool = False  # Q, K and V projections have biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3)
    ffn_activation: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    post_norms: bool = False  # RMSNorm after attention and after the FFN too, before each residual add (Gemma 3)
    scale_embedding: bool = False  # token embeddings multiplied by sqrt(dim) (Gemma)
    sliding_window_pattern: int = 0  # every n-th layer global, the others sliding-window (Gemma 3: 6); 0 = all global
    rope_theta_local: float | None = None  # RoPE base of the sliding-window layers (Gemma 3: 10000)
    # How finely the native kernels round each layer role's input activations, where measured to differ
    # from model.ACT_BITS (int16 where int8 cost SmolLM2 perplexity).
    act_bits: tuple[tuple[str, int], ...] = ()


# Int8 activations on the K-quant kernels: a step per block of 32 that is a 5-bit multiple of one scale
# per super-block of 256 (kernels/blocks.h, ActivationsK), so that a super-block sums exactly in int32.
# Measured against the fp32 dequantized model on 1024 tokens of Austen in windows of 512: Qwen2.5-Coder-1.5B
# all-int8 +0.24% (all-int16 +0.11%); Gemma-3-270M all-int8 +0.61%, with the FFN's gate/up input at int16
# +0.11% (its post-norm hidden state has outlier channels; ggml's one scale per 256 cost it +1.6%).
# int8 runs the K-quant kernel about 1.4x faster per row than int16's per-block float scaling.
ALL_INT8 = tuple((role, 8) for role in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down", "output"))
GEMMA3_ACT_BITS = tuple((role, 16 if role == "ffn_gate_up" else bits) for role, bits in ALL_INT8)


ARCHITECTURES: dict[str, ArchTraits] = {
    "llama": ArchTraits(rope_permuted=True),
    "qwen2": ArchTraits(qkv_bias=True, act_bits=ALL_INT8),
    "qwen3": ArchTraits(qk_norm=True, act_bits=ALL_INT8),
    # GGUF stores Gemma's (1 + w) RMSNorm gains with the 1 already added, so its norms are plain RMSNorm here.
    "gemma3": ArchTraits(qk_norm=True, ffn_activation="gelu_tanh", post_norms=True, scale_embedding=True, sliding_window_pattern=6, rope_theta_local=10_000.0, act_bits=GEMMA3_ACT_BITS),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
MAX_CONTEXT = 1 << 20  # tokens edgewise serves (RoPE tables are built for all of them); a longer stated context (up to 2^24) is cut to it


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    context_length: int
    rope_theta: float
    norm_eps: float
    tied_embeddings: bool
    sliding_window: int = 0  # tokens a sliding-window layer sees (itself included); 0 = none

    @property
    def traits(self) -> ArchTraits:
        return ARCHITECTURES[self.arch]

    @property
    def embedding_scale(self) -> float:
        return math.sqrt(self.dim) if self.traits.scale_embedding else 1.0

    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends through a sliding window (Gemma 3: five local layers, then one global)."""
        n = self.traits.sliding_window_pattern
        return bool(n and self.sliding_window and (layer + 1) % n != 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelConfig":
        arch = gguf.require("general.architecture")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise EdgewiseError(
                f"{gguf.path}: architecture '{arch}' is not supported; edgewise runs {', '.join(SUPPORTED_ARCHITECTURES)}"
                " GGUF models (e.g. SmolLM2, Llama 3, Qwen2.5, Qwen3, Gemma 3)"
            )
        p = arch + "."

        def number(key: str, low: float, high: float, default=None, kind=int):
            """A hyper-parameter within the range any real model has, else an error naming the key."""
            value = gguf.metadata.get(p + key, default) if default is not None else gguf.require(p + key)
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and low <= value <= high
            if not ok or (kind is int and value != int(value)):
                raise EdgewiseError(f"{gguf.path}: metadata '{p + key}' is {value!r}; expected {'an integer' if kind is int else 'a number'} in {low}..{high}")
            return kind(value)

        n_heads = number("attention.head_count", 1, 1024)
        n_kv = number("attention.head_count_kv", 1, 1024, default=n_heads)
        dim = number("embedding_length", 1, 1 << 16)
        head_dim = number("attention.key_length", 2, 1024, default=dim // n_heads if dim % n_heads == 0 else 2)
        if number("attention.value_length", 2, 1024, default=head_dim) != head_dim:
            raise EdgewiseError(f"{gguf.path}: keys and values of different lengths are not supported")
        vocab = gguf.metadata.get(p + "vocab_size")
        if vocab is None:
            vocab = len(gguf.require("tokenizer.ggml.tokens", list))
        else:
            vocab = number("vocab_size", 1, 1 << 22)
        if head_dim % 2 or n_heads % n_kv or (p + "attention.key_length" not in gguf.metadata and dim % n_heads):
            raise EdgewiseError(f"{gguf.path}: inconsistent heads: dim {dim}, {n_heads} heads of {head_dim}, {n_kv} KV heads")
        rope_dims = gguf.metadata.get(p + "rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise EdgewiseError(f"{gguf.path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
        if gguf.metadata.get(p + "rope.scaling.type") not in (None, "none"):
            raise EdgewiseError(f"{gguf.path}: RoPE scaling '{gguf.metadata[p + 'rope.scaling.type']}' is not supported")
        return cls(
            arch=arch,
            vocab_size=int(vocab),
            dim=dim,
            n_layers=number("block_count", 1, 1024),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn_dim=number("feed_forward_length", 1, 1 << 20),
            context_length=served_context(number("context_length", 1, 1 << 24), gguf),
            rope_theta=number("rope.freq_base", 1.0, 1e12, default=10000.0, kind=float),
            norm_eps=number("attention.layer_norm_rms_epsilon", 0.0, 1.0, default=1e-5, kind=float),
            tied_embeddings="output.weight" not in gguf.tensors,
            sliding_window=number("attention.sliding_window", 0, MAX_CONTEXT, default=0) if ARCHITECTURES[arch].sliding_window_pattern else 0,
        )


def served_context(stated: int, gguf: GGUFFile) -> int:
    if stated > MAX_CONTEXT:
        warnings.warn(f"{gguf.path.name}: states a context of {stated} tokens; edgewise serves the first {MAX_CONTEXT}", stacklevel=3)
    return min(stated, MAX_CONTEXT)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape (PyTorch order) as the config implies it, by name with "N" for the layer."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        "token_embd.weight": (cfg.vocab_size, cfg.dim), "output.weight": (cfg.vocab_size, cfg.dim), "output_norm.weight": (cfg.dim,),
        "blk.N.attn_norm.weight": (cfg.dim,), "blk.N.ffn_norm.weight": (cfg.dim,),
        "blk.N.post_attention_norm.weight": (cfg.dim,), "blk.N.post_ffw_norm.weight": (cfg.dim,),
        "blk.N.attn_q.weight": (q, cfg.dim), "blk.N.attn_k.weight": (kv, cfg.dim), "blk.N.attn_v.weight": (kv, cfg.dim),
        "blk.N.attn_q.bias": (q,), "blk.N.attn_k.bias": (kv,), "blk.N.attn_v.bias": (kv,), "blk.N.attn_output.weight": (cfg.dim, q),
        "blk.N.attn_q_norm.weight": (cfg.head_dim,), "blk.N.attn_k_norm.weight": (cfg.head_dim,),
        "blk.N.ffn_gate.weight": (cfg.ffn_dim, cfg.dim), "blk.N.ffn_up.weight": (cfg.ffn_dim, cfg.dim), "blk.N.ffn_down.weight": (cfg.dim, cfg.ffn_dim),
    }  # fmt: skip


def check_tensor_shapes(gguf: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor the decoder reads has the shape its metadata implies (a damaged dimension would
    otherwise surface deep in a kernel), and layer numbers stay below block_count."""
    shapes = expected_shapes(cfg)
    for name, t in gguf.tensors.items():
        parts = name.split(".")
        key = name
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
            if int(parts[1]) >= cfg.n_layers:
                raise EdgewiseError(f"{gguf.path}: tensor '{name}' is for layer {parts[1]}, but the model has {cfg.n_layers} layers (block_count)")
            key = ".".join(["blk", "N", *parts[2:]])
        if key in shapes and tuple(t.shape) != shapes[key]:
            raise EdgewiseError(
                f"{gguf.path}: tensor '{name}' has shape {list(t.shape)}, but the metadata (dim {cfg.dim}, {cfg.n_heads} heads of {cfg.head_dim},"
                f" {cfg.n_kv_heads} KV heads, FFN {cfg.ffn_dim}, vocabulary {cfg.vocab_size}) implies {list(shapes[key])}: the file is damaged or converted wrongly"
            )
