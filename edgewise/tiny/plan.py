"""A training plan for a model and scheme: the compiled graph (forward, pruned backward, in-place
updates) and its static memory plan, as a per-op table and a memory-timeline plot.

    plan = training_plan(mobilenet_v2(0.35, n_classes=10), (1, 3, 128, 128), Scheme.load("s.json"))
    print(plan_table(plan)); save_timeline(plan, "memory.png")

`precision="int8"` plans the int8 training graph (`int8_layout`: int8 activations, fp32
gradients, fused activations, in-place ops, streamed frozen conv chains, gradients fused into
their updates); `precision="fp32"` plans every value as its own fp32 buffer. The SRAM a step
needs is the arena plus the trained parameters, which live in RAM (frozen ones stay in flash).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.files import atomic_path
from edgewise.tiny import autodiff, int8_ops, memory, schedule
from edgewise.tiny.frontend import from_module
from edgewise.tiny.int8_layout import int8_layout
from edgewise.tiny.ir import Graph, Node
from edgewise.tiny.sparse import Scheme, apply_scheme


@dataclass
class TrainingPlan:
    graph: Graph
    params: dict[str, torch.Tensor]  # initial values (BatchNorm folded), keyed by the graph's param names
    memory: memory.MemoryPlan
    trainable: set[str]
    reorder: bool
    precision: str = "fp32"
    update_rule: str = "stochastic"  # int8: the sub-LSB rule, which decides the master copies' bytes
    layout: memory.Layout | None = None

    @property
    def arena_kb(self) -> float:
        return self.memory.peak / 1024

    @property
    def trained_param_bytes(self) -> int:
        """RAM for the trained parameters: the trained slice of each weight (int8 codes and, with a
        master-copy rule, the copy), int32 or fp32 biases, the fp32 classifier."""
        total = 0
        for node in self.graph.nodes:
            if node.op != "sgd_update":
                continue
            param, grad = node.inputs
            numel = self.graph.values[grad].numel  # the trained slice
            is_conv_weight = param.endswith(".weight") and len(self.graph.values[param].shape) == 4
            if self.precision == "int8" and is_conv_weight:
                total += numel * (1 + int8_ops.MASTER_BYTES[self.update_rule])
            else:
                total += numel * 4  # int32 bias codes, or fp32
        return total

    @property
    def peak_kb(self) -> float:
        """SRAM the training step needs: the arena plus the trained parameters."""
        return (self.memory.peak + self.trained_param_bytes) / 1024

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

    def check_fits(self, budget: int, what: str = "budget") -> None:
        """Raise an EdgewiseError with the numbers if the step's SRAM exceeds `budget` bytes."""
        if self.peak_kb * 1024 > budget:
            raise EdgewiseError(
                f"the planned step needs {self.peak_kb:.1f} KB (arena {self.arena_kb:.1f} KB + trained parameters "
                f"{self.trained_param_bytes / 1024:.1f} KB), over the {budget / 1024:.1f} KB {what}: train fewer layers "
                "(bias_depth, weights), lower --resolution, or use `tiny compile --search`"
            )

    @property
    def kept_for_backward(self) -> int:
        """Bytes live when the loss is computed: what the forward pass keeps for the backward pass."""
        loss_step = next(i for i, n in enumerate(self.graph.nodes) if n.op == "cross_entropy")
        return self.memory.live_bytes()[loss_step]


def training_plan(
    model: nn.Module | tuple[Graph, dict[str, torch.Tensor]], input_shape: tuple[int, ...], scheme: Scheme | None = None,
    lr: float = 0.01, reorder: bool = True, precision: str = "fp32", update_rule: str = "stochastic", layout_stage: str = "streamed",
) -> TrainingPlan:  # fmt: skip
    """Compile `model` for one training step; `scheme` None trains every parameter (full update).

    `model` may also be the (graph, params) that `from_module(model, input_shape)` returned: a search
    that plans many schemes of one model traces it once (the graph is copied, never modified)."""
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision must be 'fp32' or 'int8', got '{precision}'")
    if isinstance(model, tuple):
        graph, params = copy.deepcopy(model[0]), model[1]
    else:
        graph, params = from_module(model, input_shape)
    if scheme is None:
        trainable, slices = set(graph.params), {}
    else:
        sparse = apply_scheme(graph, scheme)
        trainable, slices = sparse.trainable, sparse.weight_slices
    grads = autodiff.append_backward(graph, trainable, weight_slices=slices)
    schedule.append_updates(graph, grads, lr, reorder=reorder)
    layout = int8_layout(graph, layout_stage) if precision == "int8" else None
    return TrainingPlan(graph, params, memory.plan_memory(graph, layout), trainable, reorder, precision, update_rule, layout)


def plan_table(plan: TrainingPlan) -> str:
    live = plan.memory.live_bytes()
    rows = ["| step | op | output | shape | KB | live KB |", "|---:|---|---|---|---:|---:|"]
    for step, node in enumerate(plan.graph.nodes):
        out = node.outputs[0]
        size = _size_note(plan, node, out)
        rows.append(f"| {step} | {node.op} | {out} | {'x'.join(map(str, plan.graph.values[out].shape)) or 'scalar'} | {size} | {live[step] / 1024:.1f} |")
    n_params = sum(plan.graph.values[p].numel for p in plan.trainable)
    rows.append("")
    rows.append(
        f"{len(plan.graph.nodes)} ops, {len(plan.trainable)} trained tensors ({n_params:,} values); "
        f"{plan.precision} graph; arena peak {plan.arena_kb:.1f} KB (lower bound {plan.memory.lower_bound / 1024:.1f} KB) "
        f"+ trained parameters {plan.trained_param_bytes / 1024:.1f} KB = {plan.peak_kb:.1f} KB; "
        f"updates {'in place, reordered' if plan.reorder else 'after the backward pass'}"
    )
    return "\n".join(rows)


def _size_note(plan: TrainingPlan, node: Node, out: str) -> str:
    alloc = plan.memory.allocations.get(out)
    if alloc:
        return f"{alloc.size / 1024:.1f}"
    layout = plan.layout or memory.Layout()
    if node.op == "sgd_update":
        return "in place"
    if out in layout.streamed:
        return "streamed rows"
    if out in layout.lazy:
        return "computed when read"
    if out in layout.aliases:
        return f"reuses {layout.aliases[out]}"
    return "-"


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
    ax.axhline(plan.arena_kb, color="C3", lw=0.8)
    ax.text(0, plan.arena_kb, f"arena {plan.arena_kb:.0f} KB", fontsize=8, color="C3", va="bottom")
    ax.set_xlabel("op (execution order)")
    ax.set_ylabel("live activations + gradients (KB)")
    ax.set_title(f"Training-step memory ({plan.precision} graph): {len(plan.trainable)} trained tensors, arena {plan.arena_kb:.0f} KB + trained parameters {plan.trained_param_bytes / 1024:.0f} KB")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
