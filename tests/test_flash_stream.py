"""Dense streaming (`edgewise.flash.stream`, `StreamingLanguageModel`): token for token the dense model's output;
the prefetch ring never hands out a buffer before its read completed, and what it hands out are the file's
bytes; a pass that ends early restarts the ring; runs are page-aligned and cover every streamed tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgewise.errors import EdgewiseError
from edgewise.flash.io import PAGE, DirectReader
from edgewise.flash.residency import model_parts, plan_residency
from edgewise.flash.runtime import StreamingLanguageModel
from edgewise.flash.stream import PrefetchRing, layer_reads
from edgewise.gguf_io import read_gguf
from edgewise.lm.runtime import LanguageModel
from edgewise.models import resolve_model

PROMPT = "Once upon a time, in a village by the sea,"


@pytest.fixture(scope="module")
def gguf():
    return read_gguf(resolve_model(None))


def _plan(gguf, share: float):
    parts = model_parts(gguf)
    return plan_residency(parts, int(share * sum(p.nbytes for p in parts)))


def test_runs_are_aligned_and_cover_every_streamed_tensor(gguf):
    plan = _plan(gguf, 0.6)
    sizes = (64 << 10, 256 << 10)
    reads = layer_reads(gguf, plan, read_sizes=sizes)
    streamed = {p.name for p in plan.streamed if p.layer >= 0}
    assert streamed and {t.name for r in reads.values() for t, _ in r.tensors.values()} == streamed
    for r in reads.values():
        assert set(r.runs) == set(sizes)
        for size, runs in r.runs.items():
            assert (runs % PAGE == 0).all() and (runs[:, 1] <= size).all() and runs[:, 1].sum() == r.nbytes
            covered = np.zeros(r.nbytes, dtype=bool)
            for _, n, at in runs:
                covered[at : at + n] = True
            assert all(covered[at : at + t.nbytes].all() for t, at in r.tensors.values())  # the bytes themselves: the ring test
    with pytest.raises(EdgewiseError, match="multiples of 4096"):
        layer_reads(gguf, plan, read_sizes=(1000,))


def test_the_ring_hands_out_only_completed_reads_of_the_right_bytes(gguf):
    reads = layer_reads(gguf, _plan(gguf, 0.55), read_sizes=(64 << 10, 1 << 20))
    with DirectReader(gguf.path, threads=4) as reader:
        ring = PrefetchRing(reader, reads, depth=3, record=True)
        try:
            for _ in range(3):  # three forward passes over the streamed layers
                for layer in ring.order:
                    buffer = ring.acquire(layer)
                    for t, at in reads[layer].tensors.values():
                        assert np.array_equal(buffer[at : at + t.nbytes].numpy(), np.asarray(t.raw).reshape(-1)), t.name
                    ring.release(layer)
            ring.acquire(ring.order[2])  # a pass cut short: the ring restarts where the compute now is
            ring.release(ring.order[2])
            buffer = ring.acquire(ring.order[3])
            t, at = next(iter(reads[ring.order[3]].tensors.values()))
            assert np.array_equal(buffer[at : at + t.nbytes].numpy(), np.asarray(t.raw).reshape(-1))
            ring.release(ring.order[3])
        finally:
            ring.close()
    events = ring.stats.events
    assert len(events) == 3 * len(ring.order) + 2 and all(handed_out >= done for _, _, done, handed_out in events)
    assert ring.stats.restarts == 1 and ring.stats.reads >= len(events)
    assert set(ring.stats.by_size) == {64 << 10, 1 << 20}  # both read sizes were tried, and both gave the right bytes
    assert "64 KiB" in ring.read_size_line() and "1 MiB" in ring.read_size_line()
    with pytest.raises(EdgewiseError, match="streams nothing"):
        ring.acquire(10_000)


def test_streaming_equals_the_dense_model_token_for_token():
    dense = LanguageModel.load(compile=False)
    ids = dense.tokenizer.encode(PROMPT)
    want = list(dense.generate(ids, 12, stop_at_eot=False))
    lm = StreamingLanguageModel.open(budget="60%", record=True)
    assert lm.plan.streamed and lm.plan.dram_bytes <= lm.plan.budget_bytes
    assert list(lm.generate(ids, 12, stop_at_eot=False)) == want
    assert lm.ring.stats.bytes_read >= 12 * lm.plan.bytes_per_token * 0.99  # every streamed byte, every token
    free = lm.governor.free_threads  # the hold-back trial ran passes on one CPU fewer, and the tokens are the same
    if free >= 2:
        assert {(1, free), (1, free - 1)} <= set(lm.governor.hold_back.trial.costs)
        assert lm.last_stats.min_threads <= free - 1
    with pytest.raises(EdgewiseError, match="below this model's resident minimum"):
        StreamingLanguageModel.open(budget="1MB")


@pytest.mark.slow
def test_streaming_the_1_5b_model_equals_its_dense_self():
    model = "qwen2.5-coder-1.5b"
    dense = LanguageModel.load(model, compile=False)
    ids = dense.tokenizer.encode("def fibonacci(n):\n")
    want = list(dense.generate(ids, 16, stop_at_eot=False))
    del dense
    lm = StreamingLanguageModel.open(model, budget="600MB")
    assert list(lm.generate(ids, 16, stop_at_eot=False)) == want
    assert torch.get_num_threads() >= 1


def test_exiting_while_the_ring_reads_ahead_is_clean():
    """The reader thread reads ahead of the compute; a process that ends there must not abort (the native
    reader's threads torn down under a read: `terminate called without an active exception`, exit 134)."""
    import subprocess
    import sys

    script = (
        "from edgewise.flash.runtime import StreamingLanguageModel\n"
        "lm = StreamingLanguageModel.open(budget='60%')\n"
        "print(list(lm.generate(lm.tokenizer.encode('Hello'), 3, stop_at_eot=False)))\n"
    )
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    with StreamingLanguageModel.open(budget="60%") as lm:
        list(lm.generate(lm.tokenizer.encode("Hello"), 2, stop_at_eot=False))
    assert lm.ring._thread is None and lm.ring.reader.fd == -1
    lm.close()  # twice is fine


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_result():
    """Chunks of `prefill_chunk` tokens bound the activations' memory; the cache they fill and the logits they give
    agree with a one-shot prefill to float rounding (the rows are grouped into kernel tiles differently)."""
    lm = StreamingLanguageModel.open(budget="60%")
    ids = lm.tokenizer.encode(PROMPT * 20)[:150]
    whole, chunked = lm.new_cache(160), lm.new_cache(160)
    lm.prefill_chunk = 1000
    want = lm.prefill(ids, whole, last_only=False)
    lm.prefill_chunk = 64
    passes_before = lm.ring.stats.reads
    got = lm.prefill(ids, chunked, last_only=False)
    assert got.shape == want.shape == (150, lm.cfg.vocab_size)
    assert lm.ring.stats.reads - passes_before >= 3 * len(lm.ring.order) - lm.ring.depth  # three passes: 64 + 64 + 22 tokens
    scale = want.abs().max()
    assert (got - want).abs().max() < 1e-3 * scale and torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.allclose(chunked.keys[0][:, :150].float(), whole.keys[0][:, :150].float(), atol=1e-2 * whole.keys[0].float().abs().max())
    lm.close()


def test_the_cli_streams_a_gguf_under_a_budget(capsys):
    from edgewise.cli import main

    prompt = "One, two, three, four, one, two,"
    assert main(["generate", "--no-compile", "--max-tokens", "12", prompt]) == 0
    dense = capsys.readouterr().out
    assert main(["generate", "--stream-budget", "60%", "--speculate", "3", "--max-tokens", "12", prompt]) == 0
    out = capsys.readouterr()
    assert out.out == dense  # the dense model's text, drafts or not
    assert "streaming: " in out.err and "MB read per token" in out.err and "I/O wait" in out.err and "speculation:" in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--stream-budget", "lots", "hi"], "--stream-budget 'lots': expected a size like 256KB"),
        (["generate", "--stream-budget", "50%", "--flash", "store", "hi"], "--flash (a converted store) and --stream-budget"),
        (["generate", "--stream-budget", "1MB", "hi"], "below this model's resident minimum"),
    ],
)
def test_bad_stream_budgets_are_one_line_errors(capsys, argv, message):
    from edgewise.cli import main

    assert main(argv) != 0
    assert message in capsys.readouterr().err
