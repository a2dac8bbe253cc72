"""Post-training int8 quantization of a training graph's forward pass (BN already folded).

- Weights of every conv: symmetric int8 per output channel (scale max|w| / 127).
- Activations: int8 per tensor with a zero point, from the min/max seen on calibration images
  (the range always includes 0, so real zero is exact and zero padding stays exact).
- Conv biases: int32 at scale s_x * s_w[o]; accumulators int32; fp32 requantization.
- A ReLU/ReLU6 right after a conv is fused into its requantization clamp.
- The classifier (linear) stays fp32 on the dequantized pooled features, as in the paper.

`quantize_graph` returns a `QuantizedGraph`: the graph plus every constant the int8 ops need,
precomputed once (fp32 multipliers, int32 biases), so the reference executor here and the C
generator read the very same numbers. `run_int8` is the int8 reference forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgewise.tiny import executor, int8_ops
from edgewise.tiny.frontend import IMAGE, forward_graph
from edgewise.tiny.ir import Graph


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int

    @classmethod
    def from_range(cls, lo: float, hi: float) -> "QParams":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, 1e-8) / 255.0
        zero_point = int(round(int8_ops.QMIN - lo / scale))
        return cls(float(scale), max(int8_ops.QMIN, min(int8_ops.QMAX, zero_point)))


@dataclass
class QuantizedGraph:
    graph: Graph
    act: dict[str, QParams]  # every int8 activation value (fused activations share their conv's)
    alias: dict[str, str]  # fused relu outputs -> the conv output that already holds them
    weights: dict[str, torch.Tensor]  # conv weight param -> int8 codes
    weight_scales: dict[str, torch.Tensor]  # conv weight param -> fp32 scale per output channel
    consts: dict[str, dict] = field(default_factory=dict)  # node name -> its int8 op's constants
    fp32_params: dict[str, torch.Tensor] = field(default_factory=dict)  # the classifier

    def qparams(self, value: str) -> QParams:
        return self.act[self.alias.get(value, value)]


def calibrate(graph: Graph, params: dict[str, torch.Tensor], images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Min and max of every forward value over the calibration images (fp32 executor, a graph batch at a time)."""
    batch = graph.values[IMAGE].shape[0]
    ranges: dict[str, tuple[float, float]] = {}
    for chunk in images.split(batch):
        env = executor.run(forward_graph(graph, len(chunk)), params, {IMAGE: chunk})
        for name, t in env.items():
            if graph.values[name].kind != "param":
                lo, hi = ranges.get(name, (float("inf"), float("-inf")))
                ranges[name] = (min(lo, float(t.min())), max(hi, float(t.max())))
    return ranges


