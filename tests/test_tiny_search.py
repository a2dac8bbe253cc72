"""Scheme search (MCUNetV3 §2.3): contribution analysis with an injected fine-tune, the
evolutionary search against brute force on a small space, budgets (synthetic and the real
memory planner), saved contributions, determinism."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from edgewise.tiny.frontend import from_module
from edgewise.tiny.models import mobilenet_v2
from edgewise.tiny.plan import training_plan
from edgewise.tiny.search import (
    Contributions,
    SearchError,
    canonical,
    candidate_layers,
    contribution_analysis,
    evolutionary_search,
)
from edgewise.tiny.sparse import RATIOS, Scheme

LAYERS = [f"block{i}.conv.0" for i in range(6)]
DEPTHS = [2, 4, 8, 12, 16]


class Synthetic:
    """A known accuracy (additive in the scheme's parts, plus a small interaction that single-part
    schemes never see) and a memory that is not additive (a max term, like a peak)."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        self.gain = {layer: rng.uniform(-0.01, 0.05) for layer in LAYERS}  # some layers hurt
        self.shape = {layer: rng.uniform(0.2, 1.0) for layer in LAYERS}  # diminishing returns in the ratio
        self.act = {layer: rng.randint(2, 40) * 1000 for layer in LAYERS}
        self.grad = {layer: rng.randint(1, 30) * 1000 for layer in LAYERS}
        self.finetuned: list[str] = []

    def part(self, layer: str, ratio: float) -> float:
        return self.gain[layer] * ratio ** self.shape[layer]

    def bias_part(self, depth: int) -> float:
        return 0.004 * depth**0.7

    def finetune(self, scheme: Scheme) -> float:
        self.finetuned.append(canonical(scheme))
        parts = [self.part(layer, r) for layer, r in scheme.weights.items()]
        interaction = -0.001 * len(parts) * (len(parts) - 1) - (0.002 if parts and scheme.bias_depth else 0)
        return 0.5 + self.bias_part(scheme.bias_depth) + sum(parts) + interaction

    def memory(self, scheme: Scheme) -> int:
        kept = [r * self.act[layer] for layer, r in scheme.weights.items()]
        return int(50_000 + 3000 * scheme.bias_depth + sum(kept) + sum(r * self.grad[layer] for layer, r in scheme.weights.items()) + 0.5 * max(kept, default=0))


def all_schemes(contrib: Contributions):
    for depth in contrib.depths:
        for ratios in itertools.product(*[[0.0, *sorted(contrib.weights[layer])] for layer in contrib.layers]):
            yield Scheme(depth, {layer: r for layer, r in zip(contrib.layers, ratios) if r})


def brute_force(contrib: Contributions, memory, budget: int | None) -> tuple[float, Scheme]:
    best = None
    for scheme in all_schemes(contrib):
        gain = contrib.predict(scheme)
        if (best is None or gain > best[0]) and (budget is None or memory(scheme) <= budget):
            best = (gain, scheme)
    return best


@pytest.fixture(scope="module")
def synthetic():
    problem = Synthetic()
    contrib = contribution_analysis(problem.finetune, LAYERS, DEPTHS, progress=False)
    return problem, contrib


def test_contribution_analysis_measures_each_part_alone(synthetic):
    problem, contrib = synthetic
    assert len(problem.finetuned) == 1 + len(DEPTHS) + len(LAYERS) * 4 == len(set(problem.finetuned))
    assert problem.finetuned[0] == canonical(Scheme(0))  # the classifier-only baseline comes first
    assert contrib.baseline == pytest.approx(0.5)
    assert contrib.depths == [0, *DEPTHS]
    for depth in DEPTHS:
        assert contrib.bias[depth] == pytest.approx(problem.bias_part(depth))
    for layer in LAYERS:
        assert sorted(contrib.weights[layer]) == list(RATIOS[1:])
        for ratio, gain in contrib.weights[layer].items():
            assert gain == pytest.approx(problem.part(layer, ratio))
    scheme = Scheme(4, {LAYERS[0]: 0.5, LAYERS[3]: 1.0})
    assert contrib.predict(scheme) == pytest.approx(problem.bias_part(4) + problem.part(LAYERS[0], 0.5) + problem.part(LAYERS[3], 1.0))
    with pytest.raises(SearchError, match="bias_depth 3"):
        contrib.predict(Scheme(3))


