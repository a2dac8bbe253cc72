"""Tensor lifetimes and a static arena plan.

Every activation and gradient gets a fixed offset in one arena, chosen at compile time; two
tensors share bytes only if their lifetimes do not overlap. A tensor lives from the node that
writes it to the last node that reads it (graph inputs from the start; graph outputs to the end).
Parameters are not in the arena: frozen ones stay in flash, trained ones in their own RAM
(`sgd_update` writes them in place, so its output takes no arena space).

Placement is greedy by size (as TFLite's arena planner): largest tensors first, each at the
lowest offset where it overlaps no tensor placed so far with an overlapping lifetime.
`MemoryPlan.lower_bound` is the most bytes live at any one step, which no plan can beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgewise.tiny.ir import Graph

DTYPE_BYTES = {"float32": 4, "int64": 8, "int32": 4, "int8": 1}
ALIGN = 16  # bytes; every tensor starts on a 16-byte boundary (SIMD loads on the MCU and host)


@dataclass(frozen=True)
class Allocation:
    name: str
    size: int  # bytes, aligned
    start: int  # first step live (-1: a graph input, live before the first node)
    end: int  # last step live
    offset: int


@dataclass
class MemoryPlan:
    allocations: dict[str, Allocation]
    n_steps: int

    @property
    def peak(self) -> int:
        return max((a.offset + a.size for a in self.allocations.values()), default=0)

    def live_bytes(self) -> list[int]:
        """Bytes live at each step (the memory timeline)."""
        return [sum(a.size for a in self.allocations.values() if a.start <= t <= a.end) for t in range(self.n_steps)]

    @property
    def lower_bound(self) -> int:
        return max(self.live_bytes(), default=0)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def lifetimes(graph: Graph) -> dict[str, tuple[int, int]]:
    """(first step, last step) of every value that needs arena memory."""
    span: dict[str, list[int]] = {}
    for name in graph.inputs:
        span[name] = [-1, -1]
    for step, node in enumerate(graph.nodes):
        for name in node.inputs:
            if name in span:
                span[name][1] = step
        if node.op == "sgd_update":
            continue  # writes the parameter in place
        for name in node.outputs:
            span[name] = [step, step]
    last = len(graph.nodes) - 1
    for name in graph.outputs:
        if name in span:
            span[name][1] = last
    return {k: (a, b) for k, (a, b) in span.items()}


@dataclass
class Layout:
    """How a lowered graph uses memory beyond one buffer per value (the int8 graph sets it; see
    `int8_layout`): dtypes per value, values that reuse another value's bytes (a fused activation
    is its conv's output; an in-place depthwise conv writes over its input), values never
    materialized (the intermediates of a streamed conv chain), values computed where they are read
    (a masked or broadcast gradient), and scratch buffers of given steps."""

    dtypes: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # value -> the value whose bytes it takes over
    lazy: dict[str, list[str]] = field(default_factory=dict)  # value computed when read, from these (kept alive meanwhile)
    streamed: set[str] = field(default_factory=set)
    scratch: list[Scratch] = field(default_factory=list)
    # streamed conv chains, for the C backend: node names of each chain, and the rows each streamed
    # conv output keeps, in the order they sit in the chain's ring scratch buffer ("rows:<first node>")
    chains: list[list[str]] = field(default_factory=list)
    live_until: dict[str, int] = field(default_factory=dict)  # value -> a step it must stay alive through (a chain's input)
    ring_rows: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Scratch:
    name: str
    start: int
    end: int
    size: int  # bytes


def alias_root(aliases: dict[str, str], name: str) -> str:
    """The value whose buffer `name` uses, following aliases of aliases."""
    while name in aliases:
        name = aliases[name]
    return name


def plan_memory(graph: Graph, layout: Layout | None = None) -> MemoryPlan:
    layout = layout or Layout()
    spans: dict[str, tuple[int, int]] = {}
    sizes: dict[str, int] = {}
    spans_by_value = lifetimes(graph)
    made_at = {out: step for step, node in enumerate(graph.nodes) for out in node.outputs}
    for name in sorted(layout.lazy, key=lambda v: -made_at[v]):  # a lazy value's sources live until its last read
        for source in layout.lazy[name]:
            start, end = spans_by_value[source]
            spans_by_value[source] = (start, max(end, spans_by_value[name][1]))
    for name, step in layout.live_until.items():
        start, end = spans_by_value[name]
        spans_by_value[name] = (start, max(end, step))
    for name, (start, end) in spans_by_value.items():
        if name in layout.streamed or name in layout.lazy:
            continue
        value = graph.values[name]
        size = _aligned(value.numel * DTYPE_BYTES[layout.dtypes.get(name, value.dtype)])
        root = alias_root(layout.aliases, name)  # an alias extends its root's lifetime and size
        if root in spans:
            start, end = min(start, spans[root][0]), max(end, spans[root][1])
        spans[root] = (start, end)
        sizes[root] = max(size, sizes.get(root, 0))
    for s in layout.scratch:
        spans[s.name], sizes[s.name] = (s.start, s.end), _aligned(s.size)
    placed: list[Allocation] = []
    for name in sorted(spans, key=lambda n: (-sizes[n], spans[n][0], n)):
        start, end = spans[name]
        overlapping = sorted((a for a in placed if a.start <= end and start <= a.end), key=lambda a: a.offset)
        offset = 0
        for a in overlapping:
            if offset + sizes[name] <= a.offset:
                break
            offset = max(offset, a.offset + a.size)
        placed.append(Allocation(name, sizes[name], start, end, offset))
    return MemoryPlan({a.name: a for a in placed}, len(graph.nodes))
