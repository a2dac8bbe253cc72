"""The decoder walked one block at a time (`edgewise.lm.layerwise`) against the whole model held at once
(`Llama`, fp32): per-block streams and the vocabulary-sliced NLL equal the model's logits and
`perplexity`'s scoring, for llama (the default model), qwen2 (QKV biases, an untied head), qwen3
(q/k norms) and, marked slow, Gemma 3's sliding-window layers."""

from __future__ import annotations

import pytest
import torch

from edgewise.gguf_io import read_gguf
from edgewise.lm.layerwise import LayerWalk
from edgewise.lm.model import Llama, causal_mask
from edgewise.metrics.perplexity import perplexity
from edgewise.models import resolve_model
from tests.test_other_llama_gguf import write_tiny


def _dense_logits(model: Llama, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache(len(ids))
    with torch.no_grad():
        return model(torch.tensor(ids), torch.arange(len(ids)), causal_mask(0, len(ids)), cache.keys, cache.values)


def _check_walk_equals_model(path, n_windows: int, n_tokens: int, rel: float, logits_bytes: int = 1 << 20):
    gguf = read_gguf(path)
    walk = LayerWalk(gguf)
    windows = torch.randint(0, walk.cfg.vocab_size, (n_windows, n_tokens), generator=torch.Generator().manual_seed(0))
    h = walk.embed(windows)
    for i in range(walk.n_layers):
        h = walk.run_block(walk.block(i), h)
    assert h.shape == (n_windows, n_tokens, walk.cfg.dim)
    (nll, count), (nll_twice, _) = walk.nll([h, h.clone()], windows, logits_bytes=logits_bytes)  # many vocabulary slices
    model = Llama.from_gguf(gguf, "fp32")
    ref = perplexity(lambda w: _dense_logits(model, w), windows.reshape(-1).tolist(), n_tokens)
    assert count == ref.n_predicted == n_windows * (n_tokens - 1)
    assert nll == pytest.approx(ref.nll_sum, rel=rel) and nll_twice == pytest.approx(nll, rel=1e-6)
    # the stream leaving the last block is the model's: its logits at the last token of window 0
    logits = model.output(model.norm(h[0, -1:]))
    assert torch.allclose(logits, _dense_logits(model, windows[0].tolist())[-1:], rtol=1e-4, atol=1e-4)


def test_walk_equals_the_whole_model_on_the_default_model():
    _check_walk_equals_model(resolve_model(None), n_windows=2, n_tokens=48, rel=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_walk_equals_the_whole_model_on_other_architectures(arch, tmp_path):
    source = read_gguf(resolve_model(None))
    _check_walk_equals_model(write_tiny(source, tmp_path / f"{arch}.gguf", arch), n_windows=3, n_tokens=20, rel=1e-5, logits_bytes=1 << 16)


@pytest.mark.slow
def test_walk_equals_the_whole_model_across_gemma_sliding_windows():
    """600 tokens: past Gemma 3's 512-token window, so its local layers mask and rotate on their own."""
    _check_walk_equals_model(resolve_model("gemma-3-270m"), n_windows=1, n_tokens=600, rel=1e-5)
