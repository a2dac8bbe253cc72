"""Activation statistics for the compressor: the mean square of every linear layer's input, per input column,
over calibration text run through the runtime's own forward (the source model on its quantized kernels: the
statistics of its inputs, not a loss, so the fp32 reference would cost 3-4x the time for no difference). This is llama.cpp's importance matrix (`llama-imatrix`): the
diagonal of each layer's Hessian X^T X / T; the whole Hessian for error-compensating rounding (`gptq`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from edgewise.errors import EdgewiseError

MIN_CALIB_TOKENS = 1024  # below this, a column's mean square rests on too few tokens to rank its columns
# The weight of each window's first token in the statistics: it is the attention sink, which every later query
# attends to, so an error in its keys and values reaches every position. GPTQ on SmolLM2-135M to Q4_0 (8192 tokens
# of Shakespeare, held-out Shakespeare 8192 tokens): weight 1, ppl 40.99 (worse than scale search alone, 39.88);
# weight 64, 38.57; weight 512, 39.26 (source 37.35). Chosen there; the benchmark scores Austen.
SINK_WEIGHT = 64.0


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
def second_moments(
    lm, ids: list[int], ctx: int = 512, full: bool = False, sink_weight: float = 1.0, progress: Callable[[int, int], None] | None = None
) -> dict[str, torch.Tensor]:
    """Tensor name -> E[x x^T] of its input over windows of `ctx` tokens of `ids` (each from an empty cache): the
    layer's Hessian H = X^T X / T (fp32 [in, in]) with `full`, else only its diagonal, the mean x^2 per column
    (fp64 [in]). Tensors that share an input share one tensor object."""
    if len(ids) < MIN_CALIB_TOKENS:
        raise EdgewiseError(f"the calibration text has {len(ids)} tokens; the statistics need at least {MIN_CALIB_TOKENS} (give a longer --calib text)")
    ctx = min(ctx, lm.cfg.context_length)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def record(module, inputs):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        if sink_weight != 1.0:  # the window's first token: every later query attends to it
            x = torch.cat([x[:1] * sink_weight**0.5, x[1:]])
        key = id(module)
        if full:
            x = x.float()
            if key not in sums:
                sums[key] = torch.zeros(x.shape[1], x.shape[1])
            sums[key].addmm_(x.T, x)
        else:
            x = x.double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    inputs = linear_inputs(lm)
    modules = {id(m): m for ms in inputs.values() for m in ms}
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
    for key in sums:
        sums[key] /= counts[key]
    return {name: sums[id(ms[0])] for name, ms in inputs.items() if id(ms[0]) in sums}


def importance(lm, ids: list[int], ctx: int = 512, progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Tensor name -> mean x^2 per input column (llama.cpp's importance matrix)."""
    return {name: m.numpy() for name, m in second_moments(lm, ids, ctx, progress=progress).items()}
