"""Activation statistics for the compressor: the mean square of every linear layer's input, per input column,
over calibration text run through the runtime's own forward (the source model on its quantized kernels: the
statistics of its inputs, not a loss, so the fp32 reference would cost 3-4x the time for no difference). This is llama.cpp's importance matrix (`llama-imatrix`): the
diagonal of each layer's Hessian X^T X / T.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from edgewise.errors import EdgewiseError

MIN_CALIB_TOKENS = 1024  # below this, a column's mean square rests on too few tokens to rank its columns


def linear_inputs(lm) -> dict[str, list[torch.nn.Module]]:
    """GGUF weight name -> the module whose input multiplies it (fused Q/K/V and gate/up share one input)."""
    names: dict[str, list[torch.nn.Module]] = {}
    for i, block in enumerate(lm.model.blocks):
        p = f"blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v"):
            names[p + name + ".weight"] = [block.attn.wqkv]
        names[p + "attn_output.weight"] = [block.attn.wo]
        names[p + "ffn_gate.weight"] = names[p + "ffn_up.weight"] = [block.ffn.gate_up]
        names[p + "ffn_down.weight"] = [block.ffn.down]
    # a tied embedding is the output layer too: its columns meet the final hidden state
    names["token_embd.weight" if lm.cfg.tied_embeddings else "output.weight"] = [lm.model.output]
    return names


@torch.no_grad()
def importance(lm, ids: list[int], ctx: int = 512, progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Tensor name -> mean x^2 per input column, over windows of `ctx` tokens of `ids` (each from an empty cache)."""
    if len(ids) < MIN_CALIB_TOKENS:
        raise EdgewiseError(f"the calibration text has {len(ids)} tokens; the statistics need at least {MIN_CALIB_TOKENS} (give a longer --calib text)")
    ctx = min(ctx, lm.cfg.context_length)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def record(module, inputs):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        key = id(module)
        sums[key] = sums.get(key, 0) + (x * x).sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    modules = {id(m): m for ms in linear_inputs(lm).values() for m in ms}
    hooks = [m.register_forward_pre_hook(record) for m in modules.values()]
    try:
        cache = lm.new_cache(ctx)
        n_windows = len(ids) // ctx
        for w in range(n_windows):
            lm.prefill(ids[w * ctx : (w + 1) * ctx], cache, last_only=False)
            if progress is not None:
                progress(w + 1, n_windows)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[id(ms[0])] / counts[id(ms[0])]).numpy() for name, ms in linear_inputs(lm).items() if id(ms[0]) in sums}
