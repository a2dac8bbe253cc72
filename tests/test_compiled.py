"""The AOTInductor decode step: same tokens as eager, cached on disk, weights shared, eager fallback."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from edgewise.lm import compiled as compiled_module
from edgewise.lm.model import causal_mask
from edgewise.lm.runtime import LanguageModel

PROMPT = "The old lighthouse keeper climbed the stairs one last time, and"


@pytest.fixture(scope="module")
def compiled_lm(model_path, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("aoti")
    lm = LanguageModel.load(model_path, precision="quant", compile=True, cache_dir=cache_dir, wait_for_compile=True)
    assert lm.decoder is not None, "AOTInductor compile failed on this machine"
    return lm, cache_dir


def test_compiled_step_equals_eager_exactly_in_fp32(gguf, tmp_path):
    """The compiled graph computes what eager does: fp32 weights and activations, a 4-layer cut of the
    model (compiles in seconds), from position 0 (the L = 2 masked case) on."""
    from dataclasses import replace

    from edgewise.lm.model import Llama

    full = Llama.from_gguf(gguf, "fp32")
    cfg = replace(full.cfg, n_layers=4)
    small = Llama(cfg, "fp32", full.embedding, list(full.blocks[:4]), full.norm, full.output).eval()
    decoder, _ = compiled_module.load_or_compile(small, tmp_path)
    assert decoder is not None
    eager_cache, compiled_cache = small.new_cache(16), small.new_cache(16)
    for position, token in enumerate([1, 504, 3575, 2251, 28, 957, 314, 260, 4447, 30]):
        args = (torch.tensor([token]), torch.tensor([position]), causal_mask(position, 1, max(position + 1, 2)))
        with torch.no_grad():
            eager = small(*args, eager_cache.keys, eager_cache.values)
        fast = decoder(*args, compiled_cache.keys, compiled_cache.values)
        torch.testing.assert_close(fast, eager, atol=1e-3, rtol=1e-5)
    for a, b in zip(eager_cache.keys + eager_cache.values, compiled_cache.keys + compiled_cache.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_quantized_decode_tracks_eager(compiled_lm):
    """The product path, teacher-forced over 40 steps: both see the same tokens. Fused kernels sum in another
    order and the native kernels round activations per block (to int8 in gate|up and the attention
    output, see model.ACT_BITS), so a last-bit difference can flip a rounding. Measured: max |dlogit|
    0.82, top-1 equal at 39 of 40 (all-int16: 0.057 and 40 of 40)."""
    lm, _ = compiled_lm
    ids = lm.tokenizer.encode(PROMPT)
    eager_cache, compiled_cache = lm.new_cache(64), lm.new_cache(64)
    decoder = lm.decoder
    token, worst, agree = ids[0], 0.0, 0
    for position in range(40):
        lm.decoder = None
        eager = lm.decode(token, position, eager_cache)
        lm.decoder = decoder
        fast = lm.decode(token, position, compiled_cache)
        worst = max(worst, (eager - fast).abs().max().item())
        agree += int(eager.argmax() == fast.argmax())
        token = ids[position + 1] if position + 1 < len(ids) else int(eager.argmax())
    print(f"compiled vs eager (quant): max |dlogit| {worst:.3f}; top-1 agreement {agree}/40")
    assert worst < 2.0
    assert agree >= 36


def test_second_load_reuses_the_cached_package(compiled_lm, model_path):
    _, cache_dir = compiled_lm
    again = LanguageModel.load(model_path, precision="quant", compile=True, cache_dir=cache_dir)
    assert again.decoder is not None and again.compile_s == 0.0
    assert len(list(cache_dir.glob("decode-*.pt2"))) == 1
    assert not list(cache_dir.glob(".tmp-*"))  # nothing half-written left behind


def test_compile_failure_falls_back_to_eager(model_path, tmp_path, monkeypatch):
    def broken(model, path):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_module, "compile_decode_step", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = LanguageModel.load(model_path, precision="quant", compile=True, cache_dir=tmp_path, wait_for_compile=True)
    assert lm.decoder is None
    assert any("decoding eagerly" in str(w.message) for w in caught)
    assert len(list(lm.generate(lm.tokenizer.encode("Hello"), 4, stop_at_eot=False))) == 4


def test_package_key_covers_activation_rounding(lm_quant):
    """act_bits is baked into the compiled graph, so a model loaded with other rounding needs its own package."""
    model = lm_quant.model
    layer = model.blocks[0].ffn.down
    if not hasattr(layer, "act_bits"):
        pytest.skip("native kernels not built on this CPU")
    before = compiled_module.package_key(model)
    layer.act_bits = 24 - layer.act_bits  # 8 <-> 16
    try:
        assert compiled_module.package_key(model) != before
    finally:
        layer.act_bits = 24 - layer.act_bits
    assert compiled_module.package_key(model) == before


def _fake_child(monkeypatch, script: str):
    """Stand in for the background compile's child: a short Python script run with (package, source)."""
    import subprocess
    import sys

    real = subprocess.Popen

    def popen(cmd, **kwargs):
        return real([sys.executable, "-c", script, cmd[-1]], **{k: v for k, v in kwargs.items() if k != "preexec_fn"})

    monkeypatch.setattr(compiled_module.subprocess, "Popen", popen)


def test_first_run_decodes_eagerly_then_switches_to_the_compiled_step(compiled_lm, model_path, tmp_path, monkeypatch):
    """No package: the first token comes at once (eager), the step compiles in a child process, and
    the same run switches to it when it lands. The child here copies the package the fixture compiled
    (a real compile is the fixture's: same code path, minutes)."""
    lm_ref, cache_dir = compiled_lm
    package = next(cache_dir.glob("decode-*.pt2"))
    _fake_child(monkeypatch, f"import os, shutil, sys, time; time.sleep(1.0); shutil.copy({str(package)!r}, sys.argv[1] + '.part'); os.replace(sys.argv[1] + '.part', sys.argv[1])")
    lm = LanguageModel.load(model_path, precision="quant", compile=True, cache_dir=tmp_path)
    assert lm.decoder is None and lm.background is not None
    ids = lm.tokenizer.encode(PROMPT)
    first = list(lm.generate(ids, 8, stop_at_eot=False))  # eager, at once
    assert lm.decoder is None or lm.background is None
    deadline = time.monotonic() + 120
    while lm.decoder is None and time.monotonic() < deadline:
        list(lm.generate(ids, 16, stop_at_eot=False))
    assert lm.decoder is not None, "the run never switched to the compiled step"
    assert list(lm.generate(ids, 8, stop_at_eot=False))[:4] == first[:4]


def test_background_compile_failure_is_one_warning(model_path, tmp_path, monkeypatch):
    _fake_child(monkeypatch, "import sys; sys.exit(3)")
    lm = LanguageModel.load(model_path, precision="quant", compile=True, cache_dir=tmp_path)
    lm.background.proc.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            lm.background and setattr(lm.background, "_next_poll", 0.0)
            assert len(list(lm.generate(lm.tokenizer.encode("Hello"), 4, stop_at_eot=False))) == 4
    messages = [str(w.message) for w in caught if "background compile failed" in str(w.message)]
    assert len(messages) == 1 and "decoding eagerly" in messages[0] and "exit 3" in messages[0]
    assert lm.decoder is None and lm.background is None
