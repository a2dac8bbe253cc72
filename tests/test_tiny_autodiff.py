"""Tiny-training compiler, fp32 path: the front end against the PyTorch module it traces, and every
gradient rule (and their wiring: residual sums, pruning) against torch autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgewise.tiny import autodiff, executor
from edgewise.tiny.frontend import LOGITS, LOSS, UnsupportedOpError, from_module
from edgewise.tiny.models import BlockSpec, InvertedResidualNet, mobilenet_v2


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so that folding is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def autograd_reference(graph, params, feeds, trainable):
    """Gradients by torch autograd through the graph's forward ops (the same forward definitions)."""
    leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in params.items()}
    env = {**leaves, **feeds}
    for node in graph.nodes:
        if node.op == "slice_channels":
            continue
        if node.op not in ("conv2d", "relu", "relu6", "add", "mean_hw", "linear", "cross_entropy"):
            break  # the backward part
        env[node.outputs[0]] = executor.FP32_OPS[node.op](*(env[i] for i in node.inputs), **node.attrs)
    grads = torch.autograd.grad(env[LOSS], [leaves[p] for p in sorted(trainable)])
    return env, dict(zip(sorted(trainable), grads))


def check_gradients(model: nn.Module, input_shape, trainable=None, seed=0):
    graph, params = from_module(model, input_shape)
    trainable = set(graph.params) if trainable is None else set(trainable)
    grads = autodiff.append_backward(graph, trainable)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=g)
    label = torch.randint(0, graph.values[LOGITS].shape[1], (input_shape[0],), generator=g)
    env = executor.run(graph, params, {"image": x, "label": label})
    with torch.no_grad():
        torch.testing.assert_close(env[LOGITS], model.eval()(x), rtol=1e-4, atol=1e-5)  # BN folding is exact
    ref_env, ref = autograd_reference(graph, params, {"image": x, "label": label}, trainable)
    torch.testing.assert_close(env[LOSS], ref_env[LOSS])
    for p in sorted(trainable):
        scale = ref[p].abs().max().clamp(min=1e-12)
        assert (env[grads[p]] - ref[p]).abs().max() / scale < 1e-4, p
    return graph, grads


def head(cin: int, n_classes: int = 5) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, n_classes)]


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3, 1, 1),  # regular, with its own bias
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),  # strided; 9x9 input leaves a remainder (output_padding)
        nn.Conv2d(3, 8, 1, bias=False),  # pointwise
        nn.Conv2d(3, 6, 5, 2, 2, groups=3, bias=False),  # grouped, 5x5
    ],
    ids=["conv3x3", "strided", "pointwise", "grouped5x5"],
)
@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6()], ids=["relu", "relu6"])
def test_conv_rules_against_autograd(conv, act):
    torch.manual_seed(0)
    stem = nn.Conv2d(2, 3, 1)  # so that the conv's input gradient is needed too
    model = randomize_batchnorm(nn.Sequential(stem, conv, nn.BatchNorm2d(conv.out_channels), act, *head(conv.out_channels)))
    with torch.no_grad():
        model[1].weight.mul_(4)  # push activations past 6, so relu6's upper clamp is exercised
    check_gradients(model, (2, 2, 9, 9))


def test_depthwise_and_residual_against_autograd():
    torch.manual_seed(1)
    net = InvertedResidualNet(8, [BlockSpec(1, 8, 1), BlockSpec(3, 8, 1, kernel=5), BlockSpec(4, 16, 2, kernel=7)], 24, n_classes=4)
    graph, _ = check_gradients(randomize_batchnorm(net), (2, 3, 21, 21))
    assert sum(n.op == "add" and n.outputs[0].startswith("grad:") for n in graph.nodes) >= 2  # residual sums


def test_mobilenet_v2_end_to_end_against_autograd():
    torch.manual_seed(2)
    check_gradients(randomize_batchnorm(mobilenet_v2(0.35, n_classes=10)), (1, 3, 64, 64))


def test_backward_pruning_stops_at_the_first_trained_layer():
    torch.manual_seed(3)
    model = randomize_batchnorm(mobilenet_v2(0.35, n_classes=10))
    last_conv = "features.18.0"
    graph, grads = check_gradients(model, (1, 3, 64, 64), trainable={"classifier.1.weight", "classifier.1.bias", f"{last_conv}.bias"})
    ops = [n.op for n in graph.nodes if n.outputs[0].startswith("grad:")]
    assert "conv2d_grad_input" not in ops and "conv2d_grad_weight" not in ops
    assert sorted(ops) == sorted(["cross_entropy_grad", "linear_grad_weight", "sum_n", "linear_grad_input", "mean_hw_grad", "relu6_grad", "sum_nhw"])
    # one trained weight in the middle: input gradients flow back to it and no further
    graph, _ = check_gradients(model, (1, 3, 64, 64), trainable={"features.16.conv.0.0.weight"})
    convs = [n for n in graph.nodes if n.op == "conv2d"]
    trained_at = next(i for i, n in enumerate(convs) if n.inputs[1] == "features.16.conv.0.0.weight")
    with_input_grad = {n.source for n in graph.nodes if n.op == "conv2d_grad_input"}
    assert with_input_grad == {n.name for n in convs[trained_at + 1 :]}  # exactly the convs after it


def test_unsupported_op_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), *head(4))
    with pytest.raises(UnsupportedOpError, match=r"unsupported op MaxPool2d at call_module '1'"):
        from_module(model, (1, 3, 8, 8))


def test_linear_on_unflattened_features_is_named():
    with pytest.raises(UnsupportedOpError, match=r"linear expects \[N, 6\] input, got \(1, 4, 6, 6\)"):
        from_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(6, 2)), (1, 3, 8, 8))


def test_unknown_trainable_parameter_is_named():
    graph, _ = from_module(nn.Sequential(nn.Conv2d(3, 4, 3), *head(4)), (1, 3, 8, 8))
    with pytest.raises(KeyError, match="features.99.weight"):
        autodiff.append_backward(graph, {"features.99.weight"})
