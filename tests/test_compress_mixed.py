"""Mixed precision under a size budget: the ladders, the knapsack against brute force, the KL probe against the
whole model run through the runtime on a file with the tensor replaced, and whole plans that keep their budget."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from edgewise.cli import main
from edgewise.compress.gguf_write import tensor_bytes, write_gguf
from edgewise.compress.mixed import KLProbe, Rung, choose, ladder, mixed_rungs, predict_kl, size_range
from edgewise.compress import pipeline
from edgewise.compress.pipeline import compress, file_overhead, quantize_tensor, source_weight, tensor_budget, write_mixed
from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFTensor, read_gguf
from edgewise.lm.runtime import LanguageModel
from tests.test_other_llama_gguf import write_tiny

pipeline_measure = pipeline.measure_rungs


@pytest.fixture(scope="module")
def tiny_source(gguf, tmp_path_factory):
    return write_tiny(gguf, tmp_path_factory.mktemp("mixed") / "tiny.gguf", "llama")


def test_ladders_are_the_types_below_the_source(gguf, tiny_source):
    t = gguf.tensors  # SmolLM2-135M: Q4_1 (5 bits per weight), 576 or 1536 columns
    assert ladder(t["blk.0.attn_q.weight"]) == [QT.Q4_0]
    assert ladder(t["blk.0.ffn_down.weight"]) == [QT.Q2_K, QT.Q3_K, QT.Q4_K]
    assert ladder(t["blk.0.attn_norm.weight"]) == []
    tiny = read_gguf(tiny_source).tensors  # 128 columns, an F16 embedding, a Q8_0 head
    assert ladder(tiny["token_embd.weight"]) == [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q8_0]
    assert ladder(tiny["output.weight"]) == [QT.Q4_0, QT.Q4_1, QT.Q5_0]
    assert ladder(tiny["blk.0.attn_q.weight"]) == []  # Q4_0 already: nothing smaller of 32-element blocks


def brute_force(rungs, budget):
    best = None
    for combo in itertools.product(*rungs.values()):
        if sum(r.nbytes for r in combo) <= budget:
            loss = sum(r.kl for r in combo)
            best = loss if best is None else min(best, loss)
    return best


def test_choose_keeps_the_budget_and_finds_the_exhaustive_optimum():
    rng = np.random.default_rng(0)
    for trial in range(200):
        rungs = {}
        for i in range(5):
            sizes = np.sort(rng.choice(np.arange(1, 40), size=rng.integers(1, 5), replace=False))
            kls = np.sort(rng.uniform(0, 1, len(sizes)))[::-1] * rng.uniform(0.1, 10)
            kls[-1] = 0.0 if rng.uniform() < 0.5 else kls[-1]  # a source rung, sometimes
            rungs[f"t{i}"] = [Rung(QT.Q4_0, int(s), kl=float(k)) for s, k in zip(sizes, kls)]
        low = sum(rs[0].nbytes for rs in rungs.values())
        high = sum(rs[-1].nbytes for rs in rungs.values())
        budget = int(rng.integers(low, high + 1))
        pick = choose(rungs, budget)
        assert sum(r.nbytes for r in pick.values()) <= budget
        assert all(pick[n] in rs for n, rs in rungs.items())
        best = brute_force(rungs, budget)
        assert sum(r.kl for r in pick.values()) == pytest.approx(best, abs=1e-12)  # budgets this small: one byte a cell
    # a budget of many cells: each rung rounded up to whole cells, so the plan still fits, and within a cell per tensor
    rungs = {f"t{i}": [Rung(QT.Q4_0, int(rng.integers(10**6, 2 * 10**6)), kl=1.0), Rung(QT.Q8_0, int(rng.integers(3 * 10**6, 4 * 10**6)))] for i in range(300)}
    budget = sum(rs[0].nbytes for rs in rungs.values()) + 150 * 2 * 10**6
    pick = choose(rungs, budget)
    used = sum(r.nbytes for r in pick.values())
    assert used <= budget and sum(r.kl for r in pick.values()) < 300
    # a budget of exactly the smallest rungs, whose bytes round up past the cells: still the smallest plan
    rungs = {f"t{i}": [Rung(QT.Q4_0, 1_000_001 + 7 * i, kl=1.0), Rung(QT.Q8_0, 3_000_000)] for i in range(40)}
    least = sum(rs[0].nbytes for rs in rungs.values())
    pick = choose(rungs, least)
    assert sum(r.nbytes for r in pick.values()) == least
    with pytest.raises(EdgewiseError, match="smallest plan"):
        choose({"a": [Rung(QT.Q4_0, 10), Rung(QT.Q8_0, 20)]}, 9)


def test_predicted_kl_scales_with_the_rounding_error():
    rungs = [Rung(QT.Q2_K, 10, np.zeros(1), proxy=4.0), Rung(QT.Q3_K, 14, np.zeros(1), proxy=1.0), Rung(QT.Q4_1, 20)]
    predict_kl(rungs, 0.2)
    assert [r.kl for r in rungs] == [0.2, 0.05, 0.0]


def kl_by_the_runtime(source, replaced: GGUFTensor, ids, tmp_path) -> float:
    """The reference for `KLProbe.kl`: the tensor written into a GGUF of its own, both files run whole by the
    runtime (fp32), the KL of their next-token distributions."""
    src = read_gguf(source)
    tensors = {n: (t.qtype, tensor_bytes(t.raw, t.shape)) for n, t in src.tensors.items()}
    tensors[replaced.name] = (replaced.qtype, tensor_bytes(replaced.raw, replaced.shape))
    path = write_gguf(src, tmp_path / f"{replaced.name}.gguf", tensors)
    logps = []
    for p in (source, path):
        lm = LanguageModel.load(p, precision="fp32", compile=False)
        logps.append(torch.log_softmax(lm.prefill(ids, lm.new_cache(len(ids)), last_only=False), -1).double())
    ref, got = logps
    return float((ref.exp() * (ref - got)).sum(-1).mean())


@pytest.mark.parametrize("name", ["blk.1.ffn_down.weight", "blk.0.attn_v.weight", "token_embd.weight", "output.weight"])
def test_kl_probe_agrees_with_the_whole_model(tiny_source, tmp_path, name):
    src = read_gguf(tiny_source)
    lm = LanguageModel.load(tiny_source, precision="fp32", compile=False)
    ids = lm.tokenizer.encode("The probe runs one block again and the rest from where it stood. " * 3)[:48]
    probe = KLProbe(src, torch.tensor([ids]))
    t = src.tensors[name]
    assert probe.kl(t) == pytest.approx(0.0, abs=1e-6)  # the source tensor itself changes nothing
    qtype = ladder(t)[0]
    lowered = GGUFTensor(name, qtype, t.shape, quantize_tensor(source_weight(t), qtype, None, "plain"))
    got, want = probe.kl(lowered), kl_by_the_runtime(tiny_source, lowered, ids, tmp_path)
    assert want > 1e-5 and got == pytest.approx(want, rel=1e-3), (got, want)


def test_a_mixed_plan_keeps_its_size_and_spends_it_on_loss(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setattr("edgewise.compress.calibrate.MIN_CALIB_TOKENS", 256)  # the tiny model's context is 256
    measured = []
    monkeypatch.setattr(pipeline, "measure_rungs", lambda *a, **k: measured.append(pipeline_measure(*a, **k)) or measured[-1])
    src = read_gguf(tiny_source)
    low, high = size_range(src)
    overhead = file_overhead(src)
    results = {}
    for share in (0.5, 0.1, 0.9):
        size = int(overhead + low + share * (high - low))
        out = tmp_path / f"mixed-{share}.gguf"
        if share == 0.5:  # the whole command once; the other sizes from the same measurements
            plans = compress(tiny_source, out, size=size, calib="shakespeare", calib_tokens=512, ctx=256, rounding="gptq", sensitivity_tokens=256).plans
        else:
            plans = write_mixed(src, out, measured[0], tensor_budget(src, size=size))
        assert out.stat().st_size <= size, (share, out.stat().st_size, size)
        got = read_gguf(out)
        for p in plans:
            assert got.tensors[p.name].qtype == p.target and got.tensors[p.name].nbytes == p.target_bytes
        results[share] = (sum(p.kl or 0.0 for p in plans), out.stat().st_size, plans)
        lm = LanguageModel.load(out, compile=False)
        assert torch.isfinite(lm.prefill([1, 2, 3], lm.new_cache(8))).all()
    kl = [results[s][0] for s in (0.1, 0.5, 0.9)]
    assert kl[0] > kl[1] > kl[2] > 0, kl  # more bytes, less predicted loss
    assert results[0.9][1] > results[0.1][1]
    types = {p.target for p in results[0.5][2] if len(p.shape) == 2}
    assert len(types) >= 3, types  # a mix, not one type


def test_sizes_out_of_reach_say_the_range(gguf, tiny_source, tmp_path, capsys):
    low, high = size_range(gguf)
    n = sum(int(np.prod(t.shape)) for t in gguf.tensors.values())
    assert 4.0 < 8 * low / n < 4.3 and 8 * high / n == pytest.approx(5.74, abs=0.01)  # SmolLM2: 576-wide rows reach no lower
    with pytest.raises(EdgewiseError, match=r"--bpw 3.5 is out of range: reachable from .*--bpw 4\.1\d\d to 5\.7\d\d"):
        tensor_budget(gguf, bpw=3.5)
    assert tensor_budget(gguf, bpw=4.5) == int(4.5 * n / 8)
    assert main(["compress", str(tiny_source), str(tmp_path / "o.gguf"), "--size", "1MB"]) == 1
    err = capsys.readouterr().err
    assert "--size 1.00MB is out of range" in err and "reachable from tiny.gguf: --size" in err
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_source), str(tmp_path / "o.gguf"), "--size", "20MB", "--type", "Q4_0"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["compress", str(tiny_source), str(tmp_path / "o.gguf"), "--bpw", "4", "--calib", "none"]) == 1
    assert "measures each tensor's sensitivity on calibration text" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()


def test_mixed_rungs_end_with_the_source(tiny_source):
    src = read_gguf(tiny_source)
    rungs = mixed_rungs(src)
    for name, rs in rungs.items():
        assert rs[-1].is_source and rs[-1].qtype == src.tensors[name].qtype and rs[-1].nbytes == src.tensors[name].nbytes
        assert [r.nbytes for r in rs] == sorted(r.nbytes for r in rs)


def test_an_interrupted_measurement_resumes_to_the_same_file(tiny_source, tmp_path, monkeypatch):
    """A mixed compress stopped while rounding, then while probing, resumes from `OUT.rungs` (each tensor rounded
    and probed once in all) and writes the file an uninterrupted run writes, byte for byte."""
    monkeypatch.setattr("edgewise.compress.calibrate.MIN_CALIB_TOKENS", 256)
    src = read_gguf(tiny_source)
    low, high = size_range(src)
    size = int(file_overhead(src) + low + 0.5 * (high - low))
    kw = dict(size=size, calib="shakespeare", calib_tokens=512, ctx=256, rounding="gptq", sensitivity_tokens=256)
    whole = compress(tiny_source, tmp_path / "whole.gguf", **kw)
    assert not (tmp_path / "whole.gguf.rungs").exists()  # removed once the file is written

    rounded, probed = [], []
    real_quantize, real_kl = pipeline.quantize_tensor, KLProbe.kl

    def stop_after(calls, limit, real):
        def wrapped(*a, **k):
            if len(calls) == limit:
                raise KeyboardInterrupt
            calls.append(1)
            return real(*a, **k)
        return wrapped

    out, store = tmp_path / "resumed.gguf", tmp_path / "resumed.gguf.rungs"
    n_rounded = sum(len(rs) - 1 for rs in mixed_rungs(src).values())
    n_probed = sum(len(rs) > 1 for rs in mixed_rungs(src).values())
    monkeypatch.setattr(pipeline, "quantize_tensor", stop_after(rounded, n_rounded // 2, real_quantize))
    with pytest.raises(KeyboardInterrupt):
        compress(tiny_source, out, **kw)
    assert not out.exists() and len(list(store.glob("*.safetensors"))) > 0
    monkeypatch.setattr(pipeline, "quantize_tensor", stop_after(rounded, n_rounded + 10, real_quantize))
    monkeypatch.setattr(KLProbe, "kl", stop_after(probed, n_probed // 2, real_kl))
    with pytest.raises(KeyboardInterrupt):
        compress(tiny_source, out, **kw)
    assert not out.exists() and len(rounded) <= n_rounded + 2  # stored tensors are not rounded again (a tensor's rungs: at most 2 redone)
    # the store is refused for another calibration, and a damaged file in it is named (on a copy: this one resumes below)
    with pytest.raises(EdgewiseError, match=r"resumed\.gguf\.rungs: rungs measured for another run .*delete the folder"):
        compress(tiny_source, out, **{**kw, "calib_tokens": 768})
    shutil.copytree(store, tmp_path / "other.gguf.rungs")
    damaged = sorted((tmp_path / "other.gguf.rungs").glob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(EdgewiseError, match=rf"{damaged.name}: unreadable stored rungs .*delete it"):
        compress(tiny_source, tmp_path / "other.gguf", **kw)
    assert not (tmp_path / "other.gguf").exists()
    monkeypatch.setattr(KLProbe, "kl", stop_after(probed, n_probed + 10, real_kl))
    resumed = compress(tiny_source, out, **kw)
    assert len(probed) == n_probed  # each tensor probed once in all
    assert out.read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    assert [p.kl for p in resumed.plans] == [p.kl for p in whole.plans]
    assert not store.exists()


def test_a_store_with_damaged_json_is_refused(tmp_path):
    from edgewise.compress.mixed import RungStore

    store = RungStore(tmp_path / "s.rungs", {"source": "a"})
    assert not store.started
    store.save_kl("blk.0.attn_q.weight", 0.5)
    assert RungStore(tmp_path / "s.rungs", {"source": "a"}).kls == {"blk.0.attn_q.weight": 0.5}
    (tmp_path / "s.rungs" / "kl.json").write_text("{not json")
    with pytest.raises(EdgewiseError, match=r"kl\.json: unreadable \(not JSON\); delete it"):
        RungStore(tmp_path / "s.rungs", {"source": "a"})
    (tmp_path / "s.rungs" / "identity.json").write_text("garbage")
    with pytest.raises(EdgewiseError, match=r"s\.rungs: rungs measured for another run"):
        RungStore(tmp_path / "s.rungs", {"source": "a"})