def quantize_graph(graph: Graph, params: dict[str, torch.Tensor], calibration_images: torch.Tensor) -> QuantizedGraph:
    ranges = calibrate(graph, params, calibration_images)
    consumers = graph.consumers()
    nodes = forward_graph(graph).nodes
    qg = QuantizedGraph(graph, {IMAGE: QParams.from_range(*ranges[IMAGE])}, {}, {}, {})
    for node in nodes:
        out = node.outputs[0]
        if node.op == "conv2d":
            x, w, b = node.inputs
            users = consumers[out]
            fused = users[0] if len(users) == 1 and users[0].op in ("relu", "relu6") else None
            y = fused.outputs[0] if fused else out
            qg.act[out] = QParams.from_range(*ranges[y])
            if fused:
                qg.alias[y] = out
            w_scale = (params[w].abs().amax(dim=(1, 2, 3)) / 127.0).clamp(min=1e-12)
            qg.weights[w] = int8_ops.round_half_away(params[w] / w_scale[:, None, None, None]).clamp(-127, 127).to(torch.int8)
            qg.weight_scales[w] = w_scale.to(torch.float32)
            sx, sy = qg.qparams(x).scale, qg.act[out].scale
            lo, hi = int8_ops.QMIN, int8_ops.QMAX
            if fused:  # the activation is the clamp: real 0 (and 6) in the output's codes
                zy = qg.act[out].zero_point
                lo = max(lo, zy)
                if fused.op == "relu6":
                    hi = min(hi, zy + int(int8_ops.round_half_away(torch.tensor(6.0 / sy))))
            acc_scale = sx * w_scale.double()
            qg.consts[node.name] = {
                "bias_i32": int8_ops.round_half_away(params[b].double() / acc_scale).to(torch.int32),
                "multiplier": (acc_scale / sy).to(torch.float32),
                "qmin": lo,
                "qmax": hi,
            }
        elif node.op == "slice_channels":
            continue  # kept only for a sparse update's backward pass
        elif node.op in ("relu", "relu6"):
            if node.outputs[0] not in qg.alias:
                raise NotImplementedError(f"{node.source or node.name}: int8 {node.op} must directly follow a conv (it is fused into it)")
        elif node.op == "add":
            a, b = node.inputs
            qg.act[out] = QParams.from_range(*ranges[out])
            sy = qg.act[out].scale
            qg.consts[node.name] = {"m_a": float(torch.tensor(qg.qparams(a).scale / sy, dtype=torch.float32)), "m_b": float(torch.tensor(qg.qparams(b).scale / sy, dtype=torch.float32))}
        elif node.op == "mean_hw":
            (x,) = node.inputs
            qg.act[out] = QParams.from_range(*ranges[out])
            h, w = graph.values[x].shape[2:]
            qg.consts[node.name] = {"multiplier": float(torch.tensor(qg.qparams(x).scale / (h * w * qg.act[out].scale), dtype=torch.float32))}
        elif node.op == "linear":
            _, w, b = node.inputs
            qg.fp32_params[w], qg.fp32_params[b] = params[w], params[b]
        else:
            raise NotImplementedError(f"no int8 form for op '{node.op}' ({node.source or node.name})")
    return qg


INT8_FORWARD_OPS = ("conv2d", "relu", "relu6", "add", "mean_hw", "slice_channels", "linear")


def int8_forward_op(
    qg: QuantizedGraph, node, env: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None,
    biases: dict[str, torch.Tensor] | None = None, fp32: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """One forward node of the int8 graph on the int8 codes in `env`: the quantized graph's own
    parameters, or the given ones (a trainer's int8 weights, int32 biases, fp32 classifier)."""
    out, c, ins = node.outputs[0], qg.consts.get(node.name, {}), node.inputs
    if node.op == "conv2d":
        x, w, b = ins
        bias = biases[b] if biases is not None else c["bias_i32"]
        return int8_ops.conv2d_int8(
            env[x], qg.qparams(x).zero_point, (weights or qg.weights)[w], bias, node.attrs["stride"], node.attrs["padding"],
            node.attrs["groups"], c["multiplier"], qg.act[out].zero_point, c["qmin"], c["qmax"],
        )  # fmt: skip
    if node.op in ("relu", "relu6"):
        return env[qg.alias[out]]
    if node.op == "add":
        a, b = ins
        return int8_ops.add_int8(env[a], qg.qparams(a).zero_point, c["m_a"], env[b], qg.qparams(b).zero_point, c["m_b"], qg.act[out].zero_point)
    if node.op == "mean_hw":
        (x,) = ins
        return int8_ops.mean_hw_int8(env[x], qg.qparams(x).zero_point, c["multiplier"], qg.act[out].zero_point)
    if node.op == "slice_channels":  # kept for a sparse update's backward pass
        return env[ins[0]][:, : node.attrs["channels"]].contiguous()
    if node.op == "linear":
        x, w, b = ins
        q, params = qg.qparams(x), fp32 or qg.fp32_params
        return int8_ops.linear_f32(int8_ops.dequantize(env[x], q.scale, q.zero_point), params[w], params[b])
    raise NotImplementedError(f"no int8 form for op '{node.op}' ({node.source or node.name})")


def run_int8(qg: QuantizedGraph, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The int8 forward: int8 codes for every activation, fp32 logits from the fp32 classifier."""
    env: dict[str, torch.Tensor] = {IMAGE: int8_ops.quantize(images, qg.act[IMAGE].scale, qg.act[IMAGE].zero_point)}
    for node in forward_graph(qg.graph).nodes:
        env[node.outputs[0]] = int8_forward_op(qg, node, env)
    return env
