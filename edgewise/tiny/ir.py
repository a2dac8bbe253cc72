"""The training IR: a flat list of nodes over named tensor values, in execution order.

A `Value` is a tensor of known shape: an input (image, label), a parameter, or something a node
produces. A `Node` names its op, input values, output values and static attributes. Forward and
backward live in one `Graph`; passes read and rewrite it (torch.fx style), and the executors
run it node by node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Forward ops and what they compute (NCHW, batch N):
#   conv2d(x, w, b)           stride, padding, groups           x [N,C,H,W], w [O,C/groups,kh,kw], b [O]
#   relu(x), relu6(x)
#   add(a, b)
#   mean_hw(x)                global average pooling            [N,C,H,W] -> [N,C]
#   linear(x, w, b)                                             x [N,I], w [O,I], b [O]
#   cross_entropy(logits, label)  mean over the batch of -log softmax(logits)[label]  -> []
# Backward ops (emitted by autodiff's rule table):
#   conv2d_grad_input(g, w)   stride, padding, groups, input_shape
#   conv2d_grad_weight(x, g)  stride, padding, groups, weight_shape
#   sum_nhw(g)                a conv bias gradient: [N,O,H,W] -> [O]
#   relu_grad(g, y), relu6_grad(g, y)   g where the activation y passed its input through, else 0
#   mean_hw_grad(g)           input_shape                       [N,C] -> [N,C,H,W]
#   linear_grad_input(g, w), linear_grad_weight(x, g), sum_n(g)
#   cross_entropy_grad(logits, label)   (softmax - onehot) / N
# Sparse update: slice_channels(x; channels) = x[:, :channels], kept for a partial weight gradient
#   (conv2d_grad_weight then yields [O, channels, kh, kw]).
# Update (emitted by the scheduler): sgd_update(p, g; lr) = p - lr * g, in place on the MCU; a
#   partial gradient updates the first input channels of p only.
FORWARD_OPS = ("conv2d", "relu", "relu6", "add", "mean_hw", "linear", "cross_entropy")


@dataclass
class Value:
    name: str
    shape: tuple[int, ...]
    kind: str  # "input", "param" or "activation" (anything a node makes, gradients included)
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the module or fx node this came from, for error messages

    def __str__(self) -> str:
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{', '.join(self.outputs)} = {self.op}({', '.join(self.inputs)}{'; ' + attrs if attrs else ''})"


@dataclass
class Graph:
    values: dict[str, Value] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def add_value(self, name: str, shape: tuple[int, ...], kind: str = "activation", dtype: str = "float32") -> str:
        if name in self.values:
            raise ValueError(f"value '{name}' defined twice")
        self.values[name] = Value(name, tuple(int(d) for d in shape), kind, dtype)
        return name

    def add_node(self, op: str, inputs: list[str], outputs: list[tuple[str, tuple[int, ...]]], attrs: dict | None = None, source: str = "") -> Node:
        for name in inputs:
            if name not in self.values:
                raise ValueError(f"{op} node reads '{name}', which no earlier node or input defines")
        out_names = [self.add_value(name, shape) for name, shape in outputs]
        node = Node(f"n{len(self.nodes)}_{op}", op, list(inputs), out_names, dict(attrs or {}), source)
        self.nodes.append(node)
        return node

    def fresh(self, base: str) -> str:
        """A value name not used yet, derived from `base`."""
        if base not in self.values:
            return base
        i = 1
        while f"{base}.{i}" in self.values:
            i += 1
        return f"{base}.{i}"

    @property
    def params(self) -> list[str]:
        return [v.name for v in self.values.values() if v.kind == "param"]

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        uses: dict[str, list[Node]] = {name: [] for name in self.values}
        for node in self.nodes:
            for name in node.inputs:
                uses[name].append(node)
        return uses

    def __str__(self) -> str:
        return "\n".join(str(n) for n in self.nodes)
