"""A loaded language model: tokenizer, decoder, KV cache, sampling, and the compiled decode step.

    lm = LanguageModel.load()                       # the default SmolLM2-135M, quantized, compiled
    for piece in lm.stream("Once upon a time", max_new_tokens=64):
        print(piece, end="")
    print(lm.last_stats.line())
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile, read_gguf
from edgewise.lm.chat import ChatTemplate
from edgewise.lm.compiled import MIN_LIVE, BackgroundCompile, CompiledDecoder, load_cached, load_or_compile
from edgewise.lm.model import KVCache, Llama, causal_mask
from edgewise.lm.speculative import DraftPolicy, PromptLookup, SpeculationStats, accept
from edgewise.lm.threads import ThreadGovernor
from edgewise.lm.tokenizer import TextTokenizer
from edgewise.lm.weights import PRECISIONS, Precision
from edgewise.metrics.memory import peak_rss_mb
from edgewise.models import resolve_model


@dataclass
class Sampler:
    """Greedy at temperature 0; otherwise temperature plus nucleus (top-p) sampling, seeded."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise EdgewiseError(f"bad sampling settings: temperature {self.temperature} (>= 0), top-p {self.top_p} (in (0, 1])")
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # prompt in, first new token out (prefill + first sample)
    decode_s: float = 0.0  # from the first new token to the last
    peak_rss_mb: float = 0.0
    threads: int = 0  # decode threads at the end (the governor may have changed them: min_threads..max_threads)
    min_threads: int = 0
    max_threads: int = 0
    speculation: SpeculationStats | None = None  # with prompt-lookup drafts

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0

    def line(self) -> str:
        return (
            f"TTFT {self.ttft_s * 1000:.0f} ms | prefill {self.prefill_tok_s:.0f} tok/s ({self.prompt_tokens} tokens)"
            f" | decode {self.decode_tok_s:.1f} tok/s ({self.new_tokens} tokens) | peak RSS {self.peak_rss_mb:.0f} MB"
            f" | threads {self.threads if self.min_threads == self.max_threads else f'{self.min_threads}-{self.max_threads}'}"
            + (f" | {self.speculation.line(self.new_tokens)}" if self.speculation is not None else "")
        )


_WARNED: set[str] = set()


