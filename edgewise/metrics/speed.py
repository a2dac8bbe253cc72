"""Decode speed of a loaded model: the median over a few runs, the figure the compression benchmarks report."""

from __future__ import annotations

import statistics

SPEED_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def median_decode_tok_s(lm, runs: int = 3, tokens: int = 48, prompt: str = SPEED_PROMPT) -> float:
    """Median decode tok/s of `lm` (a `LanguageModel`) over `runs` greedy generations of `tokens` new tokens from
    `prompt` (no stop at end-of-text, so every run decodes the same count)."""
    ids = lm.tokenizer.encode(prompt)
    speeds = []
    for _ in range(runs):
        for _token in lm.generate(ids, tokens, stop_at_eot=False):
            pass
        speeds.append(lm.last_stats.decode_tok_s)
    return statistics.median(speeds)