@pytest.mark.parametrize("fraction", [0.2, 0.45, 0.7])
def test_search_finds_the_brute_force_optimum_within_budget(synthetic, fraction):
    problem, contrib = synthetic
    calls: list[str] = []

    def memory(scheme: Scheme) -> int:
        calls.append(canonical(scheme))
        return problem.memory(scheme)

    full = problem.memory(Scheme(max(DEPTHS), {layer: 1.0 for layer in LAYERS}))
    budget = int(50_000 + fraction * (full - 50_000))
    optimum, optimum_scheme = brute_force(contrib, problem.memory, budget)
    unconstrained, unconstrained_scheme = brute_force(contrib, problem.memory, None)
    assert problem.memory(unconstrained_scheme) > budget and unconstrained > optimum  # the budget binds

    result = evolutionary_search(contrib, memory, budget, progress=False)
    assert result.predicted == pytest.approx(optimum, abs=1e-12), (canonical(result.scheme), canonical(optimum_scheme))
    assert result.predicted == pytest.approx(contrib.predict(result.scheme))
    assert result.predicted_accuracy == pytest.approx(contrib.baseline + optimum)
    assert result.memory == problem.memory(result.scheme) <= budget
    assert result.history == sorted(result.history) and result.history[-1] == result.predicted
    # every plan is cached: one memory call per distinct scheme, far fewer than the space holds
    space = len(contrib.depths) * 5 ** len(LAYERS)
    assert len(calls) == len(set(calls)) == result.evaluated < space / 50

    # the problem is not one a random search solves: as many random schemes miss the optimum
    rng = random.Random(0)
    schemes = list(all_schemes(contrib))
    sampled = [s for s in rng.sample(schemes, result.evaluated) if problem.memory(s) <= budget]
    assert max(contrib.predict(s) for s in sampled) < optimum - 1e-6


def test_budget_is_respected_for_every_budget_and_seed(synthetic):
    problem, contrib = synthetic
    floor = problem.memory(Scheme(0))
    for budget in (floor, floor + 1000, 80_000, 150_000, 300_000):
        for seed in (1, 2):
            result = evolutionary_search(contrib, problem.memory, budget, population=12, generations=8, seed=seed, progress=False)
            assert problem.memory(result.scheme) == result.memory <= budget
    at_floor = evolutionary_search(contrib, problem.memory, floor, population=8, generations=4, progress=False)
    assert at_floor.scheme == Scheme(0) and at_floor.predicted == 0


def test_infeasible_budget_names_the_smallest_feasible_one(synthetic):
    problem, contrib = synthetic
    cheapest = json.dumps(Scheme(0).to_dict(), sort_keys=True)
    with pytest.raises(SearchError) as err:
        evolutionary_search(contrib, problem.memory, 40_000, progress=False)
    message = str(err.value)
    assert f"{50_000 / 1024:.1f} KB" in message  # 48.8 KB: the classifier-only scheme's memory
    assert cheapest in message and "raise --budget or lower --resolution" in message
    assert Scheme.from_dict(json.loads(cheapest)) == Scheme(0)


def test_search_is_deterministic_given_the_seed(synthetic):
    problem, contrib = synthetic
    budget = 120_000
    runs = [evolutionary_search(contrib, problem.memory, budget, population=10, generations=6, seed=7, progress=False) for _ in range(2)]
    assert runs[0] == runs[1]
    assert canonical(runs[0].scheme) == canonical(runs[1].scheme) and runs[0].history == runs[1].history


