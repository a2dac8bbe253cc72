"""The decoder walked one block at a time, for ahead-of-time work over a whole model in bounded memory.

`Llama` holds every layer at once: in fp32 that is 4 bytes per weight (540 MB for SmolLM2-135M, 6 GB
for a 1.5B model) before any activation. Work that runs a fixed set of token windows through the model
(calibrating a flash store, collecting statistics for compression) needs one block at a time. A
`LayerWalk` keeps the residual stream of every window ([W, T, D] fp32) and, layer by layer, builds the
block from the GGUF's memory map, runs every window through it and lets it go. The token embedding is
read only at the windows' tokens, and the output head one slice of the vocabulary at a time, so
neither is ever whole in fp32.

Peak memory: the residual streams the caller holds (4 W T D bytes each), one block's weights, one
window's KV cache, and logits for one vocabulary slice (`nll` sizes the slice to `logits_bytes`); plus
whatever the caller keeps per layer. Each window starts from an empty cache, as
`edgewise.metrics.perplexity` scores them, and the results equal `Llama`'s (the tests check it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from edgewise.gguf_io import GGUFFile
from edgewise.lm.config import ModelConfig, check_tensor_shapes
from edgewise.lm.model import Block, causal_mask, layer_act_bits, load_block, load_norm, rope_tables, sliding_window_mask
from edgewise.lm.weights import Precision, activation_dtype, cache_dtype, check_tensor_types, dequantize

LOGITS_BYTES = 64 << 20  # fp32 logits held at once by `nll`


class LayerWalk:
    """Windows of T tokens through a GGUF's decoder, one block at a time (see the module's docstring).

    walk = LayerWalk(gguf); h = walk.embed(windows)
    for i in range(walk.n_layers): h = walk.run_block(walk.block(i), h)
    nll_sum, count = walk.nll([h], windows)[0]
    """

    def __init__(self, gguf: GGUFFile, precision: Precision = "fp32", tick: Callable[[], object] | None = None):
        """`tick` is called after every window a block runs (e.g. `ThreadGovernor.tick`, so that the thread count
        follows the free CPUs through a long walk)."""
        self.gguf, self.cfg, self.precision, self.tick = gguf, ModelConfig.from_gguf(gguf), precision, tick
        check_tensor_types(gguf)
        check_tensor_shapes(gguf, self.cfg)
        self.bits = layer_act_bits(self.cfg)
        self.act_dtype = activation_dtype(precision)
        self._tables: dict[int, tuple] = {}

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def block(self, i: int) -> Block:
        return load_block(self.gguf, self.cfg, i, self.precision, self.bits).eval()

    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        """Token ids [W, T] -> the residual stream entering block 0, [W, T, D] fp32."""
        ids, inverse = torch.unique(windows, return_inverse=True)
        rows = dequantize(self.gguf.tensor("token_embd.weight"), ids.numpy())
        h = rows[inverse]
        return h * self.cfg.embedding_scale if self.cfg.embedding_scale != 1.0 else h

    def _positional(self, n_tokens: int) -> tuple:
        """Per-block arguments for a window of n_tokens from position 0: (cos, sin, positions, mask), global and local."""
        if n_tokens not in self._tables:
            cfg = self.cfg
            positions = torch.arange(n_tokens)
            mask = causal_mask(0, n_tokens)
            arguments = (*rope_tables(cfg.rope_theta, cfg.head_dim, n_tokens), positions, mask)
            local = None
            if any(cfg.is_local(i) for i in range(cfg.n_layers)):
                local = (*rope_tables(cfg.traits.rope_theta_local or cfg.rope_theta, cfg.head_dim, n_tokens), positions, sliding_window_mask(mask, positions, cfg.sliding_window))
            self._tables[n_tokens] = (arguments, local)
        return self._tables[n_tokens]

    @torch.no_grad()
    def run_block(self, block: Block, h: torch.Tensor) -> torch.Tensor:
        """Every window [W, T, D] through `block`, each from an empty cache; returns the new stream (same shape)."""
        n_windows, n_tokens, _ = h.shape
        arguments, local = self._positional(n_tokens)
        if block.local:
            arguments = local
        shape = (self.cfg.n_kv_heads, n_tokens, self.cfg.head_dim)
        dtype = cache_dtype(self.precision)
        k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        out = torch.empty_like(h)
        for w in range(n_windows):  # every slot is rewritten by the window's own tokens before it is read
            out[w] = block(h[w], *arguments, k_cache, v_cache, self.act_dtype)
            if self.tick is not None:
                self.tick()
        return out

    def _output_rows(self) -> tuple:
        cfg = self.cfg
        return self.gguf.tensor("token_embd.weight" if cfg.tied_embeddings else "output.weight"), cfg.vocab_size

    @torch.no_grad()
    def nll(self, streams: list[torch.Tensor], windows: torch.Tensor, logits_bytes: int = LOGITS_BYTES) -> list[tuple[float, int]]:
        """For each stream [W, T, D] leaving the last block: the summed negative log-likelihood of tokens 1..T-1 of
        each window given those before it, and their count (`edgewise.metrics.perplexity`'s scoring).
        The output head is read in vocabulary slices; all streams share each slice."""
        norm = load_norm(self.gguf, self.cfg, "output_norm.weight")
        x = torch.cat([norm(s[:, :-1].reshape(-1, s.shape[-1])) for s in streams]).to(self.act_dtype)  # [S * W * (T-1), D]
        targets = windows[:, 1:].reshape(-1).repeat(len(streams))
        head, vocab = self._output_rows()
        step = max(256, logits_bytes // (4 * x.shape[0]))
        lse = torch.full((x.shape[0],), float("-inf"))
        target_logit = torch.zeros(x.shape[0])
        for start in range(0, vocab, step):
            rows = np.arange(start, min(vocab, start + step))
            logits = (x @ dequantize(head, rows).to(x.dtype).T).float()  # [N, slice]
            lse = torch.logaddexp(lse, logits.logsumexp(-1))
            inside = (targets >= start) & (targets < start + len(rows))
            target_logit[inside] = logits[inside, targets[inside] - start]
        per_token = (lse - target_logit).reshape(len(streams), -1)
        return [(float(row.double().sum()), row.numel()) for row in per_token]
