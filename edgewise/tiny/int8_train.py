"""The int8 reference executor for a whole training step: forward, pruned backward and in-place
QAS updates, exactly as the C backend will run them.

    plan = training_plan(model, (1, 3, 48, 48), scheme, lr=0.01)
    trainer = Int8Trainer(plan, calibration_images, rule="stochastic", qas=True)
    loss = trainer.train_step(image, label)

What it runs (see `int8_ops` for the one definition of each op):
- forward: int8 activations and weights, int32 biases and accumulators, fp32 requantization, the
  ReLU/ReLU6 fused into each conv's clamp; the classifier is fp32 on the dequantized features;
- backward: fp32 gradients of the real tensors, reading int8 activations and the current int8
  weights; a fused clamp passes the gradient only where it did not clip (straight-through);
- updates, in the order the scheduler placed them: conv weights in int8 codes with QAS and the
  chosen sub-LSB rule (`int8_ops.UPDATE_RULES`), conv biases in int32 codes, the classifier in fp32.

The trained state (int8 weights, int32 biases, master copies, the fp32 classifier) lives in
`Int8Trainer.state`; frozen parameters are never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgewise.errors import EdgewiseError
from edgewise.tiny import int8_ops
from edgewise.tiny.frontend import IMAGE, LABEL, LOGITS, LOSS, forward_graph
from edgewise.tiny.ir import Node
from edgewise.tiny.plan import TrainingPlan
from edgewise.tiny.quantize import (
    INT8_FORWARD_OPS,
    QParams,
    QuantizedGraph,
    int8_forward_op,
    quantize_graph,
)

F32 = torch.float32


@dataclass
class Int8State:
    """Everything a training step writes."""

    weights: dict[str, torch.Tensor]  # conv weight -> int8 codes (frozen ones are read only)
    biases: dict[str, torch.Tensor]  # conv bias -> int32 codes at scale s_x * s_w
    fp32: dict[str, torch.Tensor]  # the classifier's weight and bias
    masters: dict[str, torch.Tensor] = field(default_factory=dict)  # trained weight -> its master copy (master16/32)
    steps: int = 0


class Int8Trainer:
    def __init__(self, plan: TrainingPlan, calibration_images: torch.Tensor, rule: str | None = None, qas: bool = True, seed: int = 0):
        rule = rule or plan.update_rule  # the rule the plan counted master-copy bytes for
        if rule not in int8_ops.UPDATE_RULES:
            raise EdgewiseError(f"unknown sub-LSB update rule '{rule}'; choose one of {', '.join(int8_ops.UPDATE_RULES)}")
        self.plan, self.rule, self.qas, self.seed = plan, rule, qas, seed
        self.graph = plan.graph
        self.qg: QuantizedGraph = quantize_graph(plan.graph, plan.params, calibration_images)
        self.convs = [n for n in forward_graph(self.graph).nodes if n.op == "conv2d"]
        self.conv_by_output = {n.outputs[0]: n for n in self.convs}
        # a sliced activation keeps the quantization of the tensor it was cut from
        self.slice_source = {n.outputs[0]: n.inputs[0] for n in self.graph.nodes if n.op == "slice_channels"}
        self.frozen_prefix = plan.frozen_prefix()  # (frozen nodes, the rest, boundary values): fixed by the plan
        self.state = Int8State(
            weights=dict(self.qg.weights),
            biases={n.inputs[2]: self.qg.consts[n.name]["bias_i32"] for n in self.convs},
            fp32={k: v.clone() for k, v in self.qg.fp32_params.items()},
        )
        for p in plan.trainable:
            if p in self.qg.weights:  # a master copy of the trained slice only
                master = int8_ops.initial_master(self.state.weights[p][:, : self._trained_shape(p)[1]], rule)
                if master is not None:
                    self.state.masters[p] = master
        # QAS factors, fp32, per output channel: s_w^-2 for weights, (s_x s_w)^-2 for biases (1 without QAS)
        self.weight_qas = {w: self._qas(self.qg.weight_scales[w]) for w in self.qg.weights}
        self.bias_scale = {n.inputs[2]: (self.qg.qparams(n.inputs[0]).scale * self.qg.weight_scales[n.inputs[1]].double()).to(F32) for n in self.convs}
        self.bias_qas = {b: self._qas(s) for b, s in self.bias_scale.items()}

    def _qas(self, scale: torch.Tensor) -> torch.Tensor:
        return (1.0 / scale.double() ** 2).to(F32) if self.qas else torch.ones_like(scale, dtype=F32)

    def _trained_shape(self, weight: str) -> tuple[int, ...]:
        """The shape of a trained weight's gradient: all of it, or its first input channels."""
        return next(self.graph.values[n.inputs[1]].shape for n in self.graph.nodes if n.op == "sgd_update" and n.inputs[0] == weight)

    # --- one step ---------------------------------------------------------------------------

    def quantize_images(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qg.act[IMAGE]
        return int8_ops.quantize(x, q.scale, q.zero_point)

    def _qparams(self, value: str) -> QParams:
        return self.qg.qparams(self.slice_source.get(value, value))

    def _real(self, env: dict[str, torch.Tensor], value: str) -> torch.Tensor:
        q = self._qparams(value)
        return int8_ops.dequantize(env[value], q.scale, q.zero_point)

    def run(self, q_images: torch.Tensor | None, labels: torch.Tensor | None, nodes: list[Node], given: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run `nodes` (the whole step, the forward part, or what follows a computed prefix `given`)
        on int8 images; returns every value."""
        qg, st = self.qg, self.state
        env: dict[str, torch.Tensor] = {IMAGE: q_images, **(given or {})}
        if labels is not None:
            env[LABEL] = labels
        for node in nodes:
            op, ins, out = node.op, node.inputs, node.outputs[0]
            if op in INT8_FORWARD_OPS and (op != "add" or node.name in qg.consts):
                env[out] = int8_forward_op(qg, node, env, st.weights, st.biases, st.fp32)
            elif op == "add":  # two gradient contributions of one value
                env[out] = env[ins[0]] + env[ins[1]]
            elif op == "cross_entropy":
                env[out] = int8_ops.cross_entropy_f32(env[ins[0]], env[ins[1]])
            elif op == "cross_entropy_grad":
                env[out] = int8_ops.cross_entropy_grad_f32(env[ins[0]], env[ins[1]])
            elif op == "linear_grad_input":
                env[out] = int8_ops.linear_grad_input_f32(env[ins[0]], st.fp32[ins[1]])
            elif op == "linear_grad_weight":
                env[out] = int8_ops.linear_grad_weight_f32(self._real(env, ins[0]), env[ins[1]])
            elif op in ("sum_n", "sum_nhw"):
                env[out] = int8_ops.sum_positions_f32(env[ins[0]])
            elif op == "mean_hw_grad":
                env[out] = int8_ops.mean_hw_grad_f32(env[ins[0]], node.attrs["input_shape"])
            elif op in ("relu_grad", "relu6_grad"):
                g, y = ins
                conv = qg.consts[self._producer_conv(y)]
                env[out] = int8_ops.clamp_mask_grad(env[g], env[y], conv["qmin"], conv["qmax"])
            elif op == "conv2d_grad_input":
                g, w = ins
                w_real = int8_ops.dequantize_weight(st.weights[w], qg.weight_scales[w])
                env[out] = int8_ops.conv2d_grad_input_f32(env[g], w_real, node.attrs["stride"], node.attrs["padding"], node.attrs["groups"], node.attrs["input_shape"])
            elif op == "conv2d_grad_weight":
                x, g = ins
                env[out] = int8_ops.conv2d_grad_weight_f32(self._real(env, x), env[g], node.attrs["stride"], node.attrs["padding"], node.attrs["groups"], node.attrs["weight_shape"])
            elif op == "sgd_update":
                self._update(ins[0], env[ins[1]], node.attrs["lr"])
            else:
                raise NotImplementedError(f"no int8 form for op '{op}' ({node.source or node.name})")
        return env

    def _producer_conv(self, value: str) -> str:
        """The forward conv node whose clamp made `value` (a fused activation's output)."""
        return self.conv_by_output[self.qg.alias.get(value, value)].name

    def _update(self, param: str, grad: torch.Tensor, lr: float) -> None:
        st = self.state
        if param in st.fp32:  # the classifier
            st.fp32[param] = st.fp32[param] - grad * torch.tensor(lr, dtype=F32)
        elif param in st.weights:
            q = st.weights[param]
            c = grad.shape[1]  # a partial weight trains its first c input channels
            step = int8_ops.code_step(grad, self.qg.weight_scales[param], self.weight_qas[param], lr)
            new, master = int8_ops.update_int8_weight(q[:, :c], step, self.rule, st.masters.get(param), self.seed, self._counter(param))
            q = q.clone()
            q[:, :c] = new
            st.weights[param] = q
            if master is not None:
                st.masters[param] = master
        elif param in st.biases:
            step = int8_ops.code_step(grad, self.bias_scale[param], self.bias_qas[param], lr)
            st.biases[param] = int8_ops.update_int32_bias(st.biases[param], step)
        else:
            raise KeyError(f"sgd_update of unknown parameter {param}")

    def _counter(self, param: str) -> int:
        """A distinct stream of random draws per (step, parameter) for stochastic rounding."""
        return self.state.steps * 4096 + sorted(self.plan.trainable).index(param)

    def prefix(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The boundary values of the frozen prefix for fp32 images x (see `TrainingPlan.frozen_prefix`):
        a host-side shortcut for experiments that revisit the same images; the result is identical."""
        frozen, _, boundary = self.frozen_prefix
        env = self.run(self.quantize_images(x), None, frozen)
        return {v: env[v] for v in boundary}

    def train_step(self, x: torch.Tensor | None, labels: torch.Tensor, prefix: dict[str, torch.Tensor] | None = None) -> float:
        """One step on fp32 images x (quantized with the calibrated input scale) and int64 labels,
        or from `prefix(x)` computed earlier for the same images."""
        if prefix is None:
            env = self.run(self.quantize_images(x), labels, self.graph.nodes)
        else:
            env = self.run(None, labels, self.frozen_prefix[1], prefix)
        self.state.steps += 1
        return float(env[LOSS])

    def logits(self, x: torch.Tensor | None, prefix: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        forward = forward_graph(self.graph).nodes
        if prefix is None:
            return self.run(self.quantize_images(x), None, forward)[LOGITS]
        rest = {n.name for n in self.frozen_prefix[1]}
        return self.run(None, None, [n for n in forward if n.name in rest], prefix)[LOGITS]

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> float:
        correct = sum(int((self.logits(x[i : i + chunk]).argmax(-1) == labels[i : i + chunk]).sum()) for i in range(0, len(x), chunk))
        return correct / len(x)