def _check_omp_wait_policy() -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so it cannot be set from here: say so once."""
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "ACTIVE" and "omp" not in _WARNED:
        _WARNED.add("omp")
        warnings.warn("OMP_WAIT_POLICY is not ACTIVE: decoding can be several times slower; set OMP_WAIT_POLICY=ACTIVE before starting Python", stacklevel=3)


class LanguageModel:
    def __init__(self, path: Path, model: Llama, tokenizer: TextTokenizer, chat_template: ChatTemplate, decoder: CompiledDecoder | None, compile_s: float):
        self.path, self.model, self.tokenizer, self.chat_template = path, model, tokenizer, chat_template
        self.decoder = decoder  # None: decode eagerly
        self.compile_s = compile_s
        self.background: BackgroundCompile | None = None  # the decode step compiling meanwhile, if any
        self.governor = ThreadGovernor()  # decode threads: the cores other processes leave free (`threads=` fixes them)
        self.cfg = model.cfg
        self.last_stats = GenerationStats()

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        precision: Precision = "quant",
        compile: bool = True,
        cache_dir: Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        log: Callable[[str], None] = lambda msg: None,
        wait_for_compile: bool = False,
        threads: int | None = None,
        adapter: str | Path | None = None,
    ) -> "LanguageModel":
        """Load a GGUF: a path, or an embedded model's name (`edgewise.models`; the default model when None).

        With `compile`, decoding uses the AOTInductor-compiled step: from the cache when it is there;
        else it compiles now (`wait_for_compile`) or, by default, in a background process while this
        model decodes eagerly, switching over when the step is ready (first token in seconds).

        `threads`: a fixed number of decode threads; by default a `ThreadGovernor` adapts them, while
        decoding, to the cores other processes leave free.

        `adapter`: an adapter file of `edgewise tune`, trained on this very GGUF, applied to the decoder (which then
        decodes eagerly: the compiled step is the base's)."""
        if precision not in PRECISIONS:
            raise EdgewiseError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
        governor = ThreadGovernor(requested=threads)  # validates `threads` before any heavy work
        _check_omp_wait_policy()
        path = resolve_model(path)
        gguf = read_gguf(path)
        tokenizer = TextTokenizer.from_gguf(gguf)  # a corrupted vocabulary is refused before the weights load
        model = Llama.from_gguf(gguf, precision, progress=progress)
        if adapter is not None:
            from edgewise.personalize.adapter import apply_adapter

            apply_adapter(model, adapter, path)
            compile = False
        decoder, compile_s, background = None, 0.0, None
        if compile and wait_for_compile:
            decoder, compile_s = load_or_compile(model, cache_dir, log=log)
        elif compile:
            decoder = load_cached(model, cache_dir)
            if decoder is None:
                background = BackgroundCompile.start(model, path, precision, cache_dir)
                log(f"decoding eagerly while the decode step compiles in the background (once, about a minute; cached in {background.path.parent})")
        lm = cls.assemble(path, gguf, model, decoder, compile_s, tokenizer=tokenizer)
        lm.background, lm.governor = background, governor
        return lm

    @classmethod
    def assemble(cls, path: Path, gguf: GGUFFile, model: Llama, decoder: CompiledDecoder | None = None, compile_s: float = 0.0,
                 tokenizer: TextTokenizer | None = None, **extra):
        """Tokenizer (built here unless given) and chat template from the GGUF's metadata around a built decoder."""
        tokenizer = tokenizer or TextTokenizer.from_gguf(gguf)
        if tokenizer.vocab_size != model.cfg.vocab_size:
            raise EdgewiseError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {model.cfg.vocab_size}")
        tokens = gguf.require("tokenizer.ggml.tokens")
        template = ChatTemplate(
            gguf.metadata.get("tokenizer.chat_template"),
            bos_token=tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else "",
            eos_token=tokens[tokenizer.eos_id] if tokenizer.eos_id is not None else "",
        )
        return cls(path, model, tokenizer, template, decoder, compile_s, **extra)

    # -- the two steps -------------------------------------------------------------------------
    def new_cache(self, capacity: int) -> KVCache:
        return self.model.new_cache(max(capacity, MIN_LIVE))

    @torch.no_grad()
    def prefill(self, ids: list[int], cache: KVCache, start: int = 0, last_only: bool = True) -> torch.Tensor:
        """Run `ids` at positions start.. through the model, filling the cache; fp32 logits [T or 1, vocab]."""
        n = len(ids)
        if start + n > cache.capacity:
            raise EdgewiseError(f"{start + n} tokens exceed the KV cache of {cache.capacity}")
        tokens = torch.tensor(ids, dtype=torch.long)
        positions = torch.arange(start, start + n)
        return self.model(tokens, positions, causal_mask(start, n), cache.keys, cache.values, last_only=last_only)

    def prefill_chunks(self, ids: list[int], cache: KVCache, start: int = 0) -> Iterator[torch.Tensor]:
        """Every position's logits, as consecutive [rows, vocab] pieces (here one; a model that prefills in chunks yields
        each chunk's): a scorer can take each piece's loss and drop it, where the whole [T, vocab] would not fit."""
        yield self.prefill(ids, cache, start, last_only=False)

    @torch.no_grad()
    def decode(self, token: int, position: int, cache: KVCache) -> torch.Tensor:
        """One token at `position`; fp32 logits [vocab]. Uses the compiled step when there is one."""
        live = max(position + 1, MIN_LIVE)  # the compiled step takes L >= 2; slot 1 is masked at position 0
        mask = causal_mask(position, 1, live)
        args = (torch.tensor([token]), torch.tensor([position]), mask, cache.keys, cache.values)
        if self.decoder is None and self.background is not None:
            self.decoder = self.background.poll()  # switch to the compiled step as soon as it is ready
            if self.decoder is not None or self.background.failed:
                self.background = None
        step = self.decoder if self.decoder is not None else self.model
        return step(*args)[0]

    # -- generation ----------------------------------------------------------------------------
    def check_prompt(self, ids: list[int], max_new_tokens: int) -> None:
        if not ids:
            raise EdgewiseError("empty prompt: give some text to continue")
        if max_new_tokens < 1:
            raise EdgewiseError(f"max_new_tokens {max_new_tokens}: expected at least 1 new token")
        if len(ids) + max_new_tokens > self.cfg.context_length:
            raise EdgewiseError(
                f"prompt ({len(ids)} tokens) plus --max-tokens ({max_new_tokens}) exceeds the model's context of {self.cfg.context_length} tokens"
            )

    def generate(self, ids: list[int], max_new_tokens: int, sampler: Sampler | None = None, stop_at_eot: bool = True,
                 lookup: PromptLookup | None = None) -> Iterator[int]:
        """Yield new token ids; `self.last_stats` is complete once the iterator ends.

        `lookup`: speculative decoding with prompt-lookup drafts (greedy only; `edgewise.lm.speculative`):
        a pass that checks a draft yields one token or more, the same tokens as without it; a `DraftPolicy`
        chooses how much of each draft to check (none: a plain pass) by what each length has cost per token here."""
        self.check_prompt(ids, max_new_tokens)
        sampler = sampler or Sampler()
        if lookup is not None and sampler.temperature != 0:
            raise EdgewiseError("speculative decoding checks drafts against the greedy choice: use temperature 0, or turn speculation off")
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids), speculation=SpeculationStats() if lookup else None)
        policy = DraftPolicy()
        cache = self.new_cache(len(ids) + max_new_tokens)
        stats.threads = stats.min_threads = stats.max_threads = self.governor.start()
        t0 = time.perf_counter()
        pending = [sampler(self.prefill(ids, cache)[-1])]  # tokens to yield; the last is not in the cache yet
        t_first = time.perf_counter()
        stats.ttft_s = t_first - t0
        context = list(ids)
        position = len(ids)  # of pending[-1]
        while True:
            for token in pending:
                context.append(token)
                stats.new_tokens += 1
                stats.decode_s = time.perf_counter() - t_first
                yield token
                if (stop_at_eot and token in self.tokenizer.eot_ids) or stats.new_tokens == max_new_tokens:
                    stats.decode_s = time.perf_counter() - t_first
                    stats.peak_rss_mb = peak_rss_mb()
                    return
            token = pending[-1]
            # a check of [token, draft...] may yield len(draft) + 1 tokens: no more than are left
            draft = lookup.propose(context, max_new_tokens - stats.new_tokens - 1) if lookup else []
            draft = draft[: policy.length(len(draft))]
            checked = bool(draft)
            self.governor.pass_started(1 + len(draft))  # the kind of pass: its rows
            started = time.perf_counter()
            if checked:
                logits = self.prefill([token, *draft], cache, start=position, last_only=False)
                pending = accept(draft, logits.argmax(-1).tolist())
                stats.speculation.drafted += len(draft)
                stats.speculation.accepted += len(pending) - 1
                stats.speculation.checks += 1
                stats.speculation.lengths[len(draft)] = stats.speculation.lengths.get(len(draft), 0) + 1
            else:
                pending = [sampler(self.decode(token, position, cache))]
            seconds = time.perf_counter() - started
            self.governor.pass_done(1 + len(draft), seconds)
            if stats.speculation is not None:
                stats.speculation.passes += 1
                policy.record(len(draft), seconds, len(pending))
            position += len(pending)
            stats.threads = self.governor.tick()
            stats.min_threads, stats.max_threads = min(stats.min_threads, stats.threads), max(stats.max_threads, stats.threads)

    def stream(self, prompt: str, max_new_tokens: int = 128, sampler: Sampler | None = None) -> Iterator[str]:
        """Text pieces of the continuation of `prompt` (raw, no chat template)."""
        ids = self.tokenizer.encode(prompt)
        yield from self.tokenizer.stream(self.generate(ids, max_new_tokens, sampler))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode(self.chat_template.render(messages, add_generation_prompt=True))
