"""The residency plan (`edgewise.flash.residency`): never over its budget, ring included; required parts
always resident; more budget never streams more; a budget below the minimum names it; the bound's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from edgewise.errors import EdgewiseError
from edgewise.flash.residency import Part, model_parts, plan_residency
from edgewise.gguf_io import read_gguf
from edgewise.models import resolve_model


def _check(plan, parts):
    assert plan.dram_bytes <= plan.budget_bytes
    names = [p.name for p in plan.resident] + [p.name for p in plan.streamed]
    assert sorted(names) == sorted(p.name for p in parts if p.required or p.use > 0) and len(set(names)) == len(names)
    assert all(p in plan.resident for p in parts if p.required)


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-1.5b"])
def test_plans_of_real_models_fit_their_budgets_and_more_budget_streams_less(model):
    parts = model_parts(read_gguf(resolve_model(model)))
    total = sum(p.nbytes for p in parts)
    minimum = sum(p.nbytes for p in parts if p.required)
    with pytest.raises(EdgewiseError, match=r"below this model's resident minimum of [0-9.]+ MB .* give at least that"):
        plan_residency(parts, minimum - 1)
    previous = float("inf")
    for budget in np.linspace(minimum * 1.2, total * 1.1, 12).astype(int):
        plan = plan_residency(parts, int(budget))
        _check(plan, parts)
        assert plan.bytes_per_token <= previous + 1e-6
        previous = plan.bytes_per_token
    everything = plan_residency(parts, total * 2)
    assert all(p.name == "token_embd.weight" for p in everything.streamed) and everything.ring_bytes <= max((p.nbytes for p in everything.streamed), default=0) * 2 + 1
    assert "| **total** |" in everything.table()


def test_random_part_sets_never_exceed_the_budget():
    rng = np.random.default_rng(0)
    for case in range(300):
        n = int(rng.integers(1, 40))
        parts = [Part(f"blk.{i % 5}.ffn_up.{i}", int(rng.integers(1, 10_000)), use=float(rng.choice([0.0, 0.3, 1.0])), required=bool(rng.random() < 0.2), layer=i % 5) for i in range(n)]
        try:
            plan = plan_residency(parts, int(rng.integers(1, 200_000)), ring_depth=int(rng.integers(1, 4)))
        except EdgewiseError as exc:
            assert "below this model's resident minimum" in str(exc)
            continue
        _check(plan, parts)


def test_the_bound():
    parts = [Part("blk.0.ffn_up.weight", 10**8, layer=0), Part("blk.1.ffn_up.weight", 10**8, layer=1), Part("attn", 100, required=True)]
    plan = plan_residency(parts, 10**8 + 100, ring_depth=1)  # room for the ring only: both layers stream
    assert plan.bytes_per_token == 2 * 10**8 and plan.ring_bytes == 10**8 and plan.dram_bytes == 10**8 + 100
    serial, overlapped = plan.bound_s(gbps=2.0, compute_s=0.05)
    assert serial == pytest.approx(0.1 + 0.05) and overlapped == pytest.approx(0.1)
    three = [*parts, Part("blk.2.ffn_up.weight", 10**8, layer=2)]
    assert plan_residency(three, 2 * 10**8 + 100, ring_depth=1).bytes_per_token == 2 * 10**8  # one layer resident, a ring for the others
