"""int8 quantization of the training graph's forward pass: the int8 ops against a plain numpy
model of the same integer arithmetic (exact), and real ImageNet photos against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgewise.tiny import int8_ops
from edgewise.tiny.frontend import IMAGE, LOGITS, forward_graph, from_module
from edgewise.tiny.models import BlockSpec, InvertedResidualNet, imagenet_mobilenet_v2, imagenet_preprocess
from edgewise.tiny.quantize import QParams, quantize_graph, run_int8
from tests.test_tiny_autodiff import randomize_batchnorm


def np_round(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def np_requant(acc: np.ndarray, multiplier: np.ndarray, z: int, lo: int, hi: int) -> np.ndarray:
    m = multiplier.astype(np.float32).reshape((1, -1) + (1,) * (acc.ndim - 2)) if multiplier.ndim else np.float32(multiplier)
    return np.clip(np_round(acc.astype(np.int32).astype(np.float32) * m) + z, lo, hi).astype(np.int64)


def np_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int) -> np.ndarray:
    """Integer convolution by explicit taps, int64 throughout."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, ho, wo), dtype=np.int64)
    og = o // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg : (g + 1) * cg, i : i + stride * ho : stride, j : j + stride * wo : stride]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og : (g + 1) * og, :, i, j])
    return out


def numpy_int8_forward(qg, image: np.ndarray) -> dict[str, np.ndarray]:
    q_in = qg.act[IMAGE]
    env = {IMAGE: np.clip(np_round(image.astype(np.float32) / np.float32(q_in.scale)) + q_in.zero_point, -128, 127).astype(np.int64)}
    for node in forward_graph(qg.graph).nodes:
        out, c = node.outputs[0], qg.consts.get(node.name, {})
        if node.op == "conv2d":
            x, w, _ = node.inputs
            acc = np_conv(env[x] - qg.qparams(x).zero_point, qg.weights[w].numpy().astype(np.int64), node.attrs["stride"][0], node.attrs["padding"][0], node.attrs["groups"])
            acc += c["bias_i32"].numpy().astype(np.int64)[None, :, None, None]
            env[out] = np_requant(acc, c["multiplier"].numpy(), qg.act[out].zero_point, c["qmin"], c["qmax"])
        elif node.op in ("relu", "relu6"):
            env[out] = env[qg.alias[out]]
        elif node.op == "add":
            a, b = node.inputs
            fa = (env[a] - qg.qparams(a).zero_point).astype(np.float32) * np.float32(c["m_a"])
            fb = (env[b] - qg.qparams(b).zero_point).astype(np.float32) * np.float32(c["m_b"])
            env[out] = np.clip(np_round(fa + fb) + qg.act[out].zero_point, -128, 127).astype(np.int64)
        elif node.op == "mean_hw":
            (x,) = node.inputs
            acc = (env[x] - qg.qparams(x).zero_point).sum((2, 3))
            env[out] = np_requant(acc, np.array(c["multiplier"], dtype=np.float32), qg.act[out].zero_point, -128, 127)
    return env


def test_rounding_and_zero_are_exact():
    assert int8_ops.round_half_away(torch.tensor([-2.5, -0.5, 0.5, 1.5, 2.5])).tolist() == [-3, -1, 1, 2, 3]
    q = QParams.from_range(0.3, 5.7)  # a ReLU-like range: 0 still maps to a code, exactly
    assert int8_ops.dequantize(int8_ops.quantize(torch.zeros(1), q.scale, q.zero_point), q.scale, q.zero_point).item() == 0.0


def test_int8_forward_equals_numpy_model_exactly():
    torch.manual_seed(0)
    net = randomize_batchnorm(InvertedResidualNet(8, [BlockSpec(1, 8, 1), BlockSpec(3, 8, 1, kernel=5), BlockSpec(4, 16, 2)], 24, n_classes=4))
    graph, params = from_module(net, (2, 3, 20, 20))
    qg = quantize_graph(graph, params, torch.randn(6, 3, 20, 20))
    image = torch.randn(2, 3, 20, 20) * 1.5  # beyond the calibration range too: clamping paths
    ours = run_int8(qg, image)
    ref = numpy_int8_forward(qg, image.numpy())
    checked = 0
    for name, value in ref.items():
        np.testing.assert_array_equal(ours[name].numpy().astype(np.int64), value, err_msg=name)
        checked += 1
    assert checked >= 15 and any(n.op == "add" for n in graph.nodes)
    # and int8 logits stay close to fp32
    with torch.no_grad():
        fp32 = net(image)
    assert (ours[LOGITS] - fp32).abs().max() < 0.1 * fp32.abs().max()


skimage_data = pytest.importorskip("skimage.data")


def test_int8_mobilenet_v2_classifies_real_photos_like_fp32():
    model = imagenet_mobilenet_v2()
    photo = lambda name: imagenet_preprocess(torch.from_numpy(getattr(skimage_data, name)()[..., :3].copy()))  # noqa: E731
    calibration = torch.cat([photo(n) for n in ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")])
    graph, params = from_module(model, (1, 3, 224, 224))
    qg = quantize_graph(graph, params, calibration)
    for name, classes in {"chelsea": {281, 282, 285}, "coffee": {967, 968, 504}}.items():
        x = photo(name)
        with torch.no_grad():
            fp32 = model(x)
        int8 = run_int8(qg, x)[LOGITS]
        assert int(int8.argmax()) == int(fp32.argmax()) and int(int8.argmax()) in classes, name
