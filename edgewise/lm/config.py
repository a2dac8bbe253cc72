"""Llama-family hyper-parameters, read from GGUF metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    context_length: int
    rope_theta: float
    norm_eps: float
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "LlamaConfig":
        arch = gguf.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise EdgewiseError(
                f"{gguf.path}: architecture '{arch}' is not supported; edgewise runs {', '.join(SUPPORTED_ARCHITECTURES)}"
                " GGUF models (e.g. SmolLM2, TinyLlama, Llama 3)"
            )
        p = "llama."
        n_heads = int(gguf.require(p + "attention.head_count"))
        n_kv = int(gguf.metadata.get(p + "attention.head_count_kv", n_heads))
        dim = int(gguf.require(p + "embedding_length"))
        vocab = gguf.metadata.get(p + "vocab_size")
        if vocab is None:
            vocab = len(gguf.require("tokenizer.ggml.tokens"))
        if dim % n_heads or n_heads % n_kv:
            raise EdgewiseError(f"{gguf.path}: inconsistent heads: dim {dim}, {n_heads} heads, {n_kv} KV heads")
        rope_dims = gguf.metadata.get(p + "rope.dimension_count", dim // n_heads)
        if rope_dims != dim // n_heads:
            raise EdgewiseError(f"{gguf.path}: partial RoPE ({rope_dims} of {dim // n_heads} dims) is not supported")
        if gguf.metadata.get(p + "rope.scaling.type") not in (None, "none"):
            raise EdgewiseError(f"{gguf.path}: RoPE scaling '{gguf.metadata[p + 'rope.scaling.type']}' is not supported")
        return cls(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(gguf.require(p + "block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            ffn_dim=int(gguf.require(p + "feed_forward_length")),
            context_length=int(gguf.require(p + "context_length")),
            rope_theta=float(gguf.metadata.get(p + "rope.freq_base", 10000.0)),
            norm_eps=float(gguf.metadata.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
            tied_embeddings="output.weight" not in gguf.tensors,
        )
