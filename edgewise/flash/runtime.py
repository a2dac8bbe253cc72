"""A language model whose FFN weights stay on flash: the runtime's `LanguageModel` with every
block's FFN replaced by the flash engine's.

    lm = FlashLanguageModel.open("smollm2.flash", dram_budget="50%")
    for piece in lm.stream("Once upon a time", max_new_tokens=64):
        print(piece, end="")
    print(lm.last_stats.line(), lm.flash_stats.line())

Decoding is eager (the engine's reads and cache updates are Python between kernels). The
resident part (embeddings, attention, norms, predictors, down scales) uses the runtime's
quantized kernels, as the dense model does.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from edgewise.flash.engine import FlashEngine, FlashStats, Mode, Reads
from edgewise.flash.store import FlashStore
from edgewise.lm.model import Llama
from edgewise.lm.runtime import LanguageModel, Sampler, _check_omp_wait_policy
from edgewise.lm.speculative import PromptLookup
from edgewise.lm.weights import Precision


class FlashLanguageModel(LanguageModel):
    def __init__(self, *args, engine: FlashEngine, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = engine
        self.flash_stats = FlashStats()

    @classmethod
    def open(
        cls,
        store: str | os.PathLike,
        dram_budget: str | int = "50%",
        model: str | os.PathLike | None = None,
        mode: Mode = "flash",
        window: int = 4,
        reads: Reads = "cost",
        active_fraction: float | None = None,
        threads: int | None = None,
        verify: bool = True,
        precision: Precision = "quant",
        progress: Callable[[int, int], None] | None = None,
    ) -> "FlashLanguageModel":
        """Open a flash store; `model`, when given, must be the GGUF the store was made from.
        `precision` is the resident part's (attention, output); the FFN is always fp32 math on the Q4_1 bundles."""
        _check_omp_wait_policy()
        flash_store = FlashStore.open(store, verify=verify, model=model)
        resident = flash_store.resident()
        gguf = flash_store.gguf_view(resident)
        engine = FlashEngine(flash_store, resident, dram_budget, mode, window, reads, active_fraction, threads)
        decoder = Llama.from_gguf(gguf, precision, progress=progress, ffn_of_layer=engine.layer)
        return cls.assemble(Path(store), gguf, decoder, engine=engine)

    def generate(self, ids: list[int], max_new_tokens: int, sampler: Sampler | None = None, stop_at_eot: bool = True,
                 lookup: PromptLookup | None = None) -> Iterator[int]:
        """As `LanguageModel.generate`; `self.flash_stats` then counts the decode steps only (not the prompt)."""
        self.engine.reset()
        prompt_tokens = len(ids)
        try:
            yield from super().generate(ids, max_new_tokens, sampler, stop_at_eot, lookup)
        finally:
            self.flash_stats = FlashStats(self.engine.stats.tokens[prompt_tokens:])


# logits per scoring chunk (prefill_chunks), in rows rounded down to a multiple of 16 (at least 16): 16 rows of a 152k
# vocabulary (9.7 MB), 32 of a 49k one. The kernels' float sums depend on how rows are grouped into tiles (only up to
# blocks.h EXACT_ROWS rows is a row computed as decode computes it), so chunked logits can differ from a one-shot
# prefill's by more than rounding: 0.4-0.9 of logits spanning 35 on SmolLM2 for some chunk sizes (0 for others).
SCORE_BYTES = 8 << 20


@dataclass
class StreamStats:
    """The decode passes of one generation (the prompt's excluded): what they read and waited for."""

    passes: int
    tokens: int  # new tokens after the first (the prompt's pass yields that one)
    decode_s: float
    bytes_per_pass: float  # the plan's streamed bytes
    read_bytes: int  # what the ring read meanwhile (read-ahead included)
    read_s: float
    wait_s: float  # the compute's time waiting for reads
    threads: str = ""  # what the governor's hold-back trial measured (HoldBack.line), if anything
    read_sizes: str = ""  # what the ring's read-size trial measured (PrefetchRing.read_size_line), if anything

    def line(self, gbps: float | None = None) -> str:
        """MB per token, the I/O wait, and with the disk's probed `gbps` the bound: per pass, the larger of the reads at
        that throughput and the compute measured here (pass time minus wait)."""
        if not self.passes or not self.tokens:
            return "streaming: no decode passes"
        per_pass = self.decode_s / self.passes
        text = (f"streaming: {self.bytes_per_pass / self.tokens * self.passes / 1e6:.0f} MB read per token "
                f"({self.bytes_per_pass / 1e6:.0f} MB per pass, {self.tokens / self.passes:.2f} tokens per pass) | "
                f"I/O wait {self.wait_s / self.passes * 1000:.0f} ms per pass of {per_pass * 1000:.0f}")
        if self.read_s > 0:
            text += f" | reads {self.read_bytes / self.read_s / 1e9:.2f} GB/s"
        if gbps:
            floor = max(self.bytes_per_pass / (gbps * 1e9), per_pass - self.wait_s / self.passes)
            text += f" | bound {self.tokens / self.passes / floor:.1f} tok/s at {gbps:.2f} GB/s, {floor / per_pass:.0%} reached"
        for trial in (self.threads, self.read_sizes):
            if trial:
                text += f" | {trial}"
        return text


