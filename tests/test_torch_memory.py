"""PyTorch's memory for full fine-tuning: the allocator-trace method checked on known allocations and on a
linear model computed by hand, then one real MobileNetV2-w0.35 measurement (fresh subprocesses)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgewise.errors import EdgewiseError
from edgewise.metrics.torch_memory import allocator_peak, measure_full_finetune, profile_full_finetune

MiB = 2**20


def test_allocator_peak_of_known_tensors():
    def together():  # 4 MiB and 8 MiB alive at once, then both freed
        a = torch.empty(MiB)
        b = torch.empty(2 * MiB)
        del a, b

    def one_after_the_other():  # never more than 8 MiB alive: the frees must be integrated in time order
        a = torch.empty(MiB)
        del a
        b = torch.empty(2 * MiB)
        del b

    kept = []
    r = allocator_peak(together)
    assert abs(r.peak_bytes - 12 * MiB) <= 0.02 * 12 * MiB and r.end_bytes == 0
    assert r.allocated_bytes >= 12 * MiB
    r = allocator_peak(one_after_the_other)
    assert abs(r.peak_bytes - 8 * MiB) <= 0.02 * 8 * MiB and r.end_bytes == 0
    r = allocator_peak(lambda: kept.append(torch.empty(MiB)))
    assert abs(r.end_bytes - 4 * MiB) <= 0.02 * 4 * MiB and r.peak_bytes >= r.end_bytes


def test_linear_training_step_against_hand_count():
    batch, width, classes = 64, 1024, 10
    r = profile_full_finetune(
        lambda: nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)), (batch, width), classes, steps=2
    )
    params = (width * width + width + width * classes + classes) * 4
    inputs = batch * width * 4 + batch * 8  # float input, int64 labels
    activation = batch * width * 4  # one [batch, width] float tensor (linear-1 output, relu output, their gradients)
    assert r.param_bytes == params and r.buffer_bytes == 0
    # before step 1 exactly the parameters, the input and the labels are live
    assert r.total_peaks[0] - r.step_peaks[0] == params + inputs
    # the gradients (as big as the parameters) appear during backward while one activation-sized tensor is still alive
    for total in r.total_peaks:
        assert params + params + inputs + activation <= total <= params + params + inputs + 3 * activation
    assert r.step_peaks[0] >= params + activation  # step 1 allocates the gradients
    assert r.total_peaks[1] == r.total_peaks[0]  # step 2 frees the old gradients first (set_to_none), then the same peak


def test_mobilenet_v2_w035_full_finetune_at_128():
    m = measure_full_finetune("edgewise.tiny.models:mobilenet_v2", {"width": 0.35, "n_classes": 10}, (1, 3, 128, 128))
    assert m.steps == 2 and len(m.step_peaks) == len(m.rss_step_peaks) == 2
    assert m.step_peak_bytes == max(m.step_peaks) and m.total_peak_bytes == max(m.total_peaks)
    assert 100_000 * 4 < m.param_bytes < 1_000_000 * 4  # ~0.4 M parameters
    # activations saved for backward at 128x128 are several MB; the gradients come on top in step 1
    assert 5 * MiB < m.step_peak_bytes < 100 * MiB
    assert m.step_peaks[0] >= m.param_bytes  # step 1 allocates all the gradients
    assert m.total_peak_bytes >= m.step_peak_bytes + m.param_bytes + m.buffer_bytes + 3 * 128 * 128 * 4
    # the process: its RSS grows at least by a good part of the tensor peak, and holds the whole runtime
    assert m.rss_hwm_reset
    assert m.rss_step_peak_bytes > 0.5 * m.step_peak_bytes
    assert m.rss_peak_bytes >= m.rss_before_bytes + m.rss_step_peak_bytes
    assert m.rss_peak_bytes > m.total_peak_bytes and m.rss_before_bytes > 50 * MiB  # torch itself


def test_bad_requests_are_user_errors():
    with pytest.raises(EdgewiseError, match="module:function"):
        measure_full_finetune("edgewise.tiny.models.mobilenet_v2", {"n_classes": 10})
    with pytest.raises(EdgewiseError, match="no_such"):
        measure_full_finetune("edgewise.tiny.models:no_such", {"n_classes": 10})
    with pytest.raises(EdgewiseError, match="n_classes"):
        measure_full_finetune("edgewise.tiny.models:mobilenet_v2", {"width": 0.35})
    with pytest.raises(EdgewiseError, match="JSON"):
        measure_full_finetune("edgewise.tiny.models:mobilenet_v2", {"width": object(), "n_classes": 10})
