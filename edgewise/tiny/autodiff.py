"""Compile-time autodiff: the backward graph from a table of gradient rules, pruned to what the
trained parameters need.

`GRAD_RULES[op](ctx, node, grad_out)` emits the backward nodes of one forward node and returns
{input value: its gradient value} for the inputs whose gradient is needed (`ctx.needs(name)`).
`append_backward(graph, trainable)` walks the forward nodes in reverse and applies the rules:
- only parameters in `trainable` get gradients, and a value's gradient is derived only if it is
  computed from a trainable parameter (backward pruning: with only the last layers trained, the
  backward pass stops there and the first layers need no input gradients at all);
- a value read by several nodes (a residual) gets the sum of their gradients.
The gradient of parameter P is the value `grad:P`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from edgewise.tiny.ir import Graph, Node

GRAD_PREFIX = "grad:"


def grad_name(value: str) -> str:
    return GRAD_PREFIX + value


class _Context:
    def __init__(self, graph: Graph, needed: set[str], weight_slices: dict[str, str]):
        self.graph = graph
        self.needed = needed
        self.weight_slices = weight_slices  # partially trained weight -> the input slice its gradient reads

    def needs(self, value: str) -> bool:
        return value in self.needed

    def emit(self, op: str, inputs: list[str], target: str, attrs: dict | None = None, source: str = "", shape: tuple[int, ...] | None = None) -> str:
        name = self.graph.fresh(f"{GRAD_PREFIX}{target}")
        self.graph.add_node(op, inputs, [(name, shape or self.graph.values[target].shape)], attrs, source=source)
        return name


def _conv2d(ctx: _Context, node: Node, g: str) -> dict[str, str]:
    x, w, b = node.inputs
    conv = {k: node.attrs[k] for k in ("stride", "padding", "groups")}
    grads = {}
    if ctx.needs(x):
        grads[x] = ctx.emit("conv2d_grad_input", [g, w], x, {**conv, "input_shape": ctx.graph.values[x].shape}, node.name)
    if ctx.needs(w):
        # a partially trained weight: the gradient of its first input channels, from that input slice
        x_w = ctx.weight_slices.get(w, x)
        shape = (ctx.graph.values[w].shape[0], ctx.graph.values[x_w].shape[1] // conv["groups"], *ctx.graph.values[w].shape[2:])
        grads[w] = ctx.emit("conv2d_grad_weight", [x_w, g], w, {**conv, "weight_shape": shape}, node.name, shape)
    if ctx.needs(b):
        grads[b] = ctx.emit("sum_nhw", [g], b, source=node.name)
    return grads


def _activation(grad_op: str):
    def rule(ctx: _Context, node: Node, g: str) -> dict[str, str]:
        (x,) = node.inputs
        return {x: ctx.emit(grad_op, [g, node.outputs[0]], x, source=node.name)} if ctx.needs(x) else {}

    return rule


def _add(ctx: _Context, node: Node, g: str) -> dict[str, str]:
    return {x: g for x in node.inputs if ctx.needs(x)}  # the same tensor flows back to both


def _mean_hw(ctx: _Context, node: Node, g: str) -> dict[str, str]:
    (x,) = node.inputs
    return {x: ctx.emit("mean_hw_grad", [g], x, {"input_shape": ctx.graph.values[x].shape}, node.name)} if ctx.needs(x) else {}


def _linear(ctx: _Context, node: Node, g: str) -> dict[str, str]:
    x, w, b = node.inputs
    grads = {}
    if ctx.needs(x):
        grads[x] = ctx.emit("linear_grad_input", [g, w], x, source=node.name)
    if ctx.needs(w):
        grads[w] = ctx.emit("linear_grad_weight", [x, g], w, source=node.name)
    if ctx.needs(b):
        grads[b] = ctx.emit("sum_n", [g], b, source=node.name)
    return grads


def _cross_entropy(ctx: _Context, node: Node, g: str | None) -> dict[str, str]:
    logits, label = node.inputs
    # the loss is the root: its own gradient is 1, folded into the rule
    return {logits: ctx.emit("cross_entropy_grad", [logits, label], logits, source=node.name)} if ctx.needs(logits) else {}


GRAD_RULES: dict[str, Callable[[_Context, Node, str], dict[str, str]]] = {
    "conv2d": _conv2d,
    "relu": _activation("relu_grad"),
    "relu6": _activation("relu6_grad"),
    "add": _add,
    "mean_hw": _mean_hw,
    "linear": _linear,
    "cross_entropy": _cross_entropy,
}


def depends_on_trainable(graph: Graph, trainable: set[str]) -> set[str]:
    """Values whose gradient is needed: the trainable parameters and every value computed from one.
    Anything else (the input image, frozen weights, activations before the first trained layer) has
    a gradient nobody reads, so its backward ops are never emitted."""
    marked = set(trainable)
    for node in graph.nodes:
        if any(i in marked for i in node.inputs):
            marked.update(node.outputs)
    return marked


def append_backward(graph: Graph, trainable: Iterable[str], loss: str = "loss", weight_slices: dict[str, str] | None = None) -> dict[str, str]:
    """Append the backward nodes for `trainable` parameters to `graph`; returns {param: grad value}.

    `weight_slices` (from `sparse.apply_scheme`) names, per partially trained conv weight, the input
    slice its gradient reads; that gradient then covers only the first input channels."""
    trainable = set(trainable)
    unknown = sorted(trainable - set(graph.params))
    if unknown:
        raise KeyError(f"not parameters of the graph: {', '.join(unknown)}")
    forward = list(graph.nodes)
    needed = depends_on_trainable(graph, trainable)
    ctx = _Context(graph, needed, weight_slices or {})
    grads: dict[str, list[str]] = {}  # value -> gradient contributions still to be summed
    for node in reversed(forward):
        if node.op == "slice_channels":
            continue  # made only for the backward pass
        if node.op not in GRAD_RULES:
            raise NotImplementedError(f"no gradient rule for op '{node.op}' ({node.source or node.name})")
        if node.op == "cross_entropy":
            if node.outputs[0] != loss:
                continue
            g = None
        else:
            parts = grads.pop(node.outputs[0], [])
            if not parts:
                continue  # nothing downstream needs this node's gradient
            g = parts[0]
            for extra in parts[1:]:
                g = ctx.emit("add", [g, extra], node.outputs[0], source=f"sum of gradients of {node.outputs[0]}")
        for value, grad in GRAD_RULES[node.op](ctx, node, g).items():
            grads.setdefault(value, []).append(grad)
    result = {}
    for p in sorted(trainable):
        parts = grads.get(p, [])
        if len(parts) != 1:
            raise RuntimeError(f"parameter {p} got {len(parts)} gradients; the graph does not reach the loss from it")
        result[p] = parts[0]
    graph.outputs = list(dict.fromkeys(graph.outputs + list(result.values())))
    return result
