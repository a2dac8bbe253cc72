"""The int8 training step: each backward op against torch autograd on the dequantized tensors,
a whole step (forward, backward, QAS updates) against a plain numpy model of the same int8 ops
(bit for bit), and the sub-LSB update rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgewise.tiny import int8_ops
from edgewise.tiny.frontend import IMAGE, LABEL, LOGITS, LOSS
from edgewise.tiny.int8_train import Int8Trainer
from edgewise.tiny.models import BlockSpec, InvertedResidualNet
from edgewise.tiny.plan import training_plan
from edgewise.tiny.sparse import Scheme
from tests.test_tiny_autodiff import randomize_batchnorm
from tests.test_tiny_int8 import np_conv, np_requant, np_round

F32 = np.float32


@pytest.mark.parametrize(
    "groups, stride, kernel, cin, cout",
    [(1, 1, 1, 6, 9), (1, 2, 3, 4, 5), (6, 1, 3, 6, 6), (6, 2, 5, 6, 6), (2, 1, 3, 4, 6)],
)
def test_conv_backward_ops_against_autograd(groups, stride, kernel, cin, cout):
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    x = torch.randn(2, cin, 9, 9, generator=g, requires_grad=True)
    w = torch.randn(cout, cin // groups, kernel, kernel, generator=g, requires_grad=True)
    pad = kernel // 2
    y = F.conv2d(x, w, stride=stride, padding=pad, groups=groups)
    gy = torch.randn(y.shape, generator=g)
    gx_ref, gw_ref = torch.autograd.grad(y, [x, w], gy)
    gx = int8_ops.conv2d_grad_input_f32(gy, w.detach(), (stride, stride), (pad, pad), groups, tuple(x.shape))
    gw = int8_ops.conv2d_grad_weight_f32(x.detach(), gy, (stride, stride), (pad, pad), groups, tuple(w.shape))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(int8_ops.sum_positions_f32(gy), gy.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_head_and_mask_ops_against_autograd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, generator=g, requires_grad=True)
    w = torch.randn(4, 7, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    label = torch.tensor([0, 3, 1])
    logits = x @ w.T + b
    loss = F.cross_entropy(logits, label)
    gl_ref, gx_ref, gw_ref = torch.autograd.grad(loss, [logits, x, w], retain_graph=True)
    torch.testing.assert_close(int8_ops.linear_f32(x.detach(), w.detach(), b.detach()), logits.detach())
    torch.testing.assert_close(int8_ops.cross_entropy_f32(logits.detach(), label), loss.detach())
    gl = int8_ops.cross_entropy_grad_f32(logits.detach(), label)
    torch.testing.assert_close(gl, gl_ref)
    torch.testing.assert_close(int8_ops.linear_grad_input_f32(gl, w.detach()), gx_ref)
    torch.testing.assert_close(int8_ops.linear_grad_weight_f32(x.detach(), gl), gw_ref)
    # mean over H, W and the fused clamp (ReLU6 in codes: scale 0.05, zero point -100)
    feat = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    gm = torch.randn(2, 3, generator=g)
    torch.testing.assert_close(int8_ops.mean_hw_grad_f32(gm, (2, 3, 4, 4)), torch.autograd.grad(feat.mean((2, 3)), feat, gm)[0])
    s, z = 0.05, -100
    real = torch.linspace(-1, 7, 60, requires_grad=True)
    q = int8_ops.quantize(real.detach().clamp(0, 6), s, z)
    gy = torch.randn(60, generator=g)
    ref = torch.autograd.grad(real.clamp(0, 6), real, gy)[0]
    ours = int8_ops.clamp_mask_grad(gy, q, z, z + round(6 / s))
    inside = (real.detach() - 0).abs().gt(s) & (real.detach() - 6).abs().gt(s)  # away from the clamp edges
    torch.testing.assert_close(ours[inside], ref[inside])


# --- a numpy model of the whole int8 step ---------------------------------------------------


def np_ordered_sum(terms, start=None) -> np.ndarray:
    """Terms added one by one to +0 (or to `start`), each sum rounded to fp32."""
    terms = list(terms)
    acc = np.zeros(terms[0].shape, F32) if start is None else np.array(start, dtype=F32)
    for t in terms:
        acc = (acc + t).astype(F32)
    return acc


def np_shifted_logits_and_exp_sum(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits minus their max, and the sum of their exponentials, classes added in order."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    total = np.zeros(z.shape[0])
    for k in range(z.shape[1]):
        total = total + np.exp(z[:, k])
    return z, total


def np_conv_grad_input(g, w, stride, pad, groups, shape):
    n, c, h, wd = shape
    o, cg, kh, kw = w.shape
    og = o // groups
    acc = np.zeros((n, c, h + 2 * pad + stride, wd + 2 * pad + stride), F32)
    for j in range(og):
        for i in range(kh):
            for k in range(kw):
                for grp in range(groups):
                    oc = grp * og + j
                    for ci in range(cg):
                        rows = slice(i, i + stride * g.shape[2], stride)
                        cols = slice(k, k + stride * g.shape[3], stride)
                        acc[:, grp * cg + ci, rows, cols] = (acc[:, grp * cg + ci, rows, cols] + (g[:, oc] * w[oc, ci, i, k]).astype(F32)).astype(F32)
    return acc[:, :, pad : pad + h, pad : pad + wd]


def np_conv_grad_weight(x, g, stride, pad, groups, wshape):
    o, cg, kh, kw = wshape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    og = o // groups
    acc = np.zeros(wshape, F32)
    for b in range(x.shape[0]):
        for r in range(g.shape[2]):
            for col in range(g.shape[3]):
                for oc in range(o):
                    grp = oc // og
                    patch = xp[b, grp * cg : (grp + 1) * cg, r * stride : r * stride + kh, col * stride : col * stride + kw]
                    acc[oc] = (acc[oc] + (g[b, oc, r, col] * patch).astype(F32)).astype(F32)
    return acc


def np_int8_step(trainer: Int8Trainer, image: np.ndarray, label: np.ndarray, lr: float) -> dict:
    """One int8 training step in numpy, from the trainer's quantization constants and state
    (which it does not modify); returns the new trained parameters and the loss."""
    qg = trainer.qg
    st = {k: v.numpy().copy() for k, v in {**trainer.state.weights, **trainer.state.biases, **trainer.state.fp32}.items()}
    masters = {k: v.numpy().copy() for k, v in trainer.state.masters.items()}
    slice_src = {n.outputs[0]: n.inputs[0] for n in trainer.graph.nodes if n.op == "slice_channels"}

    def qp(v):
        return qg.qparams(slice_src.get(v, v))

    def real(v):
        return ((env[v].astype(np.int64) - qp(v).zero_point).astype(F32) * F32(qp(v).scale)).astype(F32)

    q_in = qg.act[IMAGE]
    env = {IMAGE: np.clip(np_round(image.astype(F32) / F32(q_in.scale)) + q_in.zero_point, -128, 127).astype(np.int64), LABEL: label}
    conv_by_out = {n.outputs[0]: n for n in trainer.convs}
    for node in trainer.graph.nodes:
        op, ins, out, c = node.op, node.inputs, node.outputs[0], qg.consts.get(node.name, {})
        at = node.attrs
        if op == "conv2d":
            x, w, b = ins
            acc = np_conv(env[x] - qg.qparams(x).zero_point, st[w].astype(np.int64), at["stride"][0], at["padding"][0], at["groups"]) + st[b].astype(np.int64)[None, :, None, None]
            env[out] = np_requant(acc, c["multiplier"].numpy(), qg.act[out].zero_point, c["qmin"], c["qmax"])
        elif op in ("relu", "relu6"):
            env[out] = env[qg.alias[out]]
        elif op == "add" and c:
            a, b = ins
            fa = (env[a] - qg.qparams(a).zero_point).astype(F32) * F32(c["m_a"])
            fb = (env[b] - qg.qparams(b).zero_point).astype(F32) * F32(c["m_b"])
            env[out] = np.clip(np_round((fa + fb).astype(F32)) + qg.act[out].zero_point, -128, 127).astype(np.int64)
        elif op == "add":
            env[out] = (env[ins[0]] + env[ins[1]]).astype(F32)
        elif op == "mean_hw":
            (x,) = ins
            acc = (env[x] - qg.qparams(x).zero_point).sum((2, 3))
            env[out] = np_requant(acc, np.array(c["multiplier"], dtype=F32), qg.act[out].zero_point, -128, 127)
        elif op == "slice_channels":
            env[out] = env[ins[0]][:, : at["channels"]]
        elif op == "linear":
            x, w, b = ins
            xr = real(x)
            env[out] = np_ordered_sum([(xr[:, i, None] * st[w][None, :, i]).astype(F32) for i in range(xr.shape[1])], start=np.broadcast_to(st[b], (xr.shape[0], st[b].shape[0])))
        elif op == "cross_entropy":
            z, total = np_shifted_logits_and_exp_sum(env[ins[0]])
            env[out] = F32((np.log(total) - z[np.arange(len(z)), env[LABEL]]).sum() / len(z))
        elif op == "cross_entropy_grad":
            z, total = np_shifted_logits_and_exp_sum(env[ins[0]])
            p = (np.exp(z) / total[:, None]).astype(F32)
            env[out] = ((p - np.eye(z.shape[1], dtype=F32)[env[LABEL]]) / F32(len(z))).astype(F32)
        elif op == "linear_grad_input":
            g, w = env[ins[0]], st[ins[1]]
            env[out] = np_ordered_sum([(g[:, k, None] * w[None, k]).astype(F32) for k in range(w.shape[0])])
        elif op == "linear_grad_weight":
            x, g = real(ins[0]), env[ins[1]]
            env[out] = np_ordered_sum([(g[b, :, None] * x[b, None, :]).astype(F32) for b in range(x.shape[0])])
        elif op in ("sum_n", "sum_nhw"):
            g = env[ins[0]]
            flat = np.moveaxis(g, 1, 0).reshape(g.shape[1], -1)
            env[out] = np_ordered_sum([flat[:, i] for i in range(flat.shape[1])])
        elif op == "mean_hw_grad":
            shape = at["input_shape"]
            env[out] = np.broadcast_to((env[ins[0]] / F32(shape[2] * shape[3])).astype(F32)[:, :, None, None], shape)
        elif op in ("relu_grad", "relu6_grad"):
            g, y = ins
            cc = qg.consts[conv_by_out[qg.alias[y]].name]
            env[out] = np.where((env[y] > cc["qmin"]) & (env[y] < cc["qmax"]), env[g], F32(0)).astype(F32)
        elif op == "conv2d_grad_input":
            w = (st[ins[1]].astype(F32) * qg.weight_scales[ins[1]].numpy()[:, None, None, None]).astype(F32)
            env[out] = np_conv_grad_input(env[ins[0]], w, at["stride"][0], at["padding"][0], at["groups"], at["input_shape"])
        elif op == "conv2d_grad_weight":
            env[out] = np_conv_grad_weight(real(ins[0]), env[ins[1]], at["stride"][0], at["padding"][0], at["groups"], at["weight_shape"])
        elif op == "sgd_update":
            p, g = ins[0], env[ins[1]]
            if p in trainer.state.fp32:
                st[p] = (st[p] - (g * F32(lr)).astype(F32)).astype(F32)
            elif p in trainer.state.weights:
                s = qg.weight_scales[p].numpy()[:, None, None, None]
                qas = (1.0 / qg.weight_scales[p].numpy().astype(np.float64) ** 2).astype(F32)[:, None, None, None]
                step = (((g * s).astype(F32) * qas).astype(F32) * F32(lr)).astype(F32)
                cin = g.shape[1]
                m = np.clip(masters[p] - step, -127, 127).astype(F32)  # master32
                masters[p] = m
                st[p] = st[p].copy()
                st[p][:, :cin] = np.clip(np_round(m), -127, 127).astype(np.int8)
            else:
                conv = next(n for n in trainer.convs if n.inputs[2] == p)
                s = (qg.qparams(conv.inputs[0]).scale * qg.weight_scales[conv.inputs[1]].numpy().astype(np.float64)).astype(F32)
                qas = (1.0 / s.astype(np.float64) ** 2).astype(F32)
                step = (((g * s).astype(F32) * qas).astype(F32) * F32(lr)).astype(F32)
                st[p] = (st[p].astype(np.int64) - np_round(step).astype(np.int64)).astype(np.int32)
    return {"state": st, "masters": masters, "env": env}


def small_net():
    torch.manual_seed(0)
    return randomize_batchnorm(InvertedResidualNet(8, [BlockSpec(1, 8, 1), BlockSpec(3, 8, 1), BlockSpec(4, 16, 2), BlockSpec(4, 16, 1)], 24, n_classes=4))


def test_int8_step_equals_numpy_model_bit_for_bit():
    net = small_net()
    scheme = Scheme(bias_depth=6, weights={"features.4.conv.0.0": 0.5, "features.3.conv.2": 1.0, "features.4.conv.1.0": 1.0})
    lr = 0.05
    plan = training_plan(net, (1, 3, 12, 12), scheme, lr=lr)
    g = torch.Generator().manual_seed(3)
    trainer = Int8Trainer(plan, torch.randn(8, 3, 12, 12, generator=g), rule="master32", qas=True)
    assert any(n.op == "conv2d_grad_input" and n.attrs["groups"] > 1 for n in plan.graph.nodes)  # depthwise backward runs
    changed = set()
    for step in range(3):
        x, y = torch.randn(1, 3, 12, 12, generator=g) * 1.3, torch.randint(0, 4, (1,), generator=g)
        ref = np_int8_step(trainer, x.numpy(), y.numpy(), lr)
        before = {k: v.clone() for k, v in trainer.state.weights.items()}
        env = trainer.run(trainer.quantize_images(x), y, trainer.graph.nodes)
        trainer.state.steps += 1
        compared = 0
        for name, value in ref["env"].items():  # every activation code and fp32 gradient, bit for bit
            if name != LABEL:
                np.testing.assert_array_equal(env[name].numpy(), np.asarray(value).astype(env[name].numpy().dtype), err_msg=f"{name} at step {step}")
                assert env[name].numpy().dtype != np.float32 or np.array_equal(env[name].numpy().view(np.int32), np.asarray(value, dtype=np.float32).view(np.int32)), name
                compared += 1
        assert compared > 40 and LOSS in ref["env"] and LOGITS in ref["env"]
        for name, value in {**ref["state"], **ref["masters"]}.items():
            ours = {**trainer.state.weights, **trainer.state.biases, **trainer.state.fp32}[name] if name not in ref["masters"] else trainer.state.masters[name]
            assert np.array_equal(ours.numpy().view(np.uint8), np.ascontiguousarray(value).view(np.uint8)), f"{name} after step {step}"
        changed |= {k for k in before if not torch.equal(before[k], trainer.state.weights[k])}
    assert changed, "QAS with a master copy moved no int8 weight in 3 steps"


def test_update_rules_handle_sub_lsb_steps():
    q = torch.zeros(1000, dtype=torch.int8).view(10, 100)
    step = torch.full((10, 100), 0.1)  # a tenth of a code per step
    for rule, expected in {"round": 0, "master32": -1, "master16": -1}.items():
        master = int8_ops.initial_master(q, rule)
        cur = q
        for t in range(10):
            cur, master = int8_ops.update_int8_weight(cur, step, rule, master, seed=0, counter=t)
        assert (cur == expected).all(), rule  # ten steps of 0.1 make one code (round: nothing)
    cur = q
    for t in range(10):
        cur, _ = int8_ops.update_int8_weight(cur, step, "stochastic", None, seed=0, counter=t)
    assert abs(float(cur.float().mean()) + 1.0) < 0.1  # right in expectation
    u1, u2 = int8_ops.uniform_hash(0, 1, 1000), int8_ops.uniform_hash(0, 2, 1000)
    assert 0 <= float(u1.min()) and float(u1.max()) < 1 and not torch.equal(u1, u2)
    assert abs(float(u1.mean()) - 0.5) < 0.05


def test_uniform_hash_matches_its_c_definition():
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed, counter = 7, 123456
    base = (seed * 0x9E3779B9 + counter * 0x85EBCA6B) & 0xFFFFFFFF
    expected = [(lowbias32((base + i) & 0xFFFFFFFF) >> 8) / 2**24 for i in range(64)]
    assert int8_ops.uniform_hash(seed, counter, 64).tolist() == expected


def test_qas_is_what_lets_int8_weights_learn():
    """Without QAS the int8 weight and bias steps are s_w^2 (and (s_x s_w)^2) times too small:
    even a master copy never accumulates a whole code."""
    net = small_net()
    scheme = Scheme(bias_depth=4, weights={"features.4.conv.0.0": 1.0})
    g = torch.Generator().manual_seed(0)
    cal = torch.randn(8, 3, 12, 12, generator=g)
    data = [(torch.randn(1, 3, 12, 12, generator=g), torch.randint(0, 4, (1,), generator=g)) for _ in range(8)]
    moved = {}
    for qas in (False, True):
        trainer = Int8Trainer(training_plan(net, (1, 3, 12, 12), scheme, lr=0.1), cal, rule="master32", qas=qas)
        w0 = trainer.state.weights["features.4.conv.0.0.weight"].clone()
        b0 = trainer.state.biases["features.4.conv.0.0.bias"].clone()
        for x, y in data:
            trainer.train_step(x, y)
        moved[qas] = (int((trainer.state.weights["features.4.conv.0.0.weight"] != w0).sum()), int((trainer.state.biases["features.4.conv.0.0.bias"] != b0).sum()))
    assert moved[False] == (0, 0) and moved[True][0] > 0 and moved[True][1] > 0


def test_unknown_update_rule_is_named():
    net = small_net()
    plan = training_plan(net, (1, 3, 12, 12), Scheme(bias_depth=1), lr=0.1)
    with pytest.raises(Exception, match="unknown sub-LSB update rule 'truncate'"):
        Int8Trainer(plan, torch.randn(2, 3, 12, 12), rule="truncate")
