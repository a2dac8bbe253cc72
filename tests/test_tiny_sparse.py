"""Sparse update schemes: the parameters they train, partial-channel weight gradients against
autograd, what they save in the memory plan, and schemes that name nothing real."""

from __future__ import annotations

import json

import pytest
import torch

from edgewise.tiny import autodiff, executor, schedule
from edgewise.tiny.frontend import LOSS, from_module
from edgewise.tiny.models import mobilenet_v2
from edgewise.tiny.plan import training_plan
from edgewise.tiny.sparse import Scheme, SchemeError, apply_scheme, conv_layers
from tests.test_tiny_autodiff import autograd_reference, randomize_batchnorm


def small_mbv2():
    torch.manual_seed(0)
    return randomize_batchnorm(mobilenet_v2(0.35, n_classes=10))


def test_scheme_selects_biases_weights_and_classifier():
    graph, _ = from_module(small_mbv2(), (1, 3, 64, 64))
    layers = list(conv_layers(graph))
    plan = apply_scheme(graph, Scheme(bias_depth=3, weights={"features.16.conv.0.0": 1.0}))
    assert plan.trainable == {f"{name}.bias" for name in layers[-3:]} | {"features.16.conv.0.0.weight", "classifier.1.weight", "classifier.1.bias"}
    assert plan.weight_slices == {}


def test_partial_weight_gradients_against_autograd():
    model = small_mbv2()
    graph, params = from_module(model, (2, 3, 48, 48))
    scheme = Scheme(bias_depth=4, weights={"features.15.conv.0.0": 0.125, "features.16.conv.2": 0.5, "features.17.conv.0.0": 1.0})
    plan = apply_scheme(graph, scheme)
    assert set(plan.weight_slices) == {"features.15.conv.0.0.weight", "features.16.conv.2.weight"}
    grads = autodiff.append_backward(graph, plan.trainable, weight_slices=plan.weight_slices)
    x, label = torch.randn(2, 3, 48, 48), torch.tensor([1, 7])
    env = executor.run(graph, params, {"image": x, "label": label})
    _, ref = autograd_reference(graph, params, {"image": x, "label": label}, plan.trainable)
    for p in plan.trainable:
        want = ref[p][:, : env[grads[p]].shape[1]] if p in plan.weight_slices else ref[p]
        assert env[grads[p]].shape == want.shape, p
        torch.testing.assert_close(env[grads[p]], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert env[grads["features.15.conv.0.0.weight"]].shape[1] == 1 * round(params["features.15.conv.0.0.weight"].shape[1] / 8)
    # the update touches only the trained slice
    schedule.append_updates(graph, grads, lr=0.5)
    env = executor.run(graph, params, {"image": x, "label": label})
    w = "features.16.conv.2.weight"
    half = env[grads[w]].shape[1]
    torch.testing.assert_close(env[schedule.UPDATED_PREFIX + w][:, half:], params[w][:, half:])
    torch.testing.assert_close(env[schedule.UPDATED_PREFIX + w][:, :half], params[w][:, :half] - 0.5 * env[grads[w]])


def saved_for_backward(scheme: Scheme, resolution: int = 128) -> tuple[int, int]:
    """(bytes live when the loss is computed, i.e. kept for the backward pass; the plan's peak)."""
    plan = training_plan(mobilenet_v2(0.35, n_classes=10), (1, 3, resolution, resolution), scheme)
    return plan.kept_for_backward, plan.memory.peak


def test_sparser_schemes_keep_less_for_backward():
    graph, _ = from_module(mobilenet_v2(0.35, n_classes=10), (1, 3, 128, 128))
    full = saved_for_backward(Scheme(bias_depth=52, weights={name: 1.0 for name in conv_layers(graph)}))
    sparse = saved_for_backward(Scheme(bias_depth=12, weights={"features.14.conv.0.0": 1.0, "features.15.conv.0.0": 1.0}))
    partial = saved_for_backward(Scheme(bias_depth=12, weights={"features.14.conv.0.0": 0.125, "features.15.conv.0.0": 1.0}))
    last_layer = saved_for_backward(Scheme(bias_depth=0))
    assert last_layer[0] < partial[0] < sparse[0] < full[0]
    assert last_layer[1] <= partial[1] <= sparse[1] < full[1]


def test_bad_schemes_are_named(tmp_path):
    graph, _ = from_module(small_mbv2(), (1, 3, 64, 64))
    with pytest.raises(SchemeError, match="no conv layer named 'features.99.conv'"):
        apply_scheme(graph, Scheme(weights={"features.99.conv": 1.0}))
    with pytest.raises(SchemeError, match="depthwise conv; a partial ratio"):
        apply_scheme(graph, Scheme(weights={"features.16.conv.1.0": 0.5}))
    with pytest.raises(SchemeError, match="bias_depth 500 exceeds"):
        apply_scheme(graph, Scheme(bias_depth=500))
    with pytest.raises(SchemeError, match="ratio must be one of"):
        Scheme.from_dict({"weights": {"features.16.conv.0.0": 0.3}})
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps({"bias_depth": 2, "weight": {}}))
    with pytest.raises(SchemeError, match="scheme.json: unknown field"):
        Scheme.load(path)
    path.write_text(json.dumps(Scheme(3, {"features.16.conv.0.0": 0.25}).to_dict()))
    assert Scheme.load(path) == Scheme(3, {"features.16.conv.0.0": 0.25})


def test_loss_is_unchanged_by_the_slices():
    model = small_mbv2()
    graph, params = from_module(model, (1, 3, 32, 32))
    x, label = torch.randn(1, 3, 32, 32), torch.tensor([3])
    before = executor.run(graph, params, {"image": x, "label": label})[LOSS]
    apply_scheme(graph, Scheme(weights={"features.2.conv.0.0": 0.25}))
    torch.testing.assert_close(executor.run(graph, params, {"image": x, "label": label})[LOSS], before)
