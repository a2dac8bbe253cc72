"""One definition of the quality bar the language-model tests share: quantized perplexity against the
fp32 dequantized model, on the same Austen windows."""

from __future__ import annotations


def quant_vs_fp32_perplexity(lm_fp32, lm_quant, tokens: int, ctx: int = 512) -> tuple[float, float]:
    """(fp32 ppl, quantized ppl) over the first `tokens` tokens of Austen, in windows of `ctx`."""
    from edgewise.data.text import load_text
    from edgewise.metrics.perplexity import perplexity

    ids = lm_fp32.tokenizer.encode(load_text("austen")[: tokens * 20])
    results = []
    for lm in (lm_fp32, lm_quant):
        cache = lm.new_cache(ctx)
        results.append(perplexity(lambda w: lm.prefill(w, cache, last_only=False), ids, ctx, tokens).ppl)
    fp32, quant = results
    print(f"{lm_fp32.path.name}: ppl fp32 {fp32:.3f}, quant {quant:.3f} ({quant / fp32 - 1:+.2%})")
    return fp32, quant