def _close_ring(ring) -> None:
    if ring is not None:
        ring.close()
        ring.reader.close()


class StreamingLanguageModel(LanguageModel):
    """The runtime's `LanguageModel` over a GGUF whose FFN weights do not all fit the DRAM budget: a residency
    plan keeps what fits (`edgewise.flash.residency`), the rest streams through the prefetch ring
    (`edgewise.flash.stream`). Dense: every token reads every streamed byte, so the output equals the
    dense model's, token for token. Decoding is eager (the ring's waits are Python between kernels).

        lm = StreamingLanguageModel.open("qwen2.5-coder-1.5b", budget="600MB")
    """

    def __init__(self, *args, plan, ring, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan, self.ring = plan, ring
        self.prefill_chunk = 64  # prompt tokens per pass (see prefill)
        # the reader thread must not be inside a read when the interpreter exits (the native reader's threads
        # would be torn down under it): close the ring when the model goes, or at exit at the latest
        self._finalizer = weakref.finalize(self, _close_ring, ring)

    def prefill(self, ids: list[int], cache, start: int = 0, last_only: bool = True):
        """As `LanguageModel.prefill`, in chunks of `prefill_chunk` tokens: a long prompt's activations ([T, FFN width]
        floats, 70 MB for 1000 tokens of the 1.5B model) would otherwise be the largest thing in memory, above the
        budget. Each chunk is one pass over the streamed weights, read while the chunk before computes."""
        chunk = self.prefill_chunk
        if len(ids) <= chunk:
            return super().prefill(ids, cache, start, last_only)
        if not last_only:
            return torch.cat([LanguageModel.prefill(self, ids[at : at + chunk], cache, start + at, False) for at in range(0, len(ids), chunk)])
        for at in range(0, len(ids), chunk):  # only the last chunk's last row is wanted: drop the others' as they come
            out = LanguageModel.prefill(self, ids[at : at + chunk], cache, start + at, last_only=True)
        return out

    def prefill_chunks(self, ids: list[int], cache, start: int = 0) -> Iterator[torch.Tensor]:
        """Each chunk's logits as it is computed, in chunks of at most SCORE_BYTES of logits: a 512-token window's
        [512, vocab] logits are 311 MB for a 152k vocabulary, and scoring holds two or three copies; under a memory
        cap sized for decoding (benchmarks/flash.py view b) even 64 rows' (39 MB each) were killed. Each chunk is a
        pass over the streamed weights."""
        rows = max(16, min(self.prefill_chunk, SCORE_BYTES // (4 * self.cfg.vocab_size)) // 16 * 16)
        for at in range(0, len(ids), rows):
            yield LanguageModel.prefill(self, ids[at : at + rows], cache, start + at, last_only=False)

    def generate(self, ids: list[int], max_new_tokens: int, sampler: Sampler | None = None, stop_at_eot: bool = True,
                 lookup: PromptLookup | None = None) -> Iterator[int]:
        """As `LanguageModel.generate`; `self.stream_stats` then holds the decode passes' reads."""
        before = None
        try:
            for i, token in enumerate(super().generate(ids, max_new_tokens, sampler, stop_at_eot, lookup)):
                if i == 0 and self.ring is not None:  # the prompt's passes are done: count the decode passes from here
                    before = (self.ring.stats.bytes_read, self.ring.stats.read_s, self.ring.stats.wait_s)
                yield token
        finally:
            stats = self.last_stats
            passes = stats.speculation.passes if stats.speculation else max(stats.new_tokens - 1, 0)
            ring = self.ring.stats if self.ring is not None and before is not None else None
            self.stream_stats = StreamStats(
                passes=passes, tokens=max(stats.new_tokens - 1, 0), decode_s=stats.decode_s, bytes_per_pass=self.plan.bytes_per_token,
                read_bytes=ring.bytes_read - before[0] if ring else 0, read_s=ring.read_s - before[1] if ring else 0.0,
                wait_s=ring.wait_s - before[2] if ring else 0.0,
                threads=self.governor.hold_back.line(self.governor.free_threads) if self.governor.hold_back else "",
                read_sizes=self.ring.read_size_line() if self.ring is not None else "",
            )

    def close(self) -> None:
        """Stop the prefetch ring (waiting for a read in flight) and close the file; idempotent."""
        self._finalizer()

    def __enter__(self) -> "StreamingLanguageModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def open(cls, model: str | os.PathLike | None = None, budget: str | int = "50%", ring_depth: int = 2, threads: int | None = None,
             read_threads: int = 8, record: bool = False, progress: Callable[[int, int], None] | None = None,
             read_sizes: tuple[int, ...] | None = None) -> "StreamingLanguageModel":
        """`budget`: DRAM for weights and the ring (a size, or a share of the GGUF's weight bytes); the plan is made
        now. `ring_depth`: at most this many reading buffers (fewer where the budget cannot hold them). `read_sizes`:
        bytes per direct read to choose among by timing them (default `stream.READ_SIZES`; one size fixes it)."""
        from edgewise.flash.residency import model_parts, plan_residency
        from edgewise.gguf_io import read_gguf
        from edgewise.models import resolve_model
        from edgewise.sizes import parse_size

        path = resolve_model(model)
        gguf = read_gguf(path)
        parts = model_parts(gguf)
        plan = plan_residency(parts, parse_size(budget, of=sum(p.nbytes for p in parts), what="--budget"), ring_depth)
        return cls.from_plan(path, gguf, plan, threads, read_threads, record, progress, read_sizes)

    @classmethod
    def from_store(cls, store: str | os.PathLike, model: str | os.PathLike | None = None, verify: bool = True, threads: int | None = None,
                   read_threads: int = 8, progress: Callable[[int, int], None] | None = None,
                   check_progress: Callable[[int, int], None] | None = None) -> "StreamingLanguageModel":
        """The plan saved by `edgewise flash convert STORE --budget SIZE` (`edgewise.flash.plan_store`), over its GGUF
        (with `verify`, its sha256 checked first: `check_progress` follows those bytes)."""
        from edgewise.flash.plan_store import PlanStore

        saved = PlanStore.open(store, model=model, verify=verify, progress=check_progress)
        return cls.from_plan(saved.model_path, saved.gguf, saved.plan, threads, read_threads, progress=progress)

    @classmethod
    def from_plan(cls, path: Path, gguf, plan, threads: int | None = None, read_threads: int = 8, record: bool = False,
                  progress: Callable[[int, int], None] | None = None, read_sizes: tuple[int, ...] | None = None) -> "StreamingLanguageModel":
        """The model over `gguf` (read from `path`) with `plan`'s parts resident and the rest streamed."""
        import warnings

        from edgewise.flash.io import DirectReader
        from edgewise.flash.stream import READ_SIZES, PrefetchRing, StreamedFFN, layer_reads
        from edgewise.lm.config import ModelConfig
        from edgewise.lm.model import layer_act_bits
        from edgewise.lm.threads import HoldBack, ThreadGovernor
        from edgewise.lm.weights import KQUANT_TYPES, KQuantLinear

        governor = ThreadGovernor(requested=threads)
        _check_omp_wait_policy()
        cfg = ModelConfig.from_gguf(gguf)
        reads = layer_reads(gguf, plan, read_sizes or READ_SIZES)
        ring = PrefetchRing(DirectReader(path, threads=read_threads, eof_tail_ok=True), reads, plan.ring_depth, record=record) if reads else None
        bits = layer_act_bits(cfg)
        embedding = None
        table = gguf.tensor("token_embd.weight")
        if not cfg.tied_embeddings and table.qtype in KQUANT_TYPES:  # rows read from the mapped file, a few KB a token
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a read-only mapping: the kernels only read it
                embedding = KQuantLinear(torch.from_numpy(table.raw), table.qtype, table.shape[1], bits["output"])
        decoder = Llama.from_gguf(
            gguf, "quant", progress=progress, embedding=embedding,
            ffn_of_layer=lambda i: StreamedFFN(gguf, i, ring, reads[i].tensors if i in reads else {}, cfg.traits.ffn_activation, bits),
        )
        lm = cls.assemble(path, gguf, decoder, plan=plan, ring=ring)
        if ring is not None:  # the reader's threads need CPU while the layers compute: time passes with one CPU held back
            governor.hold_back = HoldBack()
        lm.governor = governor
        return lm
