"""The perplexity scorer's two rules against a hand count: every position, or llama-perplexity's (second half of
each window, a BOS first where the tokenizer adds one), on logits whose loss at each position is known."""

from __future__ import annotations

import math

import pytest
import torch

from edgewise.errors import EdgewiseError
from edgewise.metrics.perplexity import perplexity

VOCAB = 16


def peaked(window: list[int]) -> torch.Tensor:
    """Logits whose row p puts weight p (its position) on the token the window holds at p + 1, 0 elsewhere."""
    logits = torch.zeros(len(window), VOCAB)
    for p in range(len(window) - 1):
        logits[p, window[p + 1]] = float(p)
    return logits


def nll_at(p: int) -> float:
    return -math.log(math.exp(p) / (math.exp(p) + VOCAB - 1))


@pytest.mark.parametrize("pieces", [1, 3])
def test_every_position_or_the_second_half(pieces):
    ids = [(7 * i + 3) % VOCAB for i in range(40)]
    ctx = 8

    def logits_of(window):  # in `pieces` consecutive chunks, as a model that prefills in chunks yields them
        out = peaked(window)
        return out if pieces == 1 else iter(torch.tensor_split(out, pieces))

    every = perplexity(logits_of, ids, ctx)
    assert every.n_predicted == 5 * 7 and every.nll_sum == pytest.approx(5 * sum(nll_at(p) for p in range(7)), rel=1e-6)
    half = perplexity(logits_of, ids, ctx, scoring="llama.cpp")
    assert half.n_predicted == 5 * 3 and half.nll_sum == pytest.approx(5 * sum(nll_at(p) for p in range(4, 7)), rel=1e-6)


def test_llama_cpp_rule_puts_bos_first():
    seen = []

    def logits_of(window):
        seen.append(list(window))
        return peaked(window)

    perplexity(logits_of, list(range(1, 16)) + [1], 8, scoring="llama.cpp", bos_id=0)
    assert seen == [[0, 2, 3, 4, 5, 6, 7, 8], [0, 10, 11, 12, 13, 14, 15, 1]]
    with pytest.raises(EdgewiseError, match="unknown scoring rule"):
        perplexity(logits_of, list(range(16)), 8, scoring="half")
