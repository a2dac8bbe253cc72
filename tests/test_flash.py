"""Flash inference: bundle layout against the GGUF, the FFN kernel against torch, the unit cache's
invariants, the engine's reads and counters, oracle exactness against the dense model, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgewise.errors import EdgewiseError
from edgewise.flash.cache import UnitCache
from edgewise.flash.convert import ConvertOptions, convert
from edgewise.flash.engine import ffn_over_units, ffn_over_units_reference
from edgewise.flash.predictor import fit_predictor, order_neurons
from edgewise.flash.runtime import FlashLanguageModel
from edgewise.flash.store import BundleLayout, FlashStore, join_down, pack_layer, split_down, unpack_layer
from edgewise.gguf_io import read_gguf
from edgewise.lm.runtime import LanguageModel
from edgewise.lm.weights import dequantize
from edgewise.models import resolve_model

PROMPT = "Once upon a time, in a village by the sea,"


@pytest.fixture(scope="module")
def gguf():
    return read_gguf(resolve_model(None))


@pytest.fixture(scope="module")
def layout(gguf):
    d_ff, d = gguf.tensor("blk.0.ffn_down.weight").shape[1], gguf.tensor("blk.0.ffn_down.weight").shape[0]
    return BundleLayout.for_dims(d, d_ff)


def _layer(gguf, i):
    t = lambda name: np.asarray(gguf.tensor(f"blk.{i}.{name}.weight").raw)  # noqa: E731
    return t("ffn_gate"), t("ffn_up"), t("ffn_down")


def test_layout_fits_4k_units(layout):
    assert layout.unit_bytes % 4096 == 0
    assert layout.bundles_per_unit * (layout.bundle_bytes + 4) <= layout.unit_bytes
    assert layout.n_slots >= layout.d_ff


def test_bundles_round_trip_against_gguf(gguf, layout):
    gate, up, down = _layer(gguf, 3)
    columns, d, m = split_down(down, layout.d_model, layout.d_ff)
    assert np.array_equal(join_down(columns, d, m), down)  # down columns + resident scales == the GGUF's bytes
    rng = np.random.default_rng(0)
    order = np.full(layout.n_slots, -1, np.int32)
    order[rng.permutation(layout.n_slots)[: layout.d_ff]] = rng.permutation(layout.d_ff)
    units = pack_layer(layout, gate, up, columns, order)
    g2, u2, c2, ids = unpack_layer(layout, units)
    assert np.array_equal(g2, gate) and np.array_equal(u2, up) and np.array_equal(c2, columns) and np.array_equal(ids, order)
    # and the dequantized down column i is column i of the GGUF's down matrix
    w_down = dequantize(gguf.tensor("blk.3.ffn_down.weight"))
    col = torch.from_numpy(np.concatenate([columns[7].reshape(-1, 16) & 15, columns[7].reshape(-1, 16) >> 4], axis=1).reshape(-1).astype(np.float32))
    assert torch.equal(col * torch.from_numpy(d[0].astype(np.float32)) + torch.from_numpy(m[0].astype(np.float32)), w_down[:, 7])


def _filled_cache(gguf, layout, layer, n_live, seed=0):
    gate, up, down = _layer(gguf, layer)
    columns, d, m = split_down(down, layout.d_model, layout.d_ff)
    order = np.full(layout.n_slots, -1, np.int32)
    order[: layout.d_ff] = np.arange(layout.d_ff)
    units = pack_layer(layout, gate, up, columns, order)
    cache = UnitCache(layout.n_units, layout.n_units, layout.unit_bytes)
    chosen = np.random.default_rng(seed).permutation(layout.n_units)[:n_live]
    first = cache.append(chosen, 0)
    cache.units[first : first + n_live] = units[chosen]
    return cache, chosen, torch.from_numpy(d), torch.from_numpy(m)


def test_ffn_kernel_matches_torch_and_dense(gguf, layout):
    torch.manual_seed(0)
    x = torch.randn(1, layout.d_model)
    cache, chosen, d, m = _filled_cache(gguf, layout, 5, 100)
    ref = ffn_over_units_reference(x, cache.tensor, cache.size, layout.bundles_per_unit, d, m)
    out = ffn_over_units(x, cache.tensor, cache.size, layout.bundles_per_unit, d, m)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # all units: the dense fp32 FFN from the GGUF's dequantized weights
    full, _, d, m = _filled_cache(gguf, layout, 5, layout.n_units)
    w = {name: dequantize(gguf.tensor(f"blk.5.{name}.weight")) for name in ("ffn_gate", "ffn_up", "ffn_down")}
    dense = (F.silu(x @ w["ffn_gate"].T) * (x @ w["ffn_up"].T)) @ w["ffn_down"].T
    out = ffn_over_units(x, full.tensor, full.size, layout.bundles_per_unit, d, m)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())


def test_unit_cache_swap_delete_invariants(layout):
    rng = np.random.default_rng(1)
    cache = UnitCache(layout.n_units, 64, layout.unit_bytes)
    for step in range(200):
        absent = np.nonzero(cache.slot_of < 0)[0]
        new = rng.choice(absent, size=min(int(rng.integers(0, 12)), cache.free), replace=False)
        first = cache.append(new, step)
        cache.units[first : first + len(new), :8] = new[:, None].astype("<i8").view(np.uint8)  # tag each unit's bytes
        if cache.size:
            cache.delete(rng.choice(cache.size, size=int(rng.integers(0, cache.size + 1)), replace=False))
        cache.check()
        tags = cache.units[: cache.size, :8].copy().view("<i8")[:, 0]
        assert np.array_equal(tags, cache.unit_at[: cache.size]), "bytes moved with their unit"
    with pytest.raises(EdgewiseError, match="overflow"):
        cache.append(np.nonzero(cache.slot_of < 0)[0][: cache.free + 1], 0)


def test_predictor_fit_recovers_a_low_rank_map():
    torch.manual_seed(0)
    x = torch.randn(2048, 64)
    true = torch.randn(8, 64) / 8
    mix = torch.randn(256, 8)
    target = x @ true.T @ mix.T + 3.0  # an exactly rank-8 affine map: reduced-rank regression recovers it
    pred = fit_predictor(x, target, 8, ridge=0.0)
    torch.testing.assert_close(pred.scores(x), target, rtol=1e-3, atol=1e-3)
    whole = fit_predictor(x, target, 8, ridge=0.0, chunk=len(x))  # the moments summed in one piece: the same fit
    torch.testing.assert_close(whole.scores(x), pred.scores(x), rtol=1e-5, atol=1e-5)
    order = order_neurons(target.abs(), 4)
    assert sorted(order[order >= 0].tolist()) == list(range(256))


# -- a real (small-calibration) store of the default model ----------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("flash") / "store"
    convert(path, options=ConvertOptions(calibration_tokens=512, eval_tokens=256, ctx=128, fractions=(0.5,)))
    return path


def test_store_manifest_and_layers(store, gguf, layout):
    s = FlashStore.open(store)
    manifest = s.manifest
    assert manifest["ffn_file"]["n_units"] == layout.n_units and len(manifest["predictor"]["sweep"]) == 2
    assert all(0 <= q["recall"] <= 1 for q in manifest["predictor"]["quality"])
    half = manifest["predictor"]["sweep"][0]
    assert 0.5 < half["recall"] < 1 and 0.5 < half["precision"] < 1  # better than chance, short of perfect
    resident = s.resident()
    order = resident["flash.blk.2.order"]
    with open(s.ffn_path, "rb") as f:
        f.seek(s.layer_offset(2))
        units = np.frombuffer(f.read(layout.layer_bytes), np.uint8).reshape(layout.n_units, layout.unit_bytes)
    gate, up, columns, ids = unpack_layer(layout, units)
    g_ref, u_ref, down = _layer(gguf, 2)
    assert np.array_equal(ids, order) and np.array_equal(gate, g_ref) and np.array_equal(up, u_ref)
    assert np.array_equal(join_down(columns, resident["flash.blk.2.down_d"], resident["flash.blk.2.down_m"]), down)


def test_engine_perplexity_matches_the_convert_time_simulation(store):
    """With window 1 the cache holds exactly the active set: the engine's perplexity on the held-out
    calibration tokens is the one the operating point was chosen from (fitted predictors read back intact)."""
    from edgewise.data.text import load_text
    from edgewise.metrics.perplexity import perplexity

    manifest = FlashStore.open(store, verify=False).manifest["predictor"]
    point = next(s for s in manifest["sweep"] if s["fraction"] < 1)
    lm = FlashLanguageModel.open(store, dram_budget="100%", active_fraction=point["fraction"], window=1, reads="unit", precision="fp32", verify=False)
    n_calib, n_eval = manifest["calibration_tokens"], manifest["eval_tokens"]
    ids = lm.tokenizer.encode(load_text(manifest["corpus"])[: 12 * (n_calib + n_eval)])[n_calib : n_calib + n_eval]
    got = perplexity(lambda w: lm.prefill(w, lm.new_cache(len(w)), last_only=False), ids, manifest["ctx"]).ppl
    assert got == pytest.approx(point["ppl"], rel=2e-3)


def test_oracle_all_units_equals_dense_token_for_token(store):
    dense = LanguageModel.load(precision="fp32", compile=False)
    ids = dense.tokenizer.encode(PROMPT)
    want = list(dense.generate(ids, 24, stop_at_eot=False))
    lm = FlashLanguageModel.open(store, dram_budget="100%", precision="fp32")
    lm.engine.oracle_all = True
    assert list(lm.generate(ids, 24, stop_at_eot=False)) == want


def test_engine_reads_counts_and_cache(store, layout):
    lm = FlashLanguageModel.open(store, dram_budget="60%", active_fraction=0.4, window=2, reads="unit")
    ids = lm.tokenizer.encode(PROMPT)
    list(lm.generate(ids, 6, stop_at_eot=False))
    k = lm.engine.k_units[0]
    n_layers = lm.engine.store.n_layers
    for t in lm.flash_stats.tokens:
        assert t.hits + t.misses == k * n_layers
        assert t.bytes_read == t.misses * layout.unit_bytes and t.reads == t.misses  # one aligned read per missing unit
    assert lm.engine.reader.direct, "O_DIRECT works on this disk"
    for cache in lm.engine.caches:
        cache.check()
        assert cache.size <= lm.engine.capacity
    naive = FlashLanguageModel.open(store, mode="naive")
    list(naive.generate(ids, 3, stop_at_eot=False))
    assert naive.flash_stats.per_token("bytes_read") == n_layers * layout.layer_bytes
    # coalesced reads: every missing unit arrives, in fewer reads than units (gaps may come along)
    lm2 = FlashLanguageModel.open(store, dram_budget="60%", active_fraction=0.4, window=2, reads="cost")
    list(lm2.generate(ids, 6, stop_at_eot=False))
    stats = lm2.flash_stats
    assert stats.total("reads") < stats.total("misses") <= stats.total("bytes_read") / layout.unit_bytes
    for cache in lm2.engine.caches:
        cache.check()


def test_bad_stores_get_clear_errors(store, tmp_path):
    with pytest.raises(EdgewiseError, match="no such flash store"):
        FlashStore.open(tmp_path / "missing")
    bad = tmp_path / "copy"
    shutil.copytree(store, bad)
    with pytest.raises(EdgewiseError, match="cannot hold one token's active set.*at least"):
        FlashLanguageModel.open(bad, dram_budget="1MB", verify=False)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(EdgewiseError, match="version 99"):
        FlashStore.open(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(EdgewiseError, match="manifest.json: unreadable manifest"):
        FlashStore.open(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    resident = (bad / "resident.safetensors").read_bytes()
    (bad / "resident.safetensors").write_bytes(resident[:1000])
    with pytest.raises(EdgewiseError, match="resident.safetensors: unreadable resident weights"):
        FlashStore.open(bad, verify=False).resident()
    (bad / "resident.safetensors").write_bytes(resident)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(EdgewiseError, match="made from"):
        FlashStore.open(bad, model=other)
    with open(bad / "ffn.bin", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EdgewiseError, match="layer 0 checksum mismatch"):
        FlashStore.open(bad)
    with open(bad / "ffn.bin", "r+b") as f:
        f.truncate(4096 * 10)
    with pytest.raises(EdgewiseError, match="truncated"):
        FlashStore.open(bad)


def test_cli_generate_and_errors(store, capsys):
    from edgewise.cli import main

    assert main(["generate", "--flash", str(store), "--dram-budget", "60%", "--active-fraction", "0.4", "--max-tokens", "4", PROMPT]) == 0
    assert "MB/token" in capsys.readouterr().err
    assert main(["generate", "--flash", str(store / "nope"), "hello"]) == 1
    assert "no such flash store" in capsys.readouterr().err
