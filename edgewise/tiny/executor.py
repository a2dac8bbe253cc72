"""The fp32 reference executor: runs a training graph node by node with plain torch ops.

Each IR op has one definition here (`FP32_OPS`). The backward ops are written out as the math
they are (transposed convolution, unfolded products, masks), not by calling autograd, so tests
against torch autograd check the gradient rules rather than autograd against itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgewise.tiny.ir import Graph


def conv2d_grad_input(g: torch.Tensor, w: torch.Tensor, stride, padding, groups: int, input_shape) -> torch.Tensor:
    """dL/dx of a convolution: the transposed convolution of the output gradient with the weights."""
    kh, kw = w.shape[2:]
    output_padding = tuple(
        input_shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + (kh, kw)[i]) for i in range(2)
    )
    return F.conv_transpose2d(g, w, stride=stride, padding=padding, output_padding=output_padding, groups=groups)


def conv2d_grad_weight(x: torch.Tensor, g: torch.Tensor, stride, padding, groups: int, weight_shape) -> torch.Tensor:
    """dL/dw of a convolution: each weight tap times the input patches it saw, summed over batch and positions."""
    out_ch, in_per_group, kh, kw = weight_shape
    n = x.shape[0]
    patches = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [N, C*kh*kw, L]
    patches = patches.view(n, groups, in_per_group * kh * kw, -1)
    grads = g.reshape(n, groups, out_ch // groups, -1)  # [N, G, O/G, L]
    return torch.einsum("ngol,ngkl->gok", grads, patches).reshape(weight_shape)


def cross_entropy_grad(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """d(mean cross-entropy)/dlogits = (softmax - onehot) / N."""
    return (logits.softmax(-1) - F.one_hot(label, logits.shape[-1]).to(logits.dtype)) / logits.shape[0]


FP32_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "conv2d": lambda x, w, b, stride, padding, groups: F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups),
    "relu": lambda x: x.clamp(min=0),
    "relu6": lambda x: x.clamp(0, 6),
    "add": lambda a, b: a + b,
    "mean_hw": lambda x: x.mean((2, 3)),
    "linear": lambda x, w, b: x @ w.T + b,
    "cross_entropy": lambda logits, label: F.cross_entropy(logits, label),
    "conv2d_grad_input": conv2d_grad_input,
    "conv2d_grad_weight": conv2d_grad_weight,
    "sum_nhw": lambda g: g.sum((0, 2, 3)),
    "relu_grad": lambda g, y: g * (y > 0),
    "relu6_grad": lambda g, y: g * ((y > 0) & (y < 6)),
    "mean_hw_grad": lambda g, input_shape: (g[:, :, None, None] / (input_shape[2] * input_shape[3])).expand(input_shape).contiguous(),
    "linear_grad_input": lambda g, w: g @ w,
    "linear_grad_weight": lambda x, g: g.T @ x,
    "sum_n": lambda g: g.sum(0),
    "cross_entropy_grad": cross_entropy_grad,
    "slice_channels": lambda x, channels: x[:, :channels].contiguous(),
    "sgd_update": lambda p, g, lr: torch.cat([p[:, : g.shape[1]] - lr * g, p[:, g.shape[1] :]], dim=1) if g.shape != p.shape else p - lr * g,
}


def run(graph: Graph, params: dict[str, torch.Tensor], feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every value of `graph` after running all its nodes, from `params` and the input `feeds`."""
    missing = [name for name in graph.inputs if name not in feeds]
    if missing:
        raise KeyError(f"missing graph inputs: {', '.join(missing)}")
    env: dict[str, torch.Tensor] = {**params, **feeds}
    with torch.no_grad():
        for node in graph.nodes:
            out = FP32_OPS[node.op](*(env[i] for i in node.inputs), **node.attrs)
            expected = graph.values[node.outputs[0]].shape
            if tuple(out.shape) != expected:
                raise RuntimeError(f"{node}: produced shape {tuple(out.shape)}, the graph says {expected}")
            env[node.outputs[0]] = out
    return env
