"""Speculative decoding with prompt lookup (`edgewise.lm.speculative`): the drafts and the acceptance rule
against hand-worked cases, and generation with drafts equal to plain greedy generation token for token,
on the dense model and on the streaming engine, where a pass reads the streamed weights once for all the
tokens it yields."""

from __future__ import annotations

import pytest
import torch

from edgewise.errors import EdgewiseError
from edgewise.flash.runtime import StreamingLanguageModel
from edgewise.lm.runtime import LanguageModel, Sampler
from edgewise.lm.speculative import DraftPolicy, PromptLookup, accept

# code and prose that repeat themselves, as prompts do: the lookup has something to find
PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "The cat sat on the mat. The dog sat on the log. The cat sat on the",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n    print(",
]


def test_the_draft_follows_the_latest_longest_match():
    lookup = PromptLookup(draft=3, max_ngram=2)
    #          0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 8, 5, 6, 9, 1, 2, 6]
    assert lookup.propose(context) == [9, 1, 2]  # the 1-gram [6]'s latest earlier occurrence is at 5
    assert lookup.propose([*context, 9]) == [1, 2, 6]  # [6, 9] matched at 5..6
    assert lookup.propose([5, 6, 7, 5, 6]) == [7, 5, 6]  # the 2-gram [5, 6] at 0 beats the 1-gram [6]
    assert lookup.propose([5, 6, 7, 5, 6], limit=1) == [7]
    assert lookup.propose([5, 6, 7, 5, 6], limit=0) == []
    assert lookup.propose([1, 2, 3]) == []  # nothing recurs
    assert lookup.propose([4]) == []
    assert PromptLookup(draft=2, min_ngram=2).propose([1, 2, 3, 2]) == []  # only [2] recurs, shorter than 2


