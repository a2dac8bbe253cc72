"""A training plan for a model and scheme: the compiled graph (forward, pruned backward, in-place
updates) and its static memory plan, as a per-op table and a memory-timeline plot.

    plan = training_plan(mobilenet_v2(0.35, n_classes=10), (1, 3, 128, 128), Scheme.load("s.json"))
    print(plan_table(plan)); save_timeline(plan, "memory.png")

Sizes are those of the fp32 graph (4 bytes per activation and gradient); the int8 training graph
will plan its own dtypes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgewise.tiny import autodiff, memory, schedule
from edgewise.tiny.frontend import from_module
from edgewise.tiny.ir import Graph, Node
from edgewise.tiny.sparse import Scheme, apply_scheme


@dataclass
class TrainingPlan:
    graph: Graph
    params: dict[str, torch.Tensor]  # initial values (BatchNorm folded), keyed by the graph's param names
    memory: memory.MemoryPlan
    trainable: set[str]
    reorder: bool

    @property
    def peak_kb(self) -> float:
        return self.memory.peak / 1024

    def frozen_prefix(self) -> tuple[list[Node], list[Node], list[str]]:
        """(frozen nodes, the rest, boundary values): the forward nodes that no trained parameter
        reaches compute the same thing at every step for the same image, so a host-side experiment
        may compute them once per image and feed the boundary values to the rest of the step."""
        dependent = autodiff.depends_on_trainable(self.graph, self.trainable)
        loss_step = next(i for i, n in enumerate(self.graph.nodes) if n.op == "cross_entropy")
        frozen = [n for n in self.graph.nodes[:loss_step] if not any(o in dependent for o in n.outputs)]
        frozen_names = {n.name for n in frozen}
        rest = [n for n in self.graph.nodes if n.name not in frozen_names]
        made = {o for n in frozen for o in n.outputs}
        boundary = list(dict.fromkeys(v for n in rest for v in n.inputs if v in made))
        return frozen, rest, boundary

    @property
    def kept_for_backward(self) -> int:
        """Bytes live when the loss is computed: what the forward pass keeps for the backward pass."""
        loss_step = next(i for i, n in enumerate(self.graph.nodes) if n.op == "cross_entropy")
        return self.memory.live_bytes()[loss_step]


def training_plan(model: nn.Module, input_shape: tuple[int, ...], scheme: Scheme | None = None, lr: float = 0.01, reorder: bool = True) -> TrainingPlan:
    """Compile `model` for one training step; `scheme` None trains every parameter (full update)."""
    graph, params = from_module(model, input_shape)
    if scheme is None:
        trainable, slices = set(graph.params), {}
    else:
        sparse = apply_scheme(graph, scheme)
        trainable, slices = sparse.trainable, sparse.weight_slices
    grads = autodiff.append_backward(graph, trainable, weight_slices=slices)
    schedule.append_updates(graph, grads, lr, reorder=reorder)
    return TrainingPlan(graph, params, memory.plan_memory(graph), trainable, reorder)


def plan_table(plan: TrainingPlan) -> str:
    live = plan.memory.live_bytes()
    rows = ["| step | op | output | shape | KB | live KB |", "|---:|---|---|---|---:|---:|"]
    for step, node in enumerate(plan.graph.nodes):
        out = node.outputs[0]
        alloc = plan.memory.allocations.get(out)
        size = f"{alloc.size / 1024:.1f}" if alloc else "in place"
        rows.append(f"| {step} | {node.op} | {out} | {'x'.join(map(str, plan.graph.values[out].shape)) or 'scalar'} | {size} | {live[step] / 1024:.1f} |")
    n_params = sum(plan.graph.values[p].numel for p in plan.trainable)
    rows.append("")
    rows.append(
        f"{len(plan.graph.nodes)} ops, {len(plan.trainable)} trained tensors ({n_params:,} values); "
        f"arena peak {plan.peak_kb:.1f} KB (lower bound {plan.memory.lower_bound / 1024:.1f} KB), updates {'in place, reordered' if plan.reorder else 'after the backward pass'}"
    )
    return "\n".join(rows)


def save_timeline(plan: TrainingPlan, path: str | Path) -> Path:
    """A PNG of live memory per step, forward and backward shaded, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    live_kb = [b / 1024 for b in plan.memory.live_bytes()]
    loss_step = next((i for i, n in enumerate(plan.graph.nodes) if n.op == "cross_entropy"), len(live_kb))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.fill_between(range(len(live_kb)), live_kb, step="mid", alpha=0.35)
    ax.plot(range(len(live_kb)), live_kb, drawstyle="steps-mid", lw=1)
    ax.axvline(loss_step, color="gray", ls="--", lw=0.8)
    ax.text(loss_step, max(live_kb) * 0.95, " loss: backward ->", fontsize=8, color="gray")
    ax.axhline(plan.peak_kb, color="C3", lw=0.8)
    ax.text(0, plan.peak_kb, f"arena {plan.peak_kb:.0f} KB", fontsize=8, color="C3", va="bottom")
    ax.set_xlabel("op (execution order)")
    ax.set_ylabel("live activations + gradients (KB)")
    ax.set_title(f"Training-step memory (fp32 graph): {len(plan.trainable)} trained tensors")
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
