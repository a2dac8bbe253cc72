"""Searching a sparse update scheme under a memory budget (MCUNetV3 §2.3, Fig. 4-5).

Two steps, as in the paper:

1. **Contribution analysis**: fine-tune the classifier alone (the baseline), then the biases of
   the last k layers, then each candidate layer's weights alone (at each ratio of its input
   channels) on top of the classifier; each one's gain in accuracy over the baseline is its
   contribution. How to fine-tune (fp32 or int8 step, data, steps) is the caller's `finetune`.

       contrib = contribution_analysis(finetune, candidate_layers(graph, 4), [4, 8, 12, 16])
       contrib.save("contrib.json")            # hours of fine-tuning: keep them

2. **Evolutionary search**: the accuracy of a scheme is predicted as the sum of its parts'
   contributions (the paper's additive model); maximize it over schemes whose planned training
   memory fits the budget.

       best = evolutionary_search(contrib, lambda s: training_plan(model, shape, s).memory.peak, 256 * 1024)
       best.scheme, best.predicted, best.memory

A scheme's accuracy is free to predict but its memory costs a compiled plan, so the search only
plans schemes that would enter the population, and caches every plan by the scheme's JSON.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from edgewise.errors import EdgewiseError
from edgewise.files import write_text_atomic
from edgewise.tiny.ir import Graph
from edgewise.tiny.sparse import RATIOS, Scheme, conv_layers

DEFAULT_RATIOS = (0.125, 0.25, 0.5, 1.0)


class SearchError(EdgewiseError):
    pass


def canonical(scheme: Scheme) -> str:
    """The scheme's JSON with sorted keys: one string per distinct scheme (the memory cache's key)."""
    return json.dumps(scheme.to_dict(), sort_keys=True)


def _ratio_key(ratio: float) -> str:
    return repr(float(ratio))  # 0.125 -> "0.125", 1 -> "1.0"


def _number(value: Any, what: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SearchError(f"{source}: {what} must be a finite number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Contributions


@dataclass
class Contributions:
    """Accuracy gains over the classifier-only baseline: `bias[k]` for the biases of the last k
    convs, `weights[layer][ratio]` for that layer's weights (that ratio of its input channels)."""

    baseline: float
    bias: dict[int, float] = field(default_factory=dict)
    weights: dict[str, dict[float, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # how they were measured (model, resolution, steps...), free-form

    @property
    def depths(self) -> list[int]:
        """The bias depths a scheme may take: 0 and every measured one, ascending."""
        return sorted({0} | set(self.bias))

    @property
    def layers(self) -> list[str]:
        return list(self.weights)

    def predict(self, scheme: Scheme) -> float:
        """The additive model: Δacc_bias[depth] + Σ Δacc_weight[layer][ratio] (0 for what is not trained)."""
        if scheme.bias_depth and scheme.bias_depth not in self.bias:
            raise SearchError(f"no contribution measured for bias_depth {scheme.bias_depth}; measured: {self.depths}")
        total = self.bias[scheme.bias_depth] if scheme.bias_depth else 0.0
        for layer, ratio in scheme.weights.items():
            if not ratio:
                continue
            measured = self.weights.get(layer, {})
            if float(ratio) not in measured:
                raise SearchError(f"no contribution measured for '{layer}' at ratio {ratio}")
            total += measured[float(ratio)]
        return total

    def to_dict(self) -> dict:
        return {
            "baseline": self.baseline,
            "bias": {str(k): v for k, v in sorted(self.bias.items())},
            "weights": {layer: {_ratio_key(r): v for r, v in sorted(by_ratio.items())} for layer, by_ratio in self.weights.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "contributions") -> "Contributions":
        if not isinstance(data, dict):
            raise SearchError(f"{source}: contributions are a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"baseline", "bias", "weights", "meta"})
        if unknown:
            raise SearchError(f"{source}: unknown field(s) {', '.join(unknown)}; expected baseline, bias, weights, meta")
        if "baseline" not in data:
            raise SearchError(f"{source}: missing field 'baseline' (the classifier-only accuracy)")
        baseline = _number(data["baseline"], "baseline", source)
        raw_bias, raw_weights, meta = data.get("bias", {}), data.get("weights", {}), data.get("meta", {})
        if not isinstance(raw_bias, dict):
            raise SearchError(f"{source}: 'bias' must map bias depths to accuracy gains, got {type(raw_bias).__name__}")
        if not isinstance(raw_weights, dict):
            raise SearchError(f"{source}: 'weights' must map layer names to {{ratio: gain}}, got {type(raw_weights).__name__}")
        if not isinstance(meta, dict):
            raise SearchError(f"{source}: 'meta' must be a JSON object, got {type(meta).__name__}")
        bias: dict[int, float] = {}
        for key, value in raw_bias.items():
            try:
                depth = int(key)
            except ValueError:
                depth = -1
            if depth < 0 or str(depth) != key:
                raise SearchError(f"{source}: bias depth {key!r} is not a non-negative integer")
            bias[depth] = _number(value, f"bias['{key}']", source)
            if depth == 0 and bias[0] != 0:
                raise SearchError(f"{source}: bias['0'] is {value!r}; no biases is the baseline itself, a gain of 0")
        weights: dict[str, dict[float, float]] = {}
        for layer, by_ratio in raw_weights.items():
            if not isinstance(by_ratio, dict):
                raise SearchError(f"{source}: weights['{layer}'] must map ratios to accuracy gains, got {type(by_ratio).__name__}")
            weights[layer] = {}
            for key, value in by_ratio.items():
                try:
                    ratio = float(key)
                except ValueError:
                    ratio = math.nan
                if ratio == 0 or not any(math.isclose(ratio, r) for r in RATIOS):
                    raise SearchError(f"{source}: weights['{layer}'] has ratio {key!r}; a ratio must be one of 1/8, 1/4, 1/2, 1")
                weights[layer][ratio] = _number(value, f"weights['{layer}']['{key}']", source)
        return cls(baseline, bias, weights, meta)

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (a temp file beside it, then os.replace)."""
        try:
            return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        except OSError as exc:
            raise SearchError(f"{path}: cannot write the contributions ({exc})") from exc

    @classmethod
    def load(cls, path: str | Path) -> "Contributions":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SearchError(f"{path}: cannot read the contributions ({exc})") from exc
        return cls.from_dict(data, str(path))


def contribution_analysis(
    finetune: Callable[[Scheme], float],
    layers: list[str],
    bias_depths: Iterable[int],
    ratios: Iterable[float] = DEFAULT_RATIOS,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    meta: dict[str, Any] | None = None,
) -> Contributions:
    """Fine-tune the classifier alone, the last k biases for each k, and each layer's weights
    alone at each ratio (all with the classifier); returns each one's gain over the first.

    `finetune(scheme)` fine-tunes a fresh copy of the model with `scheme` and returns its
    validation accuracy. With `checkpoint`, the contributions so far are saved there after every
    fine-tune and a rerun measures only what is missing (`meta` must match what the file holds).
    """
    depths = sorted(set(bias_depths))
    ratios = list(ratios)
    layers = list(dict.fromkeys(layers))
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in depths):
        raise SearchError(f"bias depths must be non-negative integers, got {depths}")
    if any(not any(math.isclose(r, q) for q in RATIOS[1:]) for r in ratios):
        raise SearchError(f"ratios must be among 1/8, 1/4, 1/2, 1, got {ratios}")
    ratios = sorted({q for r in ratios for q in RATIOS[1:] if math.isclose(r, q)})
    meta = dict(meta or {})

    # `done` holds everything measured, the checkpoint's other entries included, so none is lost.
    done = Contributions(math.nan, meta=meta)
    if checkpoint is not None and Path(checkpoint).exists():
        done = Contributions.load(checkpoint)
        if meta and done.meta != meta:
            raise SearchError(
                f"{checkpoint}: measured with different settings ({json.dumps(done.meta, sort_keys=True)}, now "
                f"{json.dumps(meta, sort_keys=True)}); delete it or choose another checkpoint file"
            )
    jobs: list[tuple[str, Any, Any]] = []
    if math.isnan(done.baseline):
        jobs.append(("baseline", None, None))
    jobs += [("bias", k, None) for k in depths if k and k not in done.bias]
    jobs += [("weight", layer, r) for layer in layers for r in ratios if r not in done.weights.get(layer, {})]

    from tqdm import tqdm

    with tqdm(jobs, desc="contribution analysis", unit="fine-tune", file=sys.stderr, disable=not progress) as bar:
        for kind, key, ratio in bar:
            if kind == "baseline":
                scheme, label = Scheme(bias_depth=0), "classifier only"
            elif kind == "bias":
                scheme, label = Scheme(bias_depth=key), f"bias_depth {key}"
            else:
                scheme, label = Scheme(bias_depth=0, weights={key: ratio}), f"{key} @ {ratio:g}"
            bar.set_postfix_str(label)
            value = finetune(scheme)
            try:
                acc = math.nan if isinstance(value, bool) else float(value)
            except (TypeError, ValueError):
                acc = math.nan
            if not math.isfinite(acc):
                raise SearchError(f"finetune({canonical(scheme)}) returned {value!r}; it must return a finite accuracy")
            if kind == "baseline":
                done.baseline = acc
            elif kind == "bias":
                done.bias[key] = acc - done.baseline
            else:
                done.weights.setdefault(key, {})[ratio] = acc - done.baseline
            if checkpoint is not None:
                done.save(checkpoint)

    result = Contributions(done.baseline, meta=done.meta)
    result.bias = {k: (0.0 if k == 0 else done.bias[k]) for k in depths}
    result.weights = {layer: {r: done.weights[layer][r] for r in ratios} for layer in layers}
    return result


# ---------------------------------------------------------------------------------------------
# Evolutionary search


@dataclass
class SearchResult:
    scheme: Scheme
    predicted: float  # the additive model's accuracy gain over the classifier-only baseline
    baseline: float
    memory: int  # memory_bytes(scheme)
    budget: int
    evaluated: int  # distinct schemes whose memory was computed (each one a compiled plan)
    history: list[float] = field(default_factory=list)  # best predicted gain after each generation

    @property
    def predicted_accuracy(self) -> float:
        return self.baseline + self.predicted


Genome = tuple[int, ...]  # (bias-depth index, ratio index of each candidate layer); index 0 = untrained


class _Space:
    def __init__(self, contrib: Contributions):
        self.contrib = contrib
        self.depths = contrib.depths
        self.layers = contrib.layers
        self.ratios = [[0.0] + sorted(contrib.weights[layer]) for layer in self.layers]
        self.levels = [len(self.depths)] + [len(r) for r in self.ratios]
        self._gain = [[contrib.bias.get(d, 0.0) if d else 0.0 for d in self.depths]]
        self._gain += [[0.0] + [contrib.weights[layer][r] for r in self.ratios[i][1:]] for i, layer in enumerate(self.layers)]

    def scheme(self, genome: Genome) -> Scheme:
        weights = {layer: self.ratios[i][g] for i, (layer, g) in enumerate(zip(self.layers, genome[1:])) if g}
        return Scheme(bias_depth=self.depths[genome[0]], weights=weights, source="search")

    def fitness(self, genome: Genome) -> float:
        return sum(self._gain[i][g] for i, g in enumerate(genome))  # always summed in gene order: deterministic


def _min_budget_error(memory: int, budget: int, scheme: Scheme) -> SearchError:
    return SearchError(
        f"budget {budget / 1024:.1f} KB is below the smallest feasible training memory: {memory / 1024:.1f} KB, "
        f"reached by the cheapest scheme {canonical(scheme)} (the classifier only); raise --budget or lower --resolution"
    )


def evolutionary_search(
    contrib: Contributions,
    memory_bytes: Callable[[Scheme], int],
    budget_bytes: int,
    population: int = 32,
    generations: int = 40,
    seed: int = 0,
    progress: bool = True,
    mutation_rate: float | None = None,
    crossover_rate: float = 0.5,
) -> SearchResult:
    """The scheme with the highest predicted gain (`contrib.predict`) whose `memory_bytes` fits
    `budget_bytes`: a steady-state genetic algorithm, deterministic for a given seed.

    The population holds the `population` best feasible schemes found (elitism: the best is never
    lost). Each generation breeds `population` children (tournament parents, uniform crossover with
    `crossover_rate`; mutation: now and then an exchange, one gene a level up and another a level
    down, else each gene with `mutation_rate`, default 1/#genes, at least one): a child that would
    not enter the population is never planned; one over the budget is repaired by lowering a random
    trained gene a level at a time until it fits or no longer would enter.

    The defaults (32 x 40) find the exact optimum of a 6-layer, 6-depth space (94k schemes) from
    every seed tried, planning ~400-900 of them, and of 8 layers (2.3M) nine times in ten, else
    within ~0.1 points of predicted accuracy: below the noise of the measured contributions.
    """
    if population < 2 or generations < 0:
        raise SearchError(f"need population >= 2 and generations >= 0, got {population} and {generations}")
    if budget_bytes <= 0:
        raise SearchError(f"the memory budget must be positive, got {budget_bytes} bytes")
    space = _Space(contrib)
    rng = random.Random(seed)
    n_genes = len(space.levels)
    mutation_rate = 1 / n_genes if mutation_rate is None else mutation_rate
    cache: dict[str, int] = {}

    def memory(genome: Genome) -> int:
        key = canonical(space.scheme(genome))
        if key not in cache:
            cache[key] = int(memory_bytes(space.scheme(genome)))
        return cache[key]

    cheapest: Genome = (0,) * n_genes
    if memory(cheapest) > budget_bytes:
        raise _min_budget_error(memory(cheapest), budget_bytes, space.scheme(cheapest))

    def rank(genome: Genome) -> tuple:
        return (-space.fitness(genome), memory(genome), genome)  # best first; ties: less memory, then gene order

    members: list[Genome] = [cheapest]  # sorted by rank, feasible, distinct
    rejected: set[Genome] = set()  # over the budget

    def offer(child: Genome) -> None:
        """Plan `child` if it would enter the population; repair it if over budget; insert if it fits."""
        while True:
            if child in members or child in rejected:
                return
            full = len(members) >= population
            if full and space.fitness(child) <= space.fitness(members[-1]):
                return  # would not enter: never planned
            if memory(child) <= budget_bytes:
                members.append(child)
                members.sort(key=rank)
                del members[population:]
                return
            rejected.add(child)
            trained = [i for i, g in enumerate(child) if g]
            i = rng.choice(trained)  # non-empty: the all-zero genome fits
            child = child[:i] + (child[i] - 1,) + child[i + 1 :]

    def random_genome() -> Genome:
        density = rng.random()  # from nearly empty to nearly full schemes
        return tuple(rng.randrange(1, n) if n > 1 and rng.random() < density else 0 for n in space.levels)

    def parent() -> Genome:
        a, b = rng.choice(members), rng.choice(members)
        return min(a, b, key=rank)

    def mutate(genome: Genome) -> Genome:
        genes = list(genome)
        mutable = [i for i, n in enumerate(space.levels) if n > 1]
        if not mutable:
            return genome
        if len(mutable) >= 2 and rng.random() < 0.3:  # an exchange: one gene a level up, another a level down
            up = [i for i in mutable if genes[i] < space.levels[i] - 1]
            down = [i for i in mutable if genes[i] > 0]
            if up and down:
                i, j = rng.choice(up), rng.choice(down)
                if i != j:
                    genes[i] += 1
                    genes[j] -= 1
                    return tuple(genes)
        chosen = [i for i in mutable if rng.random() < mutation_rate] or [rng.choice(mutable)]
        for i in chosen:
            if rng.random() < 0.5:  # a step to a neighbouring ratio / depth
                genes[i] = min(max(genes[i] + rng.choice((-1, 1)), 0), space.levels[i] - 1)
            else:
                genes[i] = rng.randrange(space.levels[i])
        return tuple(genes)

    for _ in range(population - 1):
        offer(random_genome())

    from tqdm import tqdm

    history: list[float] = []
    with tqdm(range(generations), desc="scheme search", unit="gen", file=sys.stderr, disable=not progress) as bar:
        for _ in bar:
            for _ in range(population):
                if len(members) >= 2 and rng.random() < crossover_rate:
                    a, b = parent(), parent()
                    child = tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))
                    if rng.random() < 0.5:  # crossover alone or crossover + mutation
                        child = mutate(child)
                else:
                    child = mutate(parent())
                offer(child)
            history.append(space.fitness(members[0]))
            bar.set_postfix(best=f"{history[-1]:+.4f}", planned=len(cache))

    best = members[0]
    return SearchResult(space.scheme(best), space.fitness(best), contrib.baseline, memory(best), budget_bytes, len(cache), history)


# ---------------------------------------------------------------------------------------------
# Search space


def candidate_layers(graph: Graph, last_blocks: int) -> list[str]:
    """The ordinary (groups = 1) convs of the last `last_blocks` inverted-residual blocks, in order:
    their pointwise expand and project convs, the layers the paper updates weights of, and the
    ordinary convs after the last block (the head's 1x1 conv). A block's
    convs are named `<block>.conv.<i>...` (torchvision's MobileNetV2 naming, which models.py keeps)."""
    if last_blocks < 1:
        raise SearchError(f"need at least one block, got last_blocks = {last_blocks}")
    convs = conv_layers(graph)
    blocks: dict[str, list[str]] = {}
    for name, node in convs.items():
        if ".conv." in name:
            blocks.setdefault(name.split(".conv.")[0], []).append(name)
    if not blocks:
        raise SearchError("no inverted-residual blocks (convs named '<block>.conv.<i>') in this model; name the candidate layers instead")
    chosen = list(blocks)[-last_blocks:]
    names = list(convs)
    after_blocks = names[names.index(blocks[chosen[-1]][-1]) + 1 :]  # the head's 1x1 conv (features.18.0 in MobileNetV2)
    return [name for block in chosen for name in blocks[block] if convs[name].attrs["groups"] == 1] + [
        name for name in after_blocks if convs[name].attrs["groups"] == 1
    ]
