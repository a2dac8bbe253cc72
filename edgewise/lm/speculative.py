"""Speculative decoding with prompt lookup: drafts from the text itself, checked by one pass of the model.

A draft is a guess at the next few tokens; the model checks a whole draft in one forward pass over
[last token, draft...] and keeps the longest prefix it agrees with, plus the token it predicts after
that prefix. Under greedy decoding the output is the plain greedy output token for token, while every
pass yields one token or more. Not only up to rounding: in a check of up to `exact_rows()` tokens each
row is computed bit for bit as decode computes it (the kernels' batch invariance, kernels/blocks.h:
row by row, or for the K-quants' int8 kernel in tiles whose rows' arithmetic does not depend on the
tile); a longer batch would group float sums differently in the other kernels, and with int8 activations that
moves logits by tenths, enough to flip a close argmax. (The compiled decode step is fused by inductor
and rounds differently again; the checks run eagerly, so the guarantee is against eager decoding.)

That pays where a pass costs more than its arithmetic: a model whose weights stream from flash reads
each streamed byte once per pass, so k accepted tokens share one read of the weights.

*Prompt lookup* (Saxena 2023) needs no draft model: the last n tokens of the context are looked up
earlier in the context (the prompt and what has been generated), and the tokens that followed that
occurrence are the draft. Code repeats itself (names, signatures, patterns), so drafts are often right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgewise.errors import EdgewiseError
from edgewise.trial import MeasuredChoice


@dataclass(frozen=True)
class PromptLookup:
    """Drafts of up to `draft` tokens: the tokens after the latest earlier occurrence of the context's last
    n-gram, for n from `max_ngram` down to `min_ngram` (the longest match wins)."""

    draft: int = 4
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        from edgewise.kernels import exact_rows

        if not 1 <= self.draft <= exact_rows() - 1:
            raise EdgewiseError(f"speculative draft length {self.draft}: expected 1 to {exact_rows() - 1} tokens "
                                f"(a check of the last token and the draft is exact up to {exact_rows()} rows)")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise EdgewiseError(f"prompt lookup n-grams {self.min_ngram}..{self.max_ngram}: expected 1 <= min <= max")

    def propose(self, context: list[int], limit: int | None = None) -> list[int]:
        """The draft after `context` (at most `limit` tokens); [] when no n-gram recurs."""
        k = self.draft if limit is None else min(self.draft, limit)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):  # latest occurrence first, not the tail itself
                if context[start : start + n] == tail:
                    follow = context[start + n : start + n + k]
                    if follow:
                        return follow
        return []


class DraftPolicy:
    """How many of a draft's tokens to check this pass; 0 is a plain pass.

    Drafts pay where a pass costs about the same for a few rows as for one (weights read from flash), not where
    the compute of the extra rows dominates (weights in RAM); in between, a short check can pay where a long one
    does not: on the AVX2 test machine a check of 5 rows cost 1.4-2.3x a plain pass with half of
    Qwen2.5-Coder-1.5B streamed, while about half of the drafted tokens were accepted. The policy chooses the
    length with the least expected seconds per yielded token, from two estimates:
    - seconds per pass of each length (0, the powers of two below the draft's length, the whole draft),
      measured (`edgewise.trial.MeasuredChoice`: each length tried once, then the best, and every
      `explore`-th choice the stalest, so the estimates follow the machine and the cache);
    - tokens per pass: 1 + the expected accepted prefix, from how often each draft position was accepted
      once reached, pooled over every check (a check of 4 tokens informs the first 2 too). Pooled counts
      settle in a few checks, where the seconds per token of single passes swing with each draft's luck.
    """

    def __init__(self, explore: int = 8, smoothing: float = 0.25):
        self.trial = MeasuredChoice(explore, smoothing)  # option: draft tokens checked; cost: seconds per pass
        self.reached: list[int] = []  # [j]: checks that reached draft position j + 1 (all before it accepted)
        self.accepted: list[int] = []  # [j]: of those, the checks that accepted it

    def expected_tokens(self, length: int) -> float:
        """Tokens a check of `length` draft tokens is expected to yield (1 for a plain pass); a position not yet
        reached counts as accepted half the time (a uniform prior)."""
        tokens, reach = 1.0, 1.0
        for j in range(length):
            n, a = (self.reached[j], self.accepted[j]) if j < len(self.reached) else (0, 0)
            reach *= (a + 1) / (n + 2)
            tokens += reach
        return tokens

    def length(self, available: int) -> int:
        """Draft tokens to check this pass, of the `available` ones proposed (0: a plain pass)."""
        if available <= 0:
            return 0
        options, k = [available], 1
        while k < available:
            options.append(k)
            k *= 2
        return self.trial.choose(sorted(options, reverse=True) + [0],  # the whole draft tried first, a plain pass last
                                 score=lambda k, seconds: seconds / self.expected_tokens(k))

    def record(self, length: int, seconds: float, tokens: int) -> None:
        """A pass that checked `length` draft tokens (0: plain) took `seconds` and yielded `tokens` (the accepted
        prefix and the model's own next token)."""
        self.trial.record(length, seconds)
        accepted = tokens - 1
        for j in range(min(accepted + 1, length)):  # positions reached: the accepted ones and the first rejected
            if j == len(self.reached):
                self.reached.append(0)
                self.accepted.append(0)
            self.reached[j] += 1
            self.accepted[j] += j < accepted


@dataclass
class SpeculationStats:
    """What the drafts bought: passes after the prompt's, tokens drafted and accepted."""

    passes: int = 0  # forward passes after the prompt's (one per decoded token without speculation)
    drafted: int = 0
    accepted: int = 0
    checks: int = 0  # passes that checked a draft (the policy skips drafts where they do not pay)
    lengths: dict[int, int] = field(default_factory=dict)  # draft tokens checked -> checks of that length (the policy's choice)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def tokens_per_pass(self, new_tokens: int) -> float:
        """New tokens after the first (the prompt's pass gives that one) per pass."""
        return (new_tokens - 1) / self.passes if self.passes else 0.0

    def line(self, new_tokens: int) -> str:
        lengths = ", ".join(f"{n} of {k}" for k, n in sorted(self.lengths.items(), reverse=True))
        return (f"speculation: {self.accepted}/{self.drafted} drafted tokens accepted ({self.acceptance:.0%}) in "
                f"{self.checks} of {self.passes} passes{f' (checks of {lengths} tokens)' if lengths else ''}, "
                f"{self.tokens_per_pass(new_tokens):.2f} tokens per pass")


def accept(draft: list[int], predicted: list[int]) -> list[int]:
    """The tokens a check yields: `predicted[j]` is the model's token after [last, draft[:j]] (len(draft) + 1
    of them); the draft's agreeing prefix, then the model's own next token."""
    n = 0
    while n < len(draft) and draft[n] == predicted[n]:
        n += 1
    return draft[:n] + [predicted[n]]
