"""TEAL's input masks (`edgewise.flash.sparsity`): masking an input equals skipping its weight columns; the calibrated
thresholds keep the fraction of inputs they were calibrated for; a zero sparsity changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgewise.data.text import load_text
from edgewise.errors import EdgewiseError
from edgewise.flash import sparsity
from edgewise.lm.model import FeedForward
from edgewise.lm.runtime import LanguageModel


class _Model(nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].ffn = ffn


class _LM:
    def __init__(self, ffn):
        self.model = _Model(ffn)


def test_a_masked_input_is_a_skipped_column():
    torch.manual_seed(0)
    d, f = 16, 40
    gate_up, down = nn.Linear(d, 2 * f, bias=False), nn.Linear(f, d, bias=False)
    ffn = FeedForward(gate_up, down)
    x = torch.randn(3, d)
    t = sparsity.Thresholds(0.5, [(0.6, 0.05)])
    with sparsity.Masked(_LM(ffn), t) as masked:
        got = ffn(x)
    y = torch.empty(3, d)
    for r in range(3):  # the reference: only the kept columns' weights, read as a runtime that skips them would
        cols = (x[r].abs() >= 0.6).nonzero().squeeze(1)
        gu = gate_up.weight[:, cols] @ x[r, cols]
        h = torch.nn.functional.silu(gu[:f]) * gu[f:]
        rows = (h.abs() >= 0.05).nonzero().squeeze(1)
        y[r] = down.weight[:, rows] @ h[rows]
    assert torch.allclose(got, y, atol=1e-5)
    kept_x, kept_h = masked.kept()
    assert kept_x == pytest.approx(float((x.abs() >= 0.6).float().mean()))
    assert 0 < kept_h < 1


def test_calibrated_thresholds_keep_what_they_were_calibrated_for():
    lm = LanguageModel.load(compile=False)
    ids = lm.tokenizer.encode(load_text("shakespeare")[:20000])[:512]
    zero, half = sparsity.calibrate(lm, ids, [0.0, 0.5], ctx=256)
    cache = lm.new_cache(256)
    want = lm.prefill(ids[:256], cache, last_only=False)
    with sparsity.Masked(lm, zero) as masked:
        got = lm.prefill(ids[:256], lm.new_cache(256), last_only=False)
    assert torch.equal(got, want) and masked.kept() == (1.0, 1.0)
    with sparsity.Masked(lm, half) as masked:
        lm.prefill(ids[:256], lm.new_cache(256), last_only=False)
    kept_x, kept_h = masked.kept()
    assert abs(kept_x - 0.5) < 0.05 and abs(kept_h - 0.5) < 0.05  # on the text it was calibrated on: the quantile
    with pytest.raises(EdgewiseError, match="sparsities must lie"):
        sparsity.calibrate(lm, ids, [1.0])
