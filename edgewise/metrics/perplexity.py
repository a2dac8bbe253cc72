"""Perplexity over non-overlapping windows, the way llama.cpp's `perplexity` tool and most papers count it.

Two scoring rules over the same windows (`SCORING`):
- "all": every position of a window predicts the next token (ctx - 1 predictions per window);
- "llama.cpp": llama-perplexity's own rule: only the second half of each window is scored (positions ctx/2 to
  ctx - 2, each with at least ctx/2 tokens of context), and where the model's tokenizer adds a BOS token, each
  window's first token is replaced by it. The same file then gets the same number from both tools, up to
  their kernels' rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgewise.errors import EdgewiseError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_predicted: int
    n_windows: int
    ctx: int


SCORING = ("all", "llama.cpp")


def perplexity(
    logits_of: Callable[[list[int]], torch.Tensor],
    ids: list[int],
    ctx: int,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    scoring: str = "all",
    bos_id: int | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over windows of `ctx` tokens cut from the first `max_tokens` of `ids`.

    Each window starts from an empty cache; within it, token t is predicted from tokens < t,
    so a window of ctx tokens scores ctx - 1 predictions. A trailing partial window is dropped.
    `logits_of(window)` returns fp32 logits [len(window), vocab], or an iterable of consecutive pieces of them
    (`LanguageModel.prefill_chunks`), each scored and dropped before the next: a large vocabulary's logits for a
    whole window need not be in memory at once. `scoring` is one of `SCORING`; `bos_id` (llama.cpp's rule only):
    the BOS token that replaces each window's first token, None where the tokenizer adds none.
    """
    if scoring not in SCORING:
        raise EdgewiseError(f"unknown scoring rule '{scoring}': choose one of {', '.join(SCORING)}")
    if ctx < 2:
        raise EdgewiseError(f"--ctx must be at least 2 (got {ctx})")
    ids = ids[:max_tokens] if max_tokens else ids
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise EdgewiseError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    first = ctx // 2 if scoring == "llama.cpp" else 0  # the first position scored
    nll, count = 0.0, 0
    for w in range(n_windows):
        window = ids[w * ctx : (w + 1) * ctx]
        if scoring == "llama.cpp" and bos_id is not None:
            window = [bos_id, *window[1:]]
        out = logits_of(window)
        at = 0  # position of the piece's first row in the window
        for logits in [out] if isinstance(out, torch.Tensor) else out:
            lo = max(first - at, 0)  # rows of this piece before the first scored position are skipped
            targets = window[at + 1 + lo : at + 1 + logits.shape[0]]  # the window's last row predicts nothing
            if targets:
                nll += float(F.cross_entropy(logits[lo : lo + len(targets)].float(), torch.tensor(targets), reduction="sum"))
            at += logits.shape[0]
        if at != len(window):
            raise EdgewiseError(f"the model scored {at} positions of a {len(window)}-token window")
        count += len(window) - 1 - first
        if progress is not None:
            progress(w + 1, n_windows)
    return PerplexityResult(math.exp(nll / count), nll, count, n_windows, ctx)