def test_accept_keeps_the_agreeing_prefix_and_the_models_next_token():
    assert accept([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert accept([1, 2, 3], [1, 7, 3, 4]) == [1, 7]
    assert accept([1, 2, 3], [9, 2, 3, 4]) == [9]


@pytest.mark.parametrize("per_row, accepted, settles_on", [(0.05, 4, 4), (1.5, 2, 0), (0.3, 1, 1)])
def test_the_policy_checks_the_draft_length_that_pays(per_row, accepted, settles_on):
    """Synthetic passes: a pass of 1 + k rows costs 1 + per_row * k seconds and yields 1 + min(k, accepted) tokens.
    Read-bound (0.05 s a row) the whole draft pays; compute-bound (1.5 s a row, 2 accepted) no draft does; where only the first
    drafted token is right and a row costs 0.3 s, a draft of 1 is cheapest (0.65 s a token, against 0.8 for 2, 1.1
    for 4 and 1.0 plain). Explorations aside, the policy settles there."""
    policy = DraftPolicy(explore=8)
    seen = []
    for _ in range(100):
        k = policy.length(4)
        policy.record(k, 1 + per_row * k, 1 + min(k, accepted))
        seen.append(k)
    assert seen[:4] == [4, 2, 1, 0]  # each length once, the whole draft first
    assert seen[4:].count(settles_on) >= 80, seen
    assert policy.length(0) == 0  # no draft: a plain pass
    fresh, offered = DraftPolicy(), []
    for _ in range(4):  # a draft of 3 offers 3, 2, 1 and plain
        offered.append(fresh.length(3))
        fresh.record(offered[-1], 1.0, 1)
    assert offered == [3, 2, 1, 0]


def test_the_policy_pools_acceptance_over_checks():
    policy = DraftPolicy()
    policy.record(4, 1.0, 3)  # a check of 4 drafted tokens: the first 2 accepted, the 3rd rejected, the 4th not reached
    assert policy.reached == [1, 1, 1] and policy.accepted == [1, 1, 0]
    policy.record(1, 1.0, 1)  # a check of 1: rejected
    assert policy.reached == [2, 1, 1] and policy.accepted == [1, 1, 0]
    # position 1: (1 + 1) / (2 + 2); position 2: (1 + 1) / (1 + 2); position 3: (0 + 1) / (1 + 2); 4: 1/2 (never reached)
    p = [2 / 4, 2 / 3, 1 / 3, 1 / 2]
    assert policy.expected_tokens(0) == 1.0
    assert policy.expected_tokens(4) == pytest.approx(1 + p[0] + p[0] * p[1] + p[0] * p[1] * p[2] + p[0] * p[1] * p[2] * p[3])
    policy.record(0, 1.0, 1)  # a plain pass informs no position
    assert policy.reached == [2, 1, 1]


def test_bad_settings_are_refused():
    with pytest.raises(EdgewiseError, match="draft length 0"):
        PromptLookup(draft=0)
    with pytest.raises(EdgewiseError, match="draft length 8: expected 1 to 7"):
        PromptLookup(draft=8)
    with pytest.raises(EdgewiseError, match="n-grams 3..2"):
        PromptLookup(max_ngram=2, min_ngram=3)


@pytest.fixture(scope="module")
def dense():
    return LanguageModel.load(compile=False)


def _check_equal(lm, reference, n=32, **lookup):
    drafted = accepted = 0
    for prompt in PROMPTS:
        ids = reference.tokenizer.encode(prompt)
        want = list(reference.generate(ids, n, stop_at_eot=False))
        got = list(lm.generate(ids, n, stop_at_eot=False, lookup=PromptLookup(**lookup)))
        assert got == want, prompt
        spec = lm.last_stats.speculation
        assert spec.passes == n - 1 - spec.accepted  # every pass yields one token plus the draft tokens it accepted
        drafted, accepted = drafted + spec.drafted, accepted + spec.accepted
    assert accepted > 0 and drafted > accepted  # the drafts were used, and some were refused
    return accepted / drafted


def _check_logits_bit_for_bit(lm):
    """A check of T tokens (T up to exact_rows()) gives, row by row, the logits decode gives for each in turn."""
    from edgewise.kernels import exact_rows

    ids = lm.tokenizer.encode(PROMPTS[0])
    tokens = list(lm.generate(ids, exact_rows(), stop_at_eot=False))
    decoded_cache, checked_cache = lm.new_cache(len(ids) + exact_rows()), lm.new_cache(len(ids) + exact_rows())
    lm.prefill(ids, decoded_cache)
    decoded = torch.stack([lm.decode(token, len(ids) + i, decoded_cache) for i, token in enumerate(tokens)])
    for n in (2, exact_rows() // 2 + 1, exact_rows()):
        lm.prefill(ids, checked_cache)
        assert torch.equal(lm.prefill(tokens[:n], checked_cache, start=len(ids), last_only=False), decoded[:n]), n


def test_a_check_gives_decodes_logits_bit_for_bit(dense):
    _check_logits_bit_for_bit(dense)


def test_speculation_equals_greedy_token_for_token(dense):
    _check_equal(dense, dense, draft=4)
    _check_equal(dense, dense, draft=1, max_ngram=1)
    stats = dense.last_stats
    assert "drafted tokens accepted" in stats.line() and stats.new_tokens == 32


def test_speculation_on_the_streaming_engine_reads_once_per_pass(dense):
    lm = StreamingLanguageModel.open(budget="60%")
    _check_equal(lm, dense, draft=4)
    reads = lm.ring.stats.bytes_read
    list(lm.generate(dense.tokenizer.encode(PROMPTS[0]), 24, stop_at_eot=False, lookup=PromptLookup()))
    spec = lm.last_stats.speculation
    passes = spec.passes + 1  # and the prompt's
    read = lm.ring.stats.bytes_read - reads
    # each pass reads the streamed weights once, give or take the ring's read-ahead at either end
    assert spec.passes < 23 and abs(read - passes * lm.plan.bytes_per_token) <= 2 * lm.plan.ring_bytes


def test_speculation_is_greedy_only(dense):
    ids = dense.tokenizer.encode("hello")
    with pytest.raises(EdgewiseError, match="temperature 0"):
        next(dense.generate(ids, 4, Sampler(temperature=0.7), lookup=PromptLookup()))
    with pytest.raises(EdgewiseError, match="at least 1 new token"):
        next(dense.generate(ids, 0))


@pytest.mark.slow
def test_speculation_on_the_1_5b_coder_equals_greedy():
    model = LanguageModel.load("qwen2.5-coder-1.5b", compile=False)
    _check_logits_bit_for_bit(model)
    _check_equal(model, model, n=24, draft=4)
