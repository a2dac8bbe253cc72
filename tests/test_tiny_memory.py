"""Scheduling and static memory planning: lifetimes, a valid arena, and what in-place update saves."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from edgewise.tiny import autodiff, executor, memory, schedule
from edgewise.tiny.frontend import from_module
from edgewise.tiny.models import mobilenet_v2


def assert_valid(plan: memory.MemoryPlan) -> None:
    for a, b in itertools.combinations(plan.allocations.values(), 2):
        if a.start <= b.end and b.start <= a.end:  # alive together: no shared bytes
            assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
    assert all(a.offset % memory.ALIGN == 0 for a in plan.allocations.values())
    assert plan.peak >= plan.lower_bound


def test_lifetimes_of_a_small_chain():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    graph, _ = from_module(model, (1, 3, 8, 8))
    spans = memory.lifetimes(graph)
    conv, relu, pool, linear, loss = graph.nodes
    assert spans["image"] == (-1, 0)
    assert spans[conv.outputs[0]] == (0, 1) and spans[relu.outputs[0]] == (1, 2)
    assert spans["logits"] == (3, 4) and spans["loss"] == (4, 4)  # graph outputs live to the end
    plan = memory.plan_memory(graph)
    assert_valid(plan)
    # step 1 holds the conv and relu outputs (4*8*8 floats each) and the label (read by the loss)
    assert spans["label"] == (-1, 4)
    assert plan.lower_bound == 2 * 4 * 8 * 8 * 4 + memory.ALIGN == plan.peak


def test_plan_is_valid_and_reordering_frees_gradients_early():
    model = mobilenet_v2(0.35, n_classes=10)
    peaks = {}
    for reorder in (False, True):
        graph, _ = from_module(model, (1, 3, 128, 128))
        grads = autodiff.append_backward(graph, graph.params)
        updates = schedule.append_updates(graph, grads, lr=0.01, reorder=reorder)
        position = {n.name: i for i, n in enumerate(graph.nodes)}
        for u in updates:  # nothing reads the old parameter after its in-place update
            assert not any(u.inputs[0] in n.inputs for n in graph.nodes[position[u.name] + 1 :])
        plan = memory.plan_memory(graph)
        assert_valid(plan)
        peaks[reorder] = plan.peak
    assert peaks[True] < peaks[False]


def test_reordered_updates_compute_one_sgd_step():
    """The scheduled graph's updated parameters equal one SGD step with autograd's gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU6(), nn.Conv2d(6, 6, 3, 1, 1, groups=6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    graph, params = from_module(model, (2, 3, 10, 10))
    trainable = ["3.weight", "3.bias", "7.weight"]
    schedule.append_updates(graph, autodiff.append_backward(graph, trainable), lr=0.1)
    x, label = torch.randn(2, 3, 10, 10), torch.tensor([0, 2])
    env = executor.run(graph, params, {"image": x, "label": label})
    leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in params.items()}
    h = torch.nn.functional.conv2d(x, leaves["0.weight"], leaves["0.bias"], stride=2, padding=1).clamp(0, 6)
    h = torch.nn.functional.conv2d(h, leaves["3.weight"], leaves["3.bias"], padding=1, groups=6).relu().mean((2, 3))
    loss = torch.nn.functional.cross_entropy(h @ leaves["7.weight"].T + leaves["7.bias"], label)
    for p, g in zip(trainable, torch.autograd.grad(loss, [leaves[p] for p in trainable])):
        torch.testing.assert_close(env[schedule.UPDATED_PREFIX + p], params[p] - 0.1 * g, rtol=1e-5, atol=1e-6)
