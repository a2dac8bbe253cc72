"""Choosing a setting by timing it, while it runs.

Some settings are best decided by measuring them where they run, not by a rule or a probe: whether a
speculative draft pays (it depends on where the weights are), how many CPUs should compute while the
process's own reader threads wait for the disk, how large each direct read should be (a standalone
probe of the disk and the reads a model makes among its compute can disagree). `MeasuredChoice` is the one
rule all of them use: a small bandit that exploits the cheapest measured option and keeps the others'
estimates fresh.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence


class MeasuredChoice:
    """Picks, among a few options, the one whose measured cost is lowest, and keeps measuring.

    Costs are exponential averages (each new sample weighs `smoothing`) kept per (context, option): a
    context keeps apart situations whose costs differ (a pass checking a draft and a plain pass). In each
    context every option is first tried once, in the order given; after that the cheapest is taken, except
    that every `explore`-th choice (counted over all contexts) takes the option measured least recently,
    so the estimates follow a machine whose load, cache and disk change as it runs. A single option is
    returned without counting a choice.
    """

    def __init__(self, explore: int = 8, smoothing: float = 0.25):
        if explore < 2 or not 0 < smoothing <= 1:
            raise ValueError(f"explore must be >= 2 and smoothing in (0, 1], got {explore}, {smoothing}")
        self.explore, self.smoothing = explore, smoothing
        self.costs: dict[tuple[Hashable, Hashable], float] = {}  # (context, option) -> average cost
        self.samples: dict[tuple[Hashable, Hashable], int] = {}  # (context, option) -> samples recorded
        self._last: dict[tuple[Hashable, Hashable], int] = {}  # (context, option) -> record number of its latest sample
        self._records = 0
        self.choices = 0

    def choose(self, options: Sequence[Hashable], context: Hashable = None,
               score: Callable[[Hashable, float], float] | None = None) -> Hashable:
        """The option to use next in `context`. `score(option, average cost)`: what to minimise, where the measured
        cost is not all there is to it (default: the cost itself)."""
        if not options:
            raise ValueError("nothing to choose from")
        if len(options) == 1:
            return options[0]
        self.choices += 1
        untried = [o for o in options if (context, o) not in self.costs]
        if untried:
            return untried[0]
        if self.choices % self.explore == 0:
            return min(options, key=lambda o: self._last[(context, o)])
        if score is None:
            return min(options, key=lambda o: self.costs[(context, o)])
        return min(options, key=lambda o: score(o, self.costs[(context, o)]))

    def record(self, option: Hashable, cost: float, context: Hashable = None) -> None:
        """A measured cost of `option` in `context` (any unit, the same for every option: lower is better)."""
        key = (context, option)
        old = self.costs.get(key)
        self.costs[key] = cost if old is None else old + self.smoothing * (cost - old)
        self.samples[key] = self.samples.get(key, 0) + 1
        self._records += 1
        self._last[key] = self._records

    def cost(self, option: Hashable, context: Hashable = None) -> float | None:
        """The average cost of `option` in `context`, or None before its first sample."""
        return self.costs.get((context, option))