@pytest.fixture
def one_thread():
    """Planning runs the model's convs once (shape propagation); on a busy small machine one
    thread is several times faster than oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_search_with_the_real_memory_planner(one_thread):
    model = mobilenet_v2(0.35, n_classes=10)
    shape = (1, 3, 64, 64)
    planned: dict[str, int] = {}

    def memory(scheme: Scheme) -> int:  # the real planner, no mock; cached only across this test's own calls
        key = canonical(scheme)
        if key not in planned:
            planned[key] = training_plan(model, shape, scheme).memory.peak
        return planned[key]

    # the valuable layers are the expensive ones: early convs keep big activations, the head a big
    # gradient; and their memory is far from additive (each fits alone, some pairs do not)
    layers = ["features.3.conv.0.0", "features.4.conv.0.0", "features.16.conv.0.0", "features.18.0"]
    gains = {"features.3.conv.0.0": 0.04, "features.4.conv.0.0": 0.03, "features.16.conv.0.0": 0.01, "features.18.0": 0.05}
    contrib = Contributions(0.6, {8: 0.01, 24: 0.02}, {layer: {r: gains[layer] * r**0.5 for r in RATIOS[1:]} for layer in layers})
    budget = 500 * 1024
    assert memory(Scheme(24, {layer: 1.0 for layer in layers})) > budget >= memory(Scheme(0))
    singles = [Scheme(d) for d in (8, 24)] + [Scheme(0, {layer: r}) for layer in layers for r in RATIOS[1:]]
    best_single = max(contrib.predict(s) for s in singles if memory(s) <= budget)

    result = evolutionary_search(contrib, memory, budget, population=8, generations=5, progress=False)
    assert training_plan(model, shape, result.scheme).memory.peak == result.memory <= budget
    assert result.predicted == pytest.approx(contrib.predict(result.scheme))
    assert result.predicted > best_single + 0.01  # combines parts, where any one part alone is worth less


def test_contributions_round_trip_and_bad_files(tmp_path, synthetic):
    _, contrib = synthetic
    contrib.meta = {"model": "mbv2-0.35", "resolution": 64}
    path = contrib.save(tmp_path / "contrib.json")
    assert Contributions.load(path) == contrib
    assert [p.name for p in tmp_path.iterdir()] == ["contrib.json"]  # the temp file is gone
    assert json.loads(path.read_text())["weights"][LAYERS[0]].keys() == {"0.125", "0.25", "0.5", "1.0"}

    bad = tmp_path / "corrupt.json"
    bad.write_text(path.read_text()[:-40])
    with pytest.raises(SearchError, match="corrupt.json: cannot read the contributions"):
        Contributions.load(bad)
    data = json.loads(path.read_text())
    for edit, message in [
        (lambda d: d["weights"][LAYERS[1]].update({"0.3": 0.1}), "ratio '0.3'"),
        (lambda d: d["bias"].update({"x": 0.1}), "bias depth 'x'"),
        (lambda d: d.pop("baseline"), "missing field 'baseline'"),
        (lambda d: d.update({"extra": 1}), "unknown field"),
        (lambda d: d["bias"].update({"4": "high"}), r"bias\['4'\] must be a finite number"),
    ]:
        broken = json.loads(json.dumps(data))
        edit(broken)
        bad.write_text(json.dumps(broken))
        with pytest.raises(SearchError, match=f"corrupt.json: .*{message}"):
            Contributions.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(SearchError, match="corrupt.json: contributions are a JSON object"):
        Contributions.load(bad)


def test_interrupted_analysis_resumes_from_its_checkpoint(tmp_path):
    problem = Synthetic()
    checkpoint = tmp_path / "contrib.json"
    budget = 7

    def interrupted(scheme: Scheme) -> float:
        if len(problem.finetuned) >= budget:
            raise KeyboardInterrupt
        return problem.finetune(scheme)

    with pytest.raises(KeyboardInterrupt):
        contribution_analysis(interrupted, LAYERS[:3], [4, 8], checkpoint=checkpoint, meta={"steps": 100}, progress=False)
    assert len(Contributions.load(checkpoint).bias) == 2 and len(problem.finetuned) == 7
    resumed = contribution_analysis(problem.finetune, LAYERS[:3], [4, 8], checkpoint=checkpoint, meta={"steps": 100}, progress=False)
    assert len(problem.finetuned) == len(set(problem.finetuned)) == 1 + 2 + 3 * 4  # nothing measured twice
    fresh = contribution_analysis(Synthetic().finetune, LAYERS[:3], [4, 8], progress=False, meta={"steps": 100})
    assert resumed == fresh and Contributions.load(checkpoint) == fresh
    with pytest.raises(SearchError, match="contrib.json: measured with different settings"):
        contribution_analysis(problem.finetune, LAYERS[:3], [4, 8], checkpoint=checkpoint, meta={"steps": 200}, progress=False)


def test_candidate_layers_are_the_pointwise_convs_of_the_last_blocks_and_the_head():
    graph, _ = from_module(mobilenet_v2(0.35, n_classes=10), (1, 3, 32, 32))
    assert candidate_layers(graph, 2) == ["features.16.conv.0.0", "features.16.conv.2", "features.17.conv.0.0", "features.17.conv.2", "features.18.0"]
    assert len(candidate_layers(graph, 100)) == 16 * 2 + 1 + 1  # block 1 (expansion 1) has no expand conv; + the head conv
    with pytest.raises(SearchError, match="at least one block"):
        candidate_layers(graph, 0)
