"""Sparse update schemes: which parameters a training step updates.

A scheme (the paper's sparse update) is a small JSON:

    {"bias_depth": 12,                                  # biases of the last 12 convs
     "weights": {"features.16.conv.0.0": 1,            # whole weight of this conv
                 "features.15.conv.0.0": 0.125},       # first 1/8 of its input channels
     "classifier": true}                                # the final linear layer (fp32), default true

Ratios are 0, 1/8, 1/4, 1/2 or 1 of a conv's input channels; a partial ratio needs an ordinary
(groups = 1) conv. A partial weight's gradient needs only that slice of the layer's input, so
`apply_scheme` inserts a `slice_channels` node right where the input is made: the backward pass
keeps the small slice alive, not the whole activation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from edgewise.errors import EdgewiseError
from edgewise.tiny.ir import Graph, Node

RATIOS = (0.0, 0.125, 0.25, 0.5, 1.0)


class SchemeError(EdgewiseError):
    pass


@dataclass
class Scheme:
    bias_depth: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    classifier: bool = True
    source: str = field(default="scheme", compare=False)  # where it came from, for error messages

    @classmethod
    def from_dict(cls, data: dict, source: str = "scheme") -> "Scheme":
        unknown = sorted(set(data) - {"bias_depth", "weights", "classifier"})
        if unknown:
            raise SchemeError(f"{source}: unknown field(s) {', '.join(unknown)}; expected bias_depth, weights, classifier")
        depth = data.get("bias_depth", 0)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise SchemeError(f"{source}: bias_depth must be a non-negative integer, got {depth!r}")
        weights = data.get("weights", {})
        if not isinstance(weights, dict):
            raise SchemeError(f"{source}: weights must map layer names to ratios, got {type(weights).__name__}")
        for layer, ratio in weights.items():
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not any(math.isclose(ratio, r) for r in RATIOS):
                raise SchemeError(f"{source}: weights['{layer}'] = {ratio!r}; a ratio must be one of 0, 1/8, 1/4, 1/2, 1")
        classifier = data.get("classifier", True)
        if not isinstance(classifier, bool):
            raise SchemeError(f"{source}: classifier must be true or false, got {classifier!r}")
        return cls(depth, {k: float(v) for k, v in weights.items() if v}, classifier, source)

    @classmethod
    def load(cls, path: str | Path) -> "Scheme":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8
            raise SchemeError(f"{path}: cannot read the scheme as UTF-8 JSON ({exc})") from None
        except RecursionError:
            raise SchemeError(f"{path}: the scheme nests too deeply to be a scheme (expected {{\"bias_depth\": N, \"weights\": {{layer: ratio}}}})") from None
        if not isinstance(data, dict):
            raise SchemeError(f"{path}: a scheme is a JSON object")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        return {"bias_depth": self.bias_depth, "weights": dict(self.weights), "classifier": self.classifier}


def conv_layers(graph: Graph) -> dict[str, Node]:
    """Forward conv nodes by layer name (the weight parameter's name without '.weight'), in order."""
    return {n.inputs[1].removesuffix(".weight"): n for n in graph.nodes if n.op == "conv2d"}


@dataclass
class SparsePlan:
    trainable: set[str]
    weight_slices: dict[str, str]  # partially trained weight -> the sliced input value its gradient reads


def apply_scheme(graph: Graph, scheme: Scheme) -> SparsePlan:
    """The parameters `scheme` trains in `graph`; inserts the input slices partial weights need."""
    source = scheme.source
    convs = conv_layers(graph)
    names = list(convs)
    if scheme.bias_depth > len(names):
        raise SchemeError(f"{source}: bias_depth {scheme.bias_depth} exceeds the model's {len(names)} conv layers")
    trainable = {f"{name}.bias" for name in names[len(names) - scheme.bias_depth :]}
    slices: dict[str, str] = {}
    for layer, ratio in scheme.weights.items():
        if layer not in convs:
            raise SchemeError(f"{source}: no conv layer named '{layer}'; layers are {', '.join(names[:3])}, ..., {', '.join(names[-3:])}")
        node = convs[layer]
        weight = node.inputs[1]
        trainable.add(weight)
        if ratio < 1:
            if node.attrs["groups"] != 1:
                raise SchemeError(f"{source}: '{layer}' is a grouped/depthwise conv; a partial ratio ({ratio}) needs an ordinary conv")
            n_in = graph.values[weight].shape[1]
            slices[weight] = _insert_slice(graph, node, max(1, round(n_in * ratio)))
    if scheme.classifier:
        trainable.update(p for n in graph.nodes if n.op == "linear" for p in n.inputs[1:])
    return SparsePlan(trainable, slices)


def _insert_slice(graph: Graph, conv: Node, channels: int) -> str:
    """A `slice_channels` node right after the conv's input is made (or at the start, for the image)."""
    x = conv.inputs[0]
    n, _, h, w = graph.values[x].shape
    node = graph.add_node("slice_channels", [x], [(graph.fresh(f"{x}[:{channels}]"), (n, channels, h, w))], {"channels": channels}, source=f"input slice for {conv.inputs[1]}")
    graph.nodes.pop()
    producers = graph.producers()
    at = graph.nodes.index(producers[x]) + 1 if x in producers else 0
    graph.nodes.insert(at, node)
    return node.outputs[0]
