"""C99 from a compiled int8 training step: the static program that trains on a microcontroller.

    trainer = Int8Trainer(plan, calibration_images)          # the reference executor
    project = generate_c(trainer, "build/tiny-c")            # what it runs, as C

The project (see `CProject`) is self-contained and allocation-free:
- `ew_ops.c/.h`: the kernels, the C twin of `int8_ops` (same integer arithmetic, same fp32
  operation order), copied from `edgewise/tiny/c/`;
- `ew_model.c/.h`: one static arena of exactly the planned size, every activation and gradient at
  its planned offset; the trained parameters (the trained slice of each weight, master copies,
  int32 biases, the fp32 classifier) as static RAM arrays; the step as a straight list of kernel
  calls in the plan's order, following the plan's layout (fused activations, in-place depthwise
  convs and adds, streamed frozen conv chains through row ring buffers, gradients computed where
  read, weight gradients fused into their in-place updates);
- `ew_flash.bin` (pulled in by `ew_flash.S` with `.incbin`): the frozen weights and every constant
  (int8 weights, int32 biases, fp32 multipliers, scales and QAS factors) as read-only data, which
  the linker puts in flash. Binary, so every fp32 constant is the reference's exact bits.

API (`ew_model.h`): `ew_init()` (reset the trained parameters from flash), `ew_infer(img)` (the
argmax class), `ew_train_step(img, label)` (one step, returns the loss), `ew_logits()`, and
`ew_n_params()` / `ew_param_at(i)` to read the trained parameters back. Images are int8 codes at
the input's scale and zero point (`EW_INPUT_SCALE`, `EW_INPUT_ZERO_POINT`).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgewise.errors import EdgewiseError
from edgewise.files import atomic_dir
from edgewise.tiny.frontend import IMAGE, LABEL, LOGITS, LOSS
from edgewise.tiny.int8_train import Int8Trainer
from edgewise.tiny.ir import Node
from edgewise.tiny.memory import DTYPE_BYTES, alias_root

C_SOURCES = Path(__file__).parent / "c"
RULE_ENUM = {"round": "EW_RULE_ROUND", "stochastic": "EW_RULE_STOCHASTIC", "master16": "EW_RULE_MASTER16", "master32": "EW_RULE_MASTER32"}
DTYPE_CODE = {"int8": 0, "int32": 1, "float32": 2, "int16": 3}
C_TYPE = {"int8": "int8_t", "int32": "int32_t", "float32": "float", "int16": "int16_t"}
# the ops the generator has C kernels for; anything else is named in a CodegenError
C_OPS = (
    "conv2d", "relu", "relu6", "add", "mean_hw", "slice_channels", "linear", "cross_entropy", "cross_entropy_grad",
    "linear_grad_input", "linear_grad_weight", "sum_n", "sum_nhw", "mean_hw_grad", "relu_grad", "relu6_grad",
    "conv2d_grad_input", "conv2d_grad_weight", "sgd_update",
)  # fmt: skip


class CodegenError(EdgewiseError):
    pass


@dataclass
class CParam:
    """A trained parameter as the C program holds it in RAM."""

    name: str  # the graph's parameter name, or "master:<name>"
    c_name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class CProject:
    dir: Path
    arena_bytes: int
    ram_param_bytes: int  # trained parameters and master copies in RAM
    flash_bytes: int  # the constant blob
    params: list[CParam]  # in ew_param_at order
    image_shape: tuple[int, int, int]
    n_classes: int
    input_scale: float
    input_zero_point: int


def f32(x: float) -> str:
    """An exact C float literal."""
    v = float(np.float32(x))
    if not np.isfinite(v):
        raise CodegenError(f"constant {x} is not finite")
    return f"{v.hex()}f"


def c_ident(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


class _Flash:
    """The read-only blob: tensors at 16-byte aligned offsets."""

    def __init__(self):
        self.data = bytearray()
        self.offsets: dict[str, int] = {}

    def add(self, key: str, array: np.ndarray) -> int:
        if key not in self.offsets:
            self.data += b"\0" * (-len(self.data) % 16)
            self.offsets[key] = len(self.data)
            self.data += np.ascontiguousarray(array).tobytes()
        return self.offsets[key]

    def ptr(self, key: str, array: np.ndarray, ctype: str) -> str:
        return f"((const {ctype} *)(ew_flash + {self.add(key, array)}))"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class _Generator:
    def __init__(self, trainer: Int8Trainer):
        plan = trainer.plan
        if plan.precision != "int8" or plan.layout is None:
            raise CodegenError("C generation needs an int8 plan (training_plan(..., precision='int8'))")
        self.tr, self.plan, self.graph, self.qg, self.layout = trainer, plan, plan.graph, trainer.qg, plan.layout
        if self.graph.values[IMAGE].shape[0] != 1:
            raise CodegenError(f"the C backend trains at batch 1; this plan's batch is {self.graph.values[IMAGE].shape[0]}")
        for node in self.graph.nodes:
            if node.op not in C_OPS:
                raise CodegenError(f"no C kernel for op '{node.op}' ({node.source or node.name}); the C backend has kernels for: {', '.join(C_OPS)}")
        self.producer = self.graph.producers()
        self.conv_of_weight = {n.inputs[1]: n for n in self.tr.convs}
        self.flash = _Flash()
        self.lines: list[str] = []
        self.ram: dict[str, CParam] = {}  # param name -> its RAM array
        self.chain_of: dict[str, list[Node]] = {}  # first node name of a chain -> its nodes
        self.in_chain: set[str] = set()
        by_name = {n.name: n for n in self.graph.nodes}
        for names in self.layout.chains:
            nodes = [by_name[n] for n in names]
            self.chain_of[names[0]] = nodes
            self.in_chain.update(names)
        self.update_of_param = {n.inputs[0]: n for n in self.graph.nodes if n.op == "sgd_update"}
        self.trainable_order = sorted(plan.trainable)

    # --- buffers ------------------------------------------------------------------------------

    def offset(self, value: str) -> int:
        if value in self.layout.streamed:
            raise CodegenError(f"{value} is streamed (it exists only as rows inside its conv chain)")
        root = alias_root(self.layout.aliases, value)
        alloc = self.plan.memory.allocations.get(root)
        if alloc is None:
            raise CodegenError(f"{value} has no arena buffer in the plan")
        return alloc.offset

    def span(self, value: str) -> tuple[int, int]:
        start = self.offset(value)
        v = self.graph.values[value]
        return start, start + v.numel * DTYPE_BYTES[self.layout.dtypes.get(value, v.dtype)]

    def ptr(self, value: str, ctype: str) -> str:
        return f"(({ctype} *)(ew_arena + {self.offset(value)}))"

    def shape4(self, value: str) -> tuple[int, int, int]:
        shape = self.graph.values[value].shape
        c = shape[1]
        h, w = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
        return c, h, w

    def qp(self, value: str):
        return self.tr._qparams(value)

    def disjoint(self, node: Node, out: str, inputs: list[str]) -> None:
        """A kernel that reads its inputs while writing `out` must not overlap them."""
        o0, o1 = self.span(out)
        for x in inputs:
            if x in self.layout.lazy or x in self.layout.streamed or self.graph.values[x].kind == "param":
                continue
            i0, i1 = self.span(x)
            if i0 < o1 and o0 < i1:
                raise CodegenError(f"{node.name} ({node.op}) would write {out} over its input {x}, which the kernel still reads")

    # --- parameters ---------------------------------------------------------------------------

    def ram_param(self, name: str, dtype: str, shape: tuple[int, ...]) -> str:
        if name not in self.ram:
            self.ram[name] = CParam(name, f"ew_{'m' if name.startswith('master:') else 'p'}{len(self.ram)}_{c_ident(name.split(':')[-1])}", dtype, tuple(shape))
        return self.ram[name].c_name

    def trained_channels(self, weight: str) -> int:
        node = self.update_of_param.get(weight)
        return self.graph.values[node.inputs[1]].shape[1] if node else 0

    def weight(self, w: str) -> str:
        q = self.tr.state.weights[w]
        frozen = self.flash.ptr(f"w:{w}", _np(q), "int8_t")
        c = self.trained_channels(w)
        if c:
            arr = self.ram_param(w, "int8", (q.shape[0], c, *q.shape[2:]))
            return f"{{{arr}, {frozen}, {c}}}"
        return f"{{0, {frozen}, 0}}"

    def bias(self, b: str) -> str:
        if b in self.plan.trainable:
            return self.ram_param(b, "int32", self.tr.state.biases[b].shape)
        return self.flash.ptr(f"b:{b}", _np(self.tr.state.biases[b]), "int32_t")

    def fp32_param(self, p: str) -> str:
        if p in self.plan.trainable:
            return self.ram_param(p, "float32", self.tr.state.fp32[p].shape)
        return self.flash.ptr(f"f:{p}", _np(self.tr.state.fp32[p].to(torch.float32)), "float")

    def consts(self, key: str, t: torch.Tensor) -> str:
        return self.flash.ptr(key, _np(t.to(torch.float32)), "float")

    def conv_struct(self, conv: Node, flat: bool = True) -> str:
        """An ew_conv initializer. A pointwise conv (1x1, stride 1, no padding) on whole tensors is
        the same sums over one row of H*W columns (`flat`), which runs in longer inner loops."""
        x, w = conv.inputs[:2]
        cin, hin, win = self.shape4(x)
        cout, hout, wout = self.shape4(conv.outputs[0])
        kh, kw = self.graph.values[w].shape[2:]
        (sh, sw), (ph, pw), g = conv.attrs["stride"], conv.attrs["padding"], conv.attrs["groups"]
        if flat and self.pointwise(conv):
            hin, win, hout, wout = 1, hin * win, 1, hout * wout
        return f"{{{cin}, {hin}, {win}, {cout}, {hout}, {wout}, {kh}, {kw}, {sh}, {sw}, {ph}, {pw}, {g}}}"

    def pointwise(self, conv: Node) -> bool:
        kh, kw = self.graph.values[conv.inputs[1]].shape[2:]
        return (kh, kw, *conv.attrs["stride"], *conv.attrs["padding"]) == (1, 1, 1, 1, 0, 0)

    def act(self, value: str, flat: bool = False) -> str:
        c, h, w = self.shape4(value)
        if flat:
            h, w = 1, h * w
        return f"{{{self.ptr(value, 'int8_t')}, {c}, {h}, {w}, {h}}}"

    # --- gradients as read ----------------------------------------------------------------------

    def reader(self, value: str) -> str:
        """An ew_grad initializer for a gradient: stored, or computed where read (lazy)."""
        return "{%s, %d, %s, %d, %d}" % self.grad_parts(value)

    def grad_parts(self, value: str) -> tuple[str, int, str, int, int]:
        if value in self.layout.lazy:
            return self.node_grad_parts(self.producer[value])
        return self.ptr(value, "float"), 0, "0", 0, 0

    def node_grad_parts(self, node: Node) -> tuple[str, int, str, int, int]:
        """(stored gradient, broadcast divisor, clamp mask, qmin, qmax) of a gradient node's output."""
        if node.op == "mean_hw_grad":
            (g,) = node.inputs
            if g in self.layout.lazy:
                raise CodegenError(f"{node.name}: mean_hw_grad of a gradient computed where read has no C kernel")
            _, _, h, w = node.attrs["input_shape"]
            return self.ptr(g, "float"), h * w, "0", 0, 0
        if node.op in ("relu_grad", "relu6_grad"):
            g, y = node.inputs
            base, hw_div, mask, _, _ = self.grad_parts(g)
            if mask != "0":
                raise CodegenError(f"{node.name}: a clamp mask over another clamp mask has no C kernel")
            conv = self.qg.consts[self.tr._producer_conv(y)]
            return base, hw_div, self.ptr(y, "int8_t"), conv["qmin"], conv["qmax"]
        raise CodegenError(f"{node.name}: {node.op} is not a gradient read in place")

    # --- updates --------------------------------------------------------------------------------

    def update(self, param: str, lr: float) -> str:
        """An ew_update initializer for the in-place update of `param`."""
        lr_c = f32(lr)
        if param in self.tr.state.fp32:
            return f"{{0, 0, {self.fp32_param(param)}, 0, 0, {lr_c}, 0, 0, 0, 0, 0}}"
        if param in self.tr.state.weights:
            c = self.trained_channels(param)
            q = self.tr.state.weights[param]
            arr = self.ram_param(param, "int8", (q.shape[0], c, *q.shape[2:]))
            rule = self.tr.rule
            m16 = m32 = "0"
            if rule in ("master16", "master32"):
                master = self.ram_param(f"master:{param}", "int16" if rule == "master16" else "float32", (q.shape[0], c, *q.shape[2:]))
                m16, m32 = (master, "0") if rule == "master16" else ("0", master)
            scale = self.consts(f"ws:{param}", self.qg.weight_scales[param])
            qas = self.consts(f"wq:{param}", self.tr.weight_qas[param])
            index = self.trainable_order.index(param)
            return f"{{{arr}, 0, 0, {scale}, {qas}, {lr_c}, {RULE_ENUM[rule]}, {m16}, {m32}, {self.tr.seed}u, ew_steps * 4096u + {index}u}}"
        if param in self.tr.state.biases:
            arr = self.ram_param(param, "int32", self.tr.state.biases[param].shape)
            scale = self.consts(f"bs:{param}", self.tr.bias_scale[param])
            qas = self.consts(f"bq:{param}", self.tr.bias_qas[param])
            return f"{{0, {arr}, 0, {scale}, {qas}, {lr_c}, 0, 0, 0, 0, 0}}"
        raise CodegenError(f"sgd_update of unknown parameter {param}")

    # --- nodes ----------------------------------------------------------------------------------

    def emit(self, line: str) -> None:
        self.lines.append("    " + line)

    def node(self, node: Node) -> None:
        op, ins, out = node.op, node.inputs, node.outputs[0]
        lz = self.layout.lazy
        self.emit(f"/* {node.name}: {op} -> {out} */")
        if node.name in self.chain_of:
            return self.chain(self.chain_of[node.name])
        if node.name in self.in_chain or op in ("relu", "relu6"):
            return  # made by its chain / fused into its conv's clamp
        if op == "conv2d":
            return self.conv(node)
        if op == "add" and node.name in self.qg.consts:
            a, b = ins
            c = self.qg.consts[node.name]
            h = self.shape4(out)[1]
            self.emit(
                f"ew_add_int8(&(ew_act){self.act(a)}, {self.qp(a).zero_point}, {f32(c['m_a'])}, &(ew_act){self.act(b)}, {self.qp(b).zero_point}, "
                f"{f32(c['m_b'])}, &(ew_act){self.act(out)}, {self.qg.act[out].zero_point}, 0, {h});"
            )
        elif op == "add":
            c, h, w = self.shape4(out)
            self.emit(f"ew_add_grad_f32(&(ew_grad){self.reader(ins[0])}, &(ew_grad){self.reader(ins[1])}, {c}, {h * w}, {self.ptr(out, 'float')});")
        elif op == "mean_hw":
            (x,) = ins
            c, h, w = self.shape4(x)
            self.disjoint(node, out, ins)
            self.emit(f"ew_mean_hw_int8({self.ptr(x, 'int8_t')}, {c}, {h * w}, {self.qp(x).zero_point}, {f32(self.qg.consts[node.name]['multiplier'])}, {self.ptr(out, 'int8_t')}, {self.qg.act[out].zero_point});")
        elif op == "slice_channels":
            self.disjoint(node, out, ins)
            self.emit(f"memcpy({self.ptr(out, 'int8_t')}, {self.ptr(ins[0], 'int8_t')}, {self.graph.values[out].numel});")
        elif op == "linear":
            x, w, b = ins
            q = self.qp(x)
            n_out, n_in = self.graph.values[w].shape
            self.emit(f"ew_linear_f32({self.ptr(x, 'int8_t')}, {f32(q.scale)}, {q.zero_point}, {n_in}, {self.fp32_param(w)}, {self.fp32_param(b)}, {n_out}, {self.ptr(out, 'float')});")
        elif op == "cross_entropy":
            logits, label = ins
            n = self.graph.values[logits].shape[1]
            self.emit(f"*{self.ptr(out, 'float')} = ew_cross_entropy_f32({self.ptr(logits, 'float')}, {n}, *{self.ptr(label, 'int32_t')});")
        elif op == "cross_entropy_grad":
            logits, label = ins
            n = self.graph.values[logits].shape[1]
            self.emit(f"ew_cross_entropy_grad_f32({self.ptr(logits, 'float')}, {n}, *{self.ptr(label, 'int32_t')}, {self.ptr(out, 'float')});")
        elif op == "linear_grad_input":
            g, w = ins
            n_out, n_in = self.graph.values[w].shape
            self.emit(f"ew_linear_grad_input_f32({self.ptr(g, 'float')}, {self.fp32_param(w)}, {n_in}, {n_out}, {self.ptr(out, 'float')});")
        elif op in ("linear_grad_weight", "sum_n", "sum_nhw", "conv2d_grad_weight"):
            if out not in lz:
                self.param_grad(node, f"{self.ptr(out, 'float')}", "0")
        elif op in ("mean_hw_grad", "relu_grad", "relu6_grad"):
            if out not in lz:
                c, h, w = self.shape4(out)
                self.emit(f"ew_grad_store(&(ew_grad){{%s, %d, %s, %d, %d}}, {c}, {h * w}, {self.ptr(out, 'float')});" % self.node_grad_parts(node))
        elif op == "conv2d_grad_input":
            g, w = ins
            conv = self.conv_of_weight[w]
            self.disjoint(node, out, ins)
            scale = self.consts(f"ws:{w}", self.qg.weight_scales[w])
            self.emit(f"ew_conv2d_grad_input_f32(&(ew_conv){self.conv_struct(conv)}, &(ew_grad){self.reader(g)}, &(ew_weight){self.weight(w)}, {scale}, {self.ptr(out, 'float')});")
        elif op == "sgd_update":
            param, grad = ins
            upd = self.update(param, node.attrs["lr"])
            if grad in lz:
                self.param_grad(self.producer[grad], "0", f"&(ew_update){upd}")
            else:
                n = self.graph.values[grad].numel
                per_channel = n // self.graph.values[grad].shape[0]
                self.emit(f"ew_update_from({self.ptr(grad, 'float')}, {n}, {per_channel}, &(ew_update){upd});")
        else:  # pragma: no cover - C_OPS is checked up front
            raise CodegenError(f"no C kernel for op '{op}' ({node.source or node.name})")

    def param_grad(self, node: Node, out: str, update: str) -> None:
        """A parameter gradient, stored to `out` or applied element by element by `update`."""
        op, ins = node.op, node.inputs
        if op == "conv2d_grad_weight":
            x, g = ins
            w = next(n.inputs[0] for n in self.graph.nodes if n.op == "sgd_update" and n.inputs[1] == node.outputs[0])
            conv = self.conv_of_weight[w]
            q = self.qp(x)
            c_x = self.shape4(x)[0]
            c_trained = node.attrs["weight_shape"][1]
            self.emit(
                f"ew_conv2d_grad_weight_f32(&(ew_conv){self.conv_struct(conv)}, {self.ptr(x, 'int8_t')}, {c_x}, {f32(q.scale)}, {q.zero_point}, "
                f"&(ew_grad){self.reader(g)}, {c_trained}, {out}, {update});"
            )
        elif op in ("sum_nhw", "sum_n"):
            (g,) = ins
            c, h, w = self.shape4(g)
            self.emit(f"ew_sum_positions_f32(&(ew_grad){self.reader(g)}, {c}, {h * w}, {out}, {update});")
        elif op == "linear_grad_weight":
            x, g = ins
            q = self.qp(x)
            n_in, n_out = self.graph.values[x].shape[1], self.graph.values[g].shape[1]
            self.emit(f"ew_linear_grad_weight_f32({self.ptr(x, 'int8_t')}, {f32(q.scale)}, {q.zero_point}, {self.ptr(g, 'float')}, {n_in}, {n_out}, {out}, {update});")
        else:
            raise CodegenError(f"{node.name}: {op} is not a parameter gradient")

    def conv_args(self, conv: Node) -> tuple[str, str, str, int, int, int, int]:
        x, w, b = conv.inputs
        c = self.qg.consts[conv.name]
        mult = self.consts(f"m:{conv.name}", c["multiplier"])
        return self.weight(w), self.bias(b), mult, self.qp(x).zero_point, self.qg.act[conv.outputs[0]].zero_point, c["qmin"], c["qmax"]

    def is_inplace(self, conv: Node) -> bool:
        return alias_root(self.layout.aliases, conv.outputs[0]) == alias_root(self.layout.aliases, conv.inputs[0])

    def conv(self, node: Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        w, b, mult, zx, zy, qmin, qmax = self.conv_args(node)
        cv = self.conv_struct(node, flat=not self.is_inplace(node))
        if self.is_inplace(node):  # in-place depthwise
            scratch = self.plan.memory.allocations.get(f"scratch:{node.name}")
            if scratch is None:
                raise CodegenError(f"{node.name}: writes over its input but the plan has no scratch buffer for it")
            self.emit(f"ew_dwconv2d_int8_inplace(&(ew_conv){cv}, {self.ptr(x, 'int8_t')}, (int8_t *)(ew_arena + {scratch.offset}), {zx}, &(ew_weight){w}, {b}, {mult}, {zy}, {qmin}, {qmax});")
            return
        self.disjoint(node, out, [x])
        flat = self.pointwise(node)
        h = 1 if flat else self.shape4(out)[1]
        self.emit(f"ew_conv2d_int8(&(ew_conv){cv}, &(ew_act){self.act(x, flat)}, {zx}, &(ew_weight){w}, {b}, {mult}, &(ew_act){self.act(out, flat)}, {zy}, {qmin}, {qmax}, 0, {h});")

    def chain(self, nodes: list[Node]) -> None:
        convs = [n for n in nodes if n.op == "conv2d"]
        add = nodes[-1] if nodes[-1].op == "add" else None
        ring = self.plan.memory.allocations[f"rows:{nodes[0].name}"]
        ring_at = ring.offset
        x0 = convs[0].inputs[0]
        self.emit("{")
        self.emit(f"    ew_chain_stage s[{len(convs)}] = {{")
        prev_y = self.act(x0)
        for conv in convs:
            out = conv.outputs[0]
            c, h, w = self.shape4(out)
            if out in self.layout.ring_rows:
                rows = self.layout.ring_rows[out]
                y = f"{{(int8_t *)(ew_arena + {ring_at}), {c}, {h}, {w}, {rows}}}"
                ring_at += c * w * rows
            else:
                y = self.act(out)
            wt, b, mult, zx, zy, qmin, qmax = self.conv_args(conv)
            self.emit(f"        {{{self.conv_struct(conv, flat=False)}, {wt}, {b}, {mult}, {zx}, {zy}, {qmin}, {qmax}, {prev_y}, {y}, 0}},")
            prev_y = y
        self.emit("    };")
        if ring_at - ring.offset > ring.size:
            raise CodegenError(f"chain at {nodes[0].name}: its rows need {ring_at - ring.offset} bytes, the plan gave {ring.size}")
        if add is None:
            self.emit(f"    ew_conv_chain(s, {len(convs)}, 0);")
        else:
            out = add.outputs[0]
            a, b = add.inputs
            c = self.qg.consts[add.name]
            mx, mb = (c["m_a"], c["m_b"]) if a == x0 else (c["m_b"], c["m_a"])
            first = convs[0]
            k_h, stride_h = self.graph.values[first.inputs[1]].shape[2], first.attrs["stride"][0]
            o0, o1 = self.span(out)
            i0, i1 = self.span(x0)
            if o0 < i1 and i0 < o1 and (k_h, stride_h) != (1, 1):
                raise CodegenError(f"chain at {first.name}: its residual add writes over the chain's input row by row, which needs a 1-row first conv (kernel {k_h}, stride {stride_h})")
            self.emit(f"    ew_act x0 = {self.act(x0)};")
            self.emit(
                f"    ew_chain_add add = {{&x0, {self.qp(x0).zero_point}, {self.qg.act[convs[-1].outputs[0]].zero_point}, {self.qg.act[out].zero_point}, "
                f"{f32(mx)}, {f32(mb)}, {self.act(out)}}};"
            )
            self.emit(f"    ew_conv_chain(s, {len(convs)}, &add);")
        self.emit("}")

    # --- the program --------------------------------------------------------------------------

    def generate(self, out_dir: Path) -> CProject:
        loss_step = next(i for i, n in enumerate(self.graph.nodes) if n.op == "cross_entropy")
        self.lines = []
        for node in self.graph.nodes[:loss_step]:
            if node.op != "slice_channels":
                self.node(node)
        forward = self.lines
        self.lines = []
        for node in self.graph.nodes:
            self.node(node)
        step = self.lines
        # the flash copies of trained parameters are their initial values (ew_init)
        init = []
        for p in list(self.ram.values()):
            src = p.name.split(":")[-1]
            init.append(self.init_param(p, src))
        arena = self.plan.memory.peak
        c, h, w = self.shape4(IMAGE)
        n_classes = self.graph.values[LOGITS].shape[1]
        q_in = self.qg.act[IMAGE]
        params = list(self.ram.values())
        header = HEADER.format(
            image_bytes=c * h * w, c=c, h=h, w=w, n_classes=n_classes, arena=max(arena, 16), scale=f32(q_in.scale),
            zero_point=q_in.zero_point, n_params=len(params),
        )  # fmt: skip
        ram_decls = "\n".join(f"static {C_TYPE[p.dtype]} {p.c_name}[{p.numel}] __attribute__((aligned(16)));" for p in params)
        table = ",\n".join(f'    {{"{p.name}", {p.c_name}, {DTYPE_CODE[p.dtype]}, {p.numel}}}' for p in params)
        source = MODEL_C.format(
            arena=max(arena, 16), ram_decls=ram_decls, table=table or '    {"", 0, 0, 0}', n_params=len(params),
            init="\n".join(init), forward="\n".join(forward), step="\n".join(step), image=self.offset(IMAGE),
            label=self.offset(LABEL), logits=self.offset(LOGITS), loss=self.offset(LOSS), n_classes=n_classes,
        )  # fmt: skip
        out_dir = Path(out_dir)
        ram_bytes = sum(p.numel * {"int8": 1, "int16": 2}.get(p.dtype, 4) for p in params)
        with atomic_dir(out_dir) as tmp:  # a killed run never leaves a partial project, nor loses the previous one
            self.write_files(tmp, header, source, params, arena, ram_bytes)
        return CProject(out_dir, arena, ram_bytes, len(self.flash.data), params, (c, h, w), n_classes, q_in.scale, q_in.zero_point)

    def write_files(self, tmp: Path, header: str, source: str, params: list[CParam], arena: int, ram_bytes: int) -> None:
        for f in ("ew_ops.c", "ew_ops.h"):
            shutil.copy(C_SOURCES / f, tmp / f)
        (tmp / "ew_model.h").write_text(header)
        (tmp / "ew_model.c").write_text(source)
        (tmp / "ew_flash.bin").write_bytes(bytes(self.flash.data))
        (tmp / "ew_flash.S").write_text(FLASH_S)
        values = {v: self.offset(v) for v in self.graph.values if self.graph.values[v].kind != "param" and v not in self.layout.streamed and v not in self.layout.lazy and alias_root(self.layout.aliases, v) in self.plan.memory.allocations}
        meta = {
            "arena_bytes": arena, "ram_param_bytes": ram_bytes, "flash_bytes": len(self.flash.data), "rule": self.tr.rule,
            "qas": self.tr.qas, "seed": self.tr.seed, "params": [[p.name, p.dtype, list(p.shape)] for p in params], "value_offsets": values,
        }  # fmt: skip
        (tmp / "ew_model.json").write_text(json.dumps(meta, indent=1))

    def init_param(self, p: CParam, src: str) -> str:
        """ew_init's copy of a trained parameter's initial value from flash (a weight's trained slice row by row)."""
        if p.name.startswith("master:"):
            master = self.tr.state.masters[src]
            off = self.flash.add(f"mi:{src}", _np(master))
            return f"    memcpy({p.c_name}, ew_flash + {off}, {master.numel() * master.element_size()});"
        if src in self.tr.state.weights:
            q = self.tr.state.weights[src]
            off = self.flash.add(f"w:{src}", _np(q))
            inner = int(np.prod(q.shape[2:]))
            row_src, row_dst = q.shape[1] * inner, p.shape[1] * inner
            return f"    for (int o = 0; o < {q.shape[0]}; o++) memcpy({p.c_name} + o * {row_dst}, ew_flash + {off} + o * {row_src}, {row_dst});"
        if src in self.tr.state.biases:
            off = self.flash.add(f"b:{src}", _np(self.tr.state.biases[src]))
            return f"    memcpy({p.c_name}, ew_flash + {off}, {p.numel * 4});"
        off = self.flash.add(f"f:{src}", _np(self.tr.state.fp32[src].to(torch.float32)))
        return f"    memcpy({p.c_name}, ew_flash + {off}, {p.numel * 4});"


def generate_c(trainer: Int8Trainer, out_dir: str | Path) -> CProject:
    """Write the C project of `trainer`'s compiled step (its current parameters as the initial ones)."""
    return _Generator(trainer).generate(Path(out_dir))


HEADER = """/* Generated by edgewise (edgewise/tiny/codegen.py): one int8 training step, planned statically. */
#ifndef EW_MODEL_H
#define EW_MODEL_H
#include <stdint.h>

#define EW_IMAGE_C {c}
#define EW_IMAGE_H {h}
#define EW_IMAGE_W {w}
#define EW_IMAGE_BYTES {image_bytes} /* int8 codes, channel-major, batch 1 */
#define EW_N_CLASSES {n_classes}
#define EW_ARENA_BYTES {arena}
#define EW_INPUT_SCALE {scale} /* image code q stands for EW_INPUT_SCALE * (q - EW_INPUT_ZERO_POINT) */
#define EW_INPUT_ZERO_POINT {zero_point}
#define EW_N_PARAMS {n_params}

typedef struct {{
    const char *name;
    void *data;
    int dtype; /* 0 int8, 1 int32, 2 float32, 3 int16 */
    int numel;
}} ew_param;

void ew_init(void);                                /* reset the trained parameters to their initial values */
int ew_infer(const int8_t *img);                   /* the argmax class; logits in ew_logits() */
float ew_train_step(const int8_t *img, int label); /* one SGD step at batch 1; returns the loss */
const float *ew_logits(void);                      /* EW_N_CLASSES logits of the last ew_infer */
int ew_n_params(void);
const ew_param *ew_param_at(int i); /* the trained parameters in RAM (and master copies) */
uint32_t ew_step_count(void);
uint8_t *ew_arena_data(void); /* for debugging: the arena (offsets in ew_model.json) */

#endif
"""

MODEL_C = """/* Generated by edgewise (edgewise/tiny/codegen.py). The arena and every offset come from the
 * memory plan; the step is the plan's node order. Do not edit. */
#include <stdint.h>
#include <string.h>

#include "ew_model.h"
#include "ew_ops.h"

extern const uint8_t ew_flash[]; /* ew_flash.S: frozen weights and constants (flash) */

static uint8_t ew_arena[{arena}] __attribute__((aligned(16)));
{ram_decls}
static uint32_t ew_steps;

static const ew_param ew_params[] = {{
{table}
}};

void ew_init(void)
{{
{init}
    ew_steps = 0;
}}

static void ew_forward(void)
{{
{forward}
}}

static void ew_step(void)
{{
{step}
}}

int ew_infer(const int8_t *img)
{{
    memcpy(ew_arena + {image}, img, EW_IMAGE_BYTES);
    ew_forward();
    const float *logits = (const float *)(ew_arena + {logits});
    int best = 0;
    for (int k = 1; k < {n_classes}; k++)
        if (logits[k] > logits[best]) best = k;
    return best;
}}

float ew_train_step(const int8_t *img, int label)
{{
    memcpy(ew_arena + {image}, img, EW_IMAGE_BYTES);
    *(int32_t *)(ew_arena + {label}) = label;
    ew_step();
    ew_steps++;
    return *(const float *)(ew_arena + {loss});
}}

const float *ew_logits(void) {{ return (const float *)(ew_arena + {logits}); }}
int ew_n_params(void) {{ return {n_params}; }}
const ew_param *ew_param_at(int i) {{ return &ew_params[i]; }}
uint32_t ew_step_count(void) {{ return ew_steps; }}
uint8_t *ew_arena_data(void) {{ return ew_arena; }}
"""

FLASH_S = """/* The read-only blob of frozen weights and constants (flash on the MCU). */
    .section .rodata.ew_flash, "a"
    .balign 16
    .global ew_flash
ew_flash:
    .incbin "ew_flash.bin"
    .section .note.GNU-stack, "", %progbits
"""
