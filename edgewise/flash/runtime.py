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
from collections.abc import Callable, Iterator
from pathlib import Path

from edgewise.flash.engine import FlashEngine, FlashStats, Mode, Reads
from edgewise.flash.store import FlashStore
from edgewise.lm.model import Llama
from edgewise.lm.runtime import LanguageModel, Sampler, _check_omp_wait_policy
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

    def generate(self, ids: list[int], max_new_tokens: int, sampler: Sampler | None = None, stop_at_eot: bool = True) -> Iterator[int]:
        """As `LanguageModel.generate`; `self.flash_stats` then counts the decode steps only (not the prompt)."""
        self.engine.reset()
        prompt_tokens = len(ids)
        try:
            yield from super().generate(ids, max_new_tokens, sampler, stop_at_eot)
        finally:
            self.flash_stats = FlashStats(self.engine.stats.tokens[prompt_tokens:])
