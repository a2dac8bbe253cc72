"""The int8 memory layout: no buffer is overwritten while a later op still needs it (checked by
replaying the schedule, independently of the planner), every stage only lowers the peak, the
paper's MbV2-w0.35 target holds, and `edgewise tiny compile`."""

from __future__ import annotations

import itertools
import json

import pytest

from edgewise import cli
from edgewise.tiny import memory
from edgewise.tiny.int8_layout import LAYOUT_STAGES, int8_layout
from edgewise.tiny.models import mcunet_5fps_like, mobilenet_v2, proxyless_mobile
from edgewise.tiny.plan import training_plan
from edgewise.tiny.search import Contributions
from edgewise.tiny.sparse import Scheme
from tests.test_tiny_memory import assert_valid

SCHEMES = [
    Scheme(bias_depth=0),
    Scheme(bias_depth=9, weights={"features.17.conv.0.0": 0.25, "features.16.conv.0.0": 0.25}),
    Scheme(bias_depth=20, weights={"features.14.conv.0.0": 1.0, "features.12.conv.1.0": 1.0, "features.10.conv.2": 0.5}),
]


def replay(graph, layout: memory.Layout) -> None:
    """Walk the schedule; whenever a node writes a buffer, nothing else in that buffer may still be read later."""
    steps = {n.name: i for i, n in enumerate(graph.nodes)}
    made = {o: steps[n.name] for n in graph.nodes for o in n.outputs}
    last = {v: -1 for v in graph.values}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            last[v] = max(last[v], i)
    for v in graph.outputs:
        last[v] = len(graph.nodes)
    for lazy in sorted(layout.lazy, key=lambda v: -made[v]):  # a lazy value's sources are read when it is
        for src in layout.lazy[lazy]:
            last[src] = max(last[src], last[lazy])
    streamed_readers = {v: [steps[n.name] for n in graph.nodes if v in n.inputs] for v in layout.streamed}

    def holder(v):
        if v in layout.lazy or v in layout.streamed or graph.values[v].kind == "param":
            return None
        while v in layout.aliases:
            v = layout.aliases[v]
        return v

    for i, node in enumerate(graph.nodes):
        if node.op == "sgd_update":
            continue
        for out in node.outputs:
            h = holder(out)
            if h is None:
                continue
            for v in graph.values:
                if v != out and holder(v) == h and made.get(v, -1) < i and last[v] > i:
                    pytest.fail(f"step {i} ({node}) writes buffer {h} over {v}, which step {last[v]} still reads")
    for v, readers in streamed_readers.items():  # a streamed row lives only inside its chain: read right after it is made
        assert readers and min(readers) > made[v] and max(readers) - made[v] <= 4, v


@pytest.mark.parametrize("scheme", SCHEMES, ids=["classifier", "sparse", "deeper"])
def test_layout_never_overwrites_a_live_value_and_each_stage_helps(scheme):
    model = mobilenet_v2(0.35, n_classes=10)
    plan = training_plan(model, (1, 3, 96, 96), scheme, precision="int8")
    peaks = []
    for stage in LAYOUT_STAGES:
        layout = int8_layout(plan.graph, stage)
        replay(plan.graph, layout)
        mp = memory.plan_memory(plan.graph, layout)
        assert_valid(mp)
        peaks.append(mp.peak)
    assert peaks[0] >= peaks[1] >= peaks[2] and peaks[2] < peaks[0], peaks
    assert plan.memory.peak == peaks[2]


def test_layout_on_other_nets():
    for model in (proxyless_mobile(0.3, n_classes=10), mcunet_5fps_like(n_classes=10)):
        plan = training_plan(model, (1, 3, 64, 64), Scheme(bias_depth=9), precision="int8")
        replay(plan.graph, plan.layout)
        assert_valid(plan.memory)


def test_mbv2_w035_near_the_papers_141_kb():
    """The paper's sparse + reorder figure for MbV2-w0.35 at 128x128 (benchmarks/tiny_memory.py's scheme):
    142.7 KB, 1.2% over, since a streamed chain's input stays alive until the chain's last row is
    made (the C backend reads it row by row; the plan was 140.4 KB before that was counted)."""
    plan = training_plan(mobilenet_v2(0.35, n_classes=10), (1, 3, 128, 128), SCHEMES[1], precision="int8", update_rule="stochastic")
    assert plan.peak_kb <= 141 * 1.02
    fp32 = training_plan(mobilenet_v2(0.35, n_classes=10), (1, 3, 128, 128), SCHEMES[1], precision="fp32")
    assert fp32.peak_kb > 4 * plan.peak_kb


