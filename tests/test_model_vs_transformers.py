"""Our decoder against transformers, which loads the same GGUF and dequantizes it to fp32."""

from __future__ import annotations

import pytest
import torch

from tests.quality import quant_vs_fp32_perplexity

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Once upon a time, there was a little girl who lived in a village near the forest.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:",
]

# fp32 path: same weights, same math, different summation order -> agreement to ~1e-4 on logits of size ~30.
FP32_LOGIT_ATOL = 2e-3


def _ours(lm, ids):
    cache = lm.new_cache(len(ids))
    return lm.prefill(ids, cache, last_only=False)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp32_logits_match_transformers(lm_fp32, hf_model, prompt):
    ids = lm_fp32.tokenizer.encode(prompt)
    ours = _ours(lm_fp32, ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=FP32_LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp32_greedy_generation_is_token_identical(lm_fp32, hf_model, prompt):
    """Both stop at the end-of-turn token; the three plain prompts run the full 32 tokens."""
    ids = lm_fp32.tokenizer.encode(prompt)
    ours = list(lm_fp32.generate(ids, 32))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    assert ours == out[0, len(ids) :].tolist()
    if not prompt.startswith("<|im_start|>"):
        assert len(ours) == 32


def test_quantized_logits_stay_close_to_fp32(lm_quant, hf_model):
    """The GGUF's quantized weights exactly; activations rounded per block of 32, to int8 in gate|up and the
    attention output, int16 elsewhere (model.ACT_BITS). Measured: max |dlogit| 2.2 on logits of magnitude
    ~33, top-1 agreement 97.9% (47 positions); all-int16: 0.38 and 100%. Perplexity is the quality bar."""
    ids = lm_quant.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[3])
    ours = _ours(lm_quant, ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    deviation = (ours - ref).abs().max().item()
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"quantized vs fp32: max |dlogit| = {deviation:.3f}, top-1 agreement = {agreement:.3f}")
    assert deviation < 3.0
    assert agreement >= 0.95


def test_quantized_perplexity_within_half_a_percent_of_fp32(lm_fp32, lm_quant):
    """The issue's quality bar, on 4 windows x 512 tokens of Austen (benchmarks/decode.py runs 16k tokens).
    Measured +0.12% with model.ACT_BITS (all-int16 +0.01%, all-int8 as llama.cpp +0.58%)."""
    fp32, quant = quant_vs_fp32_perplexity(lm_fp32, lm_quant, 2048)
    assert abs(quant / fp32 - 1) < 0.005
