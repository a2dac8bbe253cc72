"""PyTorch module -> training IR, through torch.fx.

`from_module(model, input_shape)` traces the module in eval mode, folds each BatchNorm2d into
the convolution before it, and maps every fx node onto an IR op (`edgewise.tiny.ir`). Every conv
and linear gets an explicit bias parameter (from the layer, from the folded BN, or zeros), since
biases are what sparse update trains first. The graph ends with a cross-entropy loss on a label
input, so it is ready for autodiff.

Anything outside the supported set gets an `UnsupportedOpError` naming the op and the fx node.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgewise.errors import EdgewiseError
from edgewise.tiny.ir import Graph

IMAGE, LABEL, LOGITS, LOSS = "image", "label", "logits", "loss"


class UnsupportedOpError(EdgewiseError):
    pass


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) of one conv computing conv followed by bn in eval mode."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    weight = conv.weight.detach() * scale[:, None, None, None]
    return weight, (bias - bn.running_mean) * scale + bn.bias.detach()


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} '{target}' (fx node '{node.name}')"


class _Converter:
    def __init__(self, gm: fx.GraphModule, batch: int):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.graph = Graph()
        self.params: dict[str, torch.Tensor] = {}
        self.env: dict[str, str] = {}  # fx node name -> IR value name
        self.batch = batch
        self.folded: set[str] = set()  # BatchNorm fx nodes already folded into their conv

    def value(self, arg) -> str:
        if not isinstance(arg, fx.Node) or arg.name not in self.env:
            raise UnsupportedOpError(f"expected a tensor computed by a supported op, got {arg!r}")
        return self.env[arg.name]

    def param(self, name: str, tensor: torch.Tensor) -> str:
        self.graph.add_value(name, tuple(tensor.shape), kind="param")
        self.params[name] = tensor.detach().to(torch.float32).clone()
        return name

    def emit(self, fx_node: fx.Node, op: str, inputs: list[str], shape: tuple[int, ...], attrs: dict | None = None) -> None:
        out = self.graph.fresh(fx_node.name)
        self.graph.add_node(op, inputs, [(out, shape)], attrs, source=_describe(fx_node))
        self.env[fx_node.name] = out

    def alias(self, fx_node: fx.Node, source: fx.Node) -> None:
        """A reshape that keeps the IR value (flatten [N,C,1,1] -> [N,C], dropout, identity)."""
        src = self.value(source)
        have = [d for d in self.graph.values[src].shape if d != 1]
        want = [d for d in fx_node.meta["tensor_meta"].shape if d != 1]
        if have != want:
            raise UnsupportedOpError(f"{_describe(fx_node)} reshapes {self.graph.values[src].shape} to {tuple(fx_node.meta['tensor_meta'].shape)}; only flattening [N, C, 1, 1] is supported")
        self.env[fx_node.name] = src

    def conv(self, fx_node: fx.Node, conv: nn.Conv2d) -> None:
        if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or isinstance(conv.padding, str):
            raise UnsupportedOpError(f"{_describe(fx_node)}: conv2d with dilation, string padding or padding_mode '{conv.padding_mode}' is not supported")
        users = list(fx_node.users)
        bn_node = users[0] if len(users) == 1 and users[0].op == "call_module" and isinstance(self.modules[users[0].target], nn.BatchNorm2d) else None
        if bn_node is not None:
            weight, bias = fold_batchnorm(conv, self.modules[bn_node.target])
            self.folded.add(bn_node.name)
        else:
            weight = conv.weight.detach()
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        w = self.param(f"{fx_node.target}.weight", weight)
        b = self.param(f"{fx_node.target}.bias", bias)
        attrs = {"stride": tuple(conv.stride), "padding": tuple(conv.padding), "groups": conv.groups}
        self.emit(fx_node, "conv2d", [self.value(fx_node.args[0]), w, b], tuple(fx_node.meta["tensor_meta"].shape), attrs)
        if bn_node is not None:
            self.env[bn_node.name] = self.env[fx_node.name]

    def linear(self, fx_node: fx.Node, layer: nn.Linear) -> None:
        shape = self.graph.values[self.value(fx_node.args[0])].shape
        if shape != (self.batch, layer.in_features):
            raise UnsupportedOpError(f"{_describe(fx_node)}: linear expects [N, {layer.in_features}] input, got {shape} (flatten the pooled features first)")
        w = self.param(f"{fx_node.target}.weight", layer.weight)
        b = self.param(f"{fx_node.target}.bias", layer.bias if layer.bias is not None else torch.zeros(layer.out_features))
        self.emit(fx_node, "linear", [self.value(fx_node.args[0]), w, b], (self.batch, layer.out_features))

    def mean_hw(self, fx_node: fx.Node, x: fx.Node) -> None:
        shape = self.graph.values[self.value(x)].shape
        if len(shape) != 4:
            raise UnsupportedOpError(f"{_describe(fx_node)}: global average pooling expects [N, C, H, W], got {shape}")
        self.emit(fx_node, "mean_hw", [self.value(x)], shape[:2])

    def call_module(self, node: fx.Node) -> None:
        mod = self.modules[node.target]
        if isinstance(mod, nn.Conv2d):
            self.conv(node, mod)
        elif isinstance(mod, nn.BatchNorm2d):
            if node.name not in self.folded:
                raise UnsupportedOpError(f"{_describe(node)}: BatchNorm2d must directly follow a Conv2d (it is folded into it)")
        elif isinstance(mod, (nn.ReLU, nn.ReLU6)):
            self.emit(node, "relu" if isinstance(mod, nn.ReLU) else "relu6", [self.value(node.args[0])], self.graph.values[self.value(node.args[0])].shape)
        elif isinstance(mod, nn.Linear):
            self.linear(node, mod)
        elif isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
            self.mean_hw(node, node.args[0])
        elif isinstance(mod, (nn.Dropout, nn.Identity, nn.Flatten)):
            self.alias(node, node.args[0])
        else:
            raise UnsupportedOpError(f"unsupported op {type(mod).__name__} at {_describe(node)}; supported: Conv2d (+BatchNorm2d), ReLU, ReLU6, add, global average pooling, flatten, Linear")

    def call_function(self, node: fx.Node) -> None:
        fn = node.target
        if fn in (operator.add, torch.add) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs:
            a, b = (self.value(x) for x in node.args)
            if self.graph.values[a].shape != self.graph.values[b].shape:
                raise UnsupportedOpError(f"{_describe(node)}: add needs equal shapes, got {self.graph.values[a].shape} and {self.graph.values[b].shape}")
            self.emit(node, "add", [a, b], self.graph.values[a].shape)
        elif fn in (F.relu, torch.relu):
            self.emit(node, "relu", [self.value(node.args[0])], self.graph.values[self.value(node.args[0])].shape)
        elif fn is F.relu6:
            self.emit(node, "relu6", [self.value(node.args[0])], self.graph.values[self.value(node.args[0])].shape)
        elif fn is F.adaptive_avg_pool2d and node.args[1] in (1, (1, 1)):
            self.mean_hw(node, node.args[0])
        elif fn is torch.flatten:
            self.alias(node, node.args[0])
        elif fn is F.dropout:
            self.alias(node, node.args[0])
        else:
            raise UnsupportedOpError(f"unsupported op at {_describe(node)}")

    def call_method(self, node: fx.Node) -> None:
        if node.target in ("flatten", "view", "reshape", "squeeze"):
            self.alias(node, node.args[0])
        elif node.target == "mean" and tuple(sorted(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ()))) in ((2, 3), (-2, -1)):
            self.mean_hw(node, node.args[0])
        elif node.target == "size":
            pass  # a shape read, consumed by a reshape that alias() checks
        else:
            raise UnsupportedOpError(f"unsupported op at {_describe(node)}")

    def convert(self, n_classes: int) -> Graph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.graph.inputs:
                    raise UnsupportedOpError(f"the model takes more than one input ({_describe(node)}); tiny training needs a single image input")
                self.graph.add_value(IMAGE, tuple(node.meta["tensor_meta"].shape), kind="input")
                self.graph.inputs.append(IMAGE)
                self.env[node.name] = IMAGE
            elif node.op in ("call_module", "call_function", "call_method"):
                getattr(self, node.op)(node)
            elif node.op == "output":
                out = node.args[0]
                logits = self.value(out if isinstance(out, fx.Node) else out[0])
                shape = self.graph.values[logits].shape
                if shape != (self.batch, n_classes):
                    raise UnsupportedOpError(f"the model's output is {shape}; expected logits [{self.batch}, {n_classes}]")
            else:
                raise UnsupportedOpError(f"unsupported op at {_describe(node)}")
        g = self.graph
        g.add_value(LABEL, (self.batch,), kind="input", dtype="int64")
        g.inputs.append(LABEL)
        # name the logits and the loss for everything downstream
        g.values[LOGITS] = g.values.pop(logits)
        g.values[LOGITS].name = LOGITS
        for n in g.nodes:
            n.inputs = [LOGITS if i == logits else i for i in n.inputs]
            n.outputs = [LOGITS if o == logits else o for o in n.outputs]
        g.add_node("cross_entropy", [LOGITS, LABEL], [(LOSS, ())], source="loss")
        g.outputs = [LOGITS, LOSS]
        return g


def from_module(model: nn.Module, input_shape: tuple[int, ...], n_classes: int | None = None) -> tuple[Graph, dict[str, torch.Tensor]]:
    """Trace `model` (eval mode) at `input_shape` ([N, C, H, W]) into a training graph and its parameters."""
    was_training = model.training
    model.eval()
    try:
        gm = fx.symbolic_trace(model)
        with torch.no_grad():
            out = ShapeProp(gm).propagate(torch.zeros(input_shape))
    finally:
        model.train(was_training)
    n_classes = n_classes or out.shape[-1]
    conv = _Converter(gm, input_shape[0])
    graph = conv.convert(n_classes)
    return graph, conv.params


def forward_graph(graph: Graph, batch: int | None = None) -> Graph:
    """The inference part of a training graph (image -> logits), optionally for another batch size
    (inputs and activations lead with the batch; parameters keep their shapes)."""
    nodes = []
    for node in graph.nodes:
        nodes.append(node)
        if node.outputs[0] == LOGITS:
            break
    values = {name: graph.values[name] for node in nodes for name in node.inputs + node.outputs}
    if batch is not None:
        values = {name: dataclasses.replace(v, shape=(batch, *v.shape[1:])) if v.kind != "param" and v.shape else v for name, v in values.items()}
    return Graph(values, nodes, [IMAGE], [LOGITS])
