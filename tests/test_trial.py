"""`edgewise.trial.MeasuredChoice`, the bandit behind drafts, the hold-back and the ring's read size: every option
tried first, then the cheapest, every explore-th choice the stalest; contexts kept apart; estimates follow a change."""

from __future__ import annotations

import pytest

from edgewise.trial import MeasuredChoice


def run(choice: MeasuredChoice, cost, n: int, options=("a", "b", "c"), context=None) -> list:
    seen = []
    for i in range(n):
        option = choice.choose(options, context)
        choice.record(option, cost(option, i), context)
        seen.append(option)
    return seen


def test_tries_every_option_then_keeps_the_cheapest_and_explores_the_stalest():
    costs = {"a": 3.0, "b": 1.0, "c": 2.0}
    seen = run(MeasuredChoice(explore=4), lambda o, i: costs[o], 40)
    assert seen[:3] == ["a", "b", "c"]
    for i, option in enumerate(seen[3:], start=4):  # choice number i
        if i % 4 == 0:
            assert option != "b"  # exploring: the option measured longest ago
        else:
            assert option == "b"
    explored = [o for i, o in enumerate(seen[3:], start=4) if i % 4 == 0]
    assert explored[:4] == ["a", "c", "a", "c"]  # the stalest, in turn


def test_the_estimate_follows_a_change():
    # "a" is cheaper for 40 choices, then "b" becomes cheaper: exploration notices within a few rounds
    seen = run(MeasuredChoice(explore=8, smoothing=0.25), lambda o, i: (1.0 if o == "a" else 2.0) if i < 40 else (3.0 if o == "a" else 2.0),
               120, options=("a", "b"))
    assert seen[10:40].count("a") >= 26
    assert seen[-30:].count("b") >= 26


def test_contexts_are_kept_apart_and_one_option_is_no_choice():
    choice = MeasuredChoice(explore=1000)
    costs = {("x", 1): 1.0, ("x", 2): 2.0, ("y", 1): 2.0, ("y", 2): 1.0}
    for _ in range(10):
        for ctx in ("x", "y"):
            option = choice.choose((1, 2), ctx)
            choice.record(option, costs[(ctx, option)], ctx)
    assert choice.choose((1, 2), "x") == 1 and choice.choose((1, 2), "y") == 2
    assert choice.cost(1, "x") == 1.0 and choice.cost(2, "z") is None
    before = choice.choices
    assert choice.choose((7,)) == 7 and choice.choices == before
    with pytest.raises(ValueError, match="nothing to choose"):
        choice.choose(())
    with pytest.raises(ValueError, match="explore"):
        MeasuredChoice(explore=1)


def test_the_average_is_exponential():
    choice = MeasuredChoice(smoothing=0.5)
    for cost in (4.0, 2.0, 0.0):
        choice.record("a", cost)
    assert choice.cost("a") == pytest.approx(1.5) and choice.samples[(None, "a")] == 3  # 4 -> 3 -> 1.5
