"""`edgewise tiny plan`: the per-op table, the peak line and the memory-timeline PNG; bad schemes."""

from __future__ import annotations

import json

from edgewise import cli
from edgewise.tiny.models import mobilenet_v2
from edgewise.tiny.plan import training_plan
from edgewise.tiny.sparse import Scheme


def test_tiny_plan_prints_table_and_saves_timeline(tmp_path, capsys):
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps({"bias_depth": 6, "weights": {"features.15.conv.0.0": 0.25}}))
    png = tmp_path / "timeline.png"
    assert cli.main(["tiny", "plan", "--resolution", "64", "--scheme", str(scheme), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| step | op | output | shape | KB | live KB |" in out and "| sgd_update |" in out
    peak = float(out.strip().splitlines()[-1].split("peak_kb = ")[1])
    plan = training_plan(mobilenet_v2(0.35, n_classes=10), (1, 3, 64, 64), Scheme.load(scheme), precision="int8", update_rule="stochastic")
    assert peak == round(plan.peak_kb, 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_plan_bad_scheme_is_one_line(tmp_path, capsys):
    scheme = tmp_path / "bad.json"
    scheme.write_text(json.dumps({"weights": {"features.99.conv": 1}}))
    assert cli.main(["tiny", "plan", "--scheme", str(scheme), "--png", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json: no conv layer named 'features.99.conv'" in err