def test_tiny_compile_writes_scheme_plan_and_png(tmp_path, capsys):
    scheme = tmp_path / "s.json"
    scheme.write_text(json.dumps(SCHEMES[1].to_dict()))
    out = tmp_path / "out"
    argv = ["tiny", "compile", "mbv2-w0.35", "--resolution", "128", "--scheme", str(scheme), "--budget", "144KB", "--out", str(out)]
    assert cli.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("peak_kb = ") and float(last.split(" = ")[1]) <= 144
    assert json.loads((out / "scheme.json").read_text()) == SCHEMES[1].to_dict()
    assert "| sgd_update |" in (out / "plan.md").read_text()
    assert (out / "memory.png").read_bytes()[:4] == b"\x89PNG"
    # over budget: the numbers, and what to do
    assert cli.main([*argv[:-4], "--budget", "100KB", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "over the 100.0 KB budget" in err and "arena" in err and "lower --resolution" in err


def test_tiny_compile_search_under_budget_and_infeasible_budget(tmp_path, capsys):
    """--search with a saved contribution analysis (so no fine-tunes run): the scheme found fits the
    budget by the real planner; a budget below the cheapest scheme names the smallest feasible one."""
    meta = {"data": "fashion-mnist", "val": None, "resolution": 48, "train_samples": 300, "val_samples": 500, "lr": 0.001, "finetune": "fp32", "rule": "stochastic", "seed": 0}
    layers = ["features.14.conv.0.0", "features.14.conv.2", "features.15.conv.0.0", "features.15.conv.2", "features.16.conv.0.0", "features.16.conv.2", "features.17.conv.0.0", "features.17.conv.2", "features.18.0"]
    contrib = Contributions(0.70, meta=meta)
    contrib.bias = {k: 0.004 * k for k in (0, 3, 6, 9, 12, 16, 22, 30)}
    contrib.weights = {layer: {r: 0.01 * (i + 1) * r for r in (0.125, 0.25, 0.5, 1.0)} for i, layer in enumerate(layers)}
    saved = tmp_path / "contrib.json"
    contrib.save(saved)
    pytest.importorskip("edgewise.data.images").FASHION_MNIST_DIR.exists() or pytest.skip("needs Fashion-MNIST")
    base = ["tiny", "compile", "--search", "--resolution", "48", "--contributions", str(saved), "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--budget", "220KB"]) == 0
    out = capsys.readouterr().out
    found = Scheme.from_dict(json.loads((tmp_path / "o" / "scheme.json").read_text()))
    assert found.weights and float(out.strip().splitlines()[-1].split(" = ")[1]) <= 220
    assert cli.main([*base, "--budget", "20KB"]) == 1
    err = capsys.readouterr().err
    assert "smallest feasible" in err and "classifier only" in err and "raise --budget" in err


def test_sram_counts_trained_parameters_and_master_copies():
    model = mobilenet_v2(0.35, n_classes=10)
    plans = {rule: training_plan(model, (1, 3, 64, 64), SCHEMES[1], precision="int8", update_rule=rule) for rule in ("stochastic", "master16", "master32")}
    trained = [(n.inputs[0], plans["stochastic"].graph.values[n.inputs[1]].numel) for n in plans["stochastic"].graph.nodes if n.op == "sgd_update"]
    weights = sum(numel for p, numel in trained if p.endswith(".weight") and not p.startswith("classifier"))
    others = sum(numel for p, numel in trained if not (p.endswith(".weight") and not p.startswith("classifier")))
    assert plans["stochastic"].trained_param_bytes == weights + 4 * others
    for (a, pa), (b, pb) in itertools.pairwise(plans.items()):
        assert pb.trained_param_bytes - pa.trained_param_bytes == 2 * weights, (a, b)


@pytest.mark.slow
def test_tiny_compile_search_end_to_end_with_real_fine_tunes(tmp_path, capsys):
    """Contribution analysis by real (small) fp32 fine-tunes on Fashion-MNIST, then the search."""
    pytest.importorskip("edgewise.data.images").FASHION_MNIST_DIR.exists() or pytest.skip("needs Fashion-MNIST")
    out = tmp_path / "o"
    argv = ["tiny", "compile", "--search", "--resolution", "32", "--budget", "200KB", "--last-blocks", "1",
            "--train-samples", "60", "--val-samples", "100", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split(" = ")[1]) <= 200
    contrib = Contributions.load(out / "contributions.json")
    assert 0.1 <= contrib.baseline <= 1 and len(contrib.weights) == 2 and contrib.depths[0] == 0
    Scheme.from_dict(json.loads((out / "scheme.json").read_text()))
