"""`tune`: a language model learns its user's writing on the device, inside a memory budget.

    result = tune("my-notes/", out="me.adapter", budget=64 * 2**20)   # the default model, SmolLM2-135M

1. The base loads as the runtime runs it: the GGUF's quantized matrices on the native kernels, frozen
   (`frozen.freeze`: gradients pass through them to their inputs, computed from dequantized row slices).
2. The text becomes windows of `seq_len` tokens. The *inference footprint* is measured: the process's peak RSS
   once the base has loaded and run one window without gradients.
3. The contribution analysis and the search choose what trains under `budget` (`plan.py`), and the plan is printed.
4. Adam (`optim.py`: no weight decay, a matrix's second moment factored) trains the chosen terms on shuffled
   windows, a linear warm-up over the first 10% of steps and a linear decay to zero. The loss is the chunked
   cross-entropy (`frozen.chunked_nll`); blocks below the plan's cut run without autograd. With one window a step
   (the default), each term is updated inside the backward as soon as its gradient is complete, and the gradient
   dropped; with `batch` windows a step, gradients are summed over them and held until the step (4 more bytes per
   trained parameter).
5. Every `checkpoint_every` steps, and at the end, the adapter file is rewritten whole (`adapter.save_adapter`:
   temp file, then rename). A rerun with the same `out` resumes from it: the same plan, step, Adam moments and
   window order. A `kill -9` at any moment leaves the last complete adapter.

Nothing trained here is quantized: terms are fp32 over the quantized base, whose scales never move, so QAS (tiny
training's gradient rescaling for int8 weights) has nothing to rescale; `merge.py` folds the terms into the GGUF
and requantizes, at a measured perplexity cost.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgewise.errors import EdgewiseError
from edgewise.metrics.memory import current_rss_mb, peak_rss_mb, release_freed_memory, reset_peak_rss, rss_high_water_mb
from edgewise.personalize.adapter import AdapterHeader, attach, check_base, load_adapter, save_adapter
from edgewise.personalize.optim import Adam
from edgewise.personalize.frozen import chunked_nll, freeze, recomputed
from edgewise.personalize.plan import Plan, analyse, analysis_bytes, min_budget, search

MIN_WINDOWS = 2  # the text must fill at least this many windows
ANALYSIS_WINDOWS = 4
MIN_SEQ_LEN = 32  # the search shortens windows (halving --seq-len) down to this when that buys a better plan
LENGTH_TOLERANCE = 0.8  # ... keeping the longest windows whose plan has at least this share of the best gain
LOSS_HISTORY = 200  # recent step losses kept in the adapter's state


def window_loss(model, window: list[int], cut: int, recompute: bool) -> torch.Tensor:
    """Mean next-token NLL of `window` under `model`, gradients reaching blocks `cut` and above (see the module)."""
    from edgewise.lm.model import causal_mask

    tokens, targets = torch.tensor(window[:-1]), torch.tensor(window[1:])
    T = tokens.shape[0]
    # one layer's K/V, shared by every block below the cut: each writes all T slots before it attends, and nothing
    # reads them after the block (a window has no earlier tokens). Blocks that take gradients write their own.
    one = model.new_cache(T, layers=1)
    keys, values = one.keys * len(model.blocks), one.values * len(model.blocks)

    def run(i, block, h, *rest):
        *pre, k_cache, v_cache, act = rest
        if i < cut:
            with torch.no_grad():
                return block(h, *pre, k_cache, v_cache, act)

        def fresh(h):  # a recomputation writes its own K/V slots: nothing the first pass saved is overwritten
            return block(h, *pre, torch.zeros_like(k_cache), torch.zeros_like(v_cache), act)

        return recomputed(fresh, h) if recompute else fresh(h)

    h = model.hidden(tokens, torch.arange(T), causal_mask(0, T), keys, values, run_block=run)
    return chunked_nll(h, targets, model.output) / T


def text_windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Windows of seq_len + 1 tokens (seq_len inputs and their next tokens), each starting at the last one's final token."""
    return [ids[s : s + seq_len + 1] for s in range(0, len(ids) - seq_len, seq_len)]


@dataclass
class TuneResult:
    out: Path
    plan: Plan
    steps: int  # trained in all, resumed runs included
    resumed_at: int
    first_loss: float  # this run's first step
    last_loss: float  # mean over this run's last 10% of steps
    peak_mb: float  # the process's peak RSS (MiB)
    inference_mb: float  # its peak RSS with the base loaded and one window run without gradients
    seconds: float
    tokens_per_s: float

    @property
    def training_mb(self) -> float:
        """Peak RSS above the inference footprint: what training added."""
        return self.peak_mb - self.inference_mb

    def line(self) -> str:
        return f"adapter = {self.out} peak_mb = {self.peak_mb:.0f} trained_params = {self.plan.params}"


def tune(
    text: str,
    out: str | Path,
    budget: int,
    model: str | Path | None = None,
    steps: int = 200,
    seq_len: int = 256,
    batch: int = 1,
    lr: float = 1e-3,
    seed: int = 0,
    minutes: float | None = None,
    checkpoint_every: int = 10,
    log: Callable[[str], None] = lambda msg: None,
    progress: Callable[..., None] | None = None,
    analysis_progress: Callable[[int, int], None] | None = None,
    make_plan: Callable[..., Plan] | None = None,
) -> TuneResult:
    """Fine-tune `model` (an embedded model's name or a GGUF; default SmolLM2-135M) on `text` into the adapter `out`
    within `budget` bytes above the inference footprint (see the module). `progress(step, steps, loss, tok_s, peak_mb)`.
    `make_plan(model, frozen, windows, seq_len)`, when given, makes the plan instead of `_plan`'s analysis and search (the
    memory model's calibration trains hand-made plans: benchmarks/personalize_memory.py)."""
    from edgewise.gguf_io import read_gguf
    from edgewise.lm.config import ModelConfig
    from edgewise.lm.model import Llama
    from edgewise.lm.tokenizer import TextTokenizer
    from edgewise.models import model_sha256, resolve_model

    for name, value, low in (("steps", steps, 1), ("seq_len", seq_len, 8), ("batch", batch, 1), ("checkpoint_every", checkpoint_every, 1)):
        if value < low:
            raise EdgewiseError(f"{name} must be at least {low}, got {value}")
    if not lr > 0 or (minutes is not None and not minutes > 0):
        raise EdgewiseError(f"lr and minutes must be positive, got {lr} and {minutes}")
    release_freed_memory()
    out = Path(out)
    path = resolve_model(model)
    base = {"name": path.name, "bytes": path.stat().st_size, "sha256": model_sha256(path)}
    resumed = None
    if out.exists():
        resumed = load_adapter(out)
        check_base(resumed[0], out, path, base["sha256"])
    gguf = read_gguf(path)
    cfg = ModelConfig.from_gguf(gguf)
    shortest = min(seq_len, MIN_SEQ_LEN)
    if resumed is None and budget < min_budget(cfg, shortest, batch):
        raise EdgewiseError(f"--budget {budget / 2**20:.1f} MB is below the smallest plan (the final norm alone, {shortest}-token windows):"
                            f" the smallest feasible budget is {math.ceil(min_budget(cfg, shortest, batch) / 2**20)} MB")
    tokenizer = TextTokenizer.from_gguf(gguf)
    ids = tokenizer.encode_long(text)
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    if resumed is not None:
        header, tensors = resumed
        if header.training.get("text_sha256") != text_sha:
            raise EdgewiseError(f"{out} was trained on other text: give the same --text to resume it, or another --out to start afresh")
        seq_len, batch, lr, seed = (header.training[k] for k in ("seq_len", "batch", "lr", "seed"))
    if seq_len >= cfg.context_length:
        raise EdgewiseError(f"--seq-len {seq_len} must be shorter than the model's context of {cfg.context_length} tokens")
    windows = text_windows(ids, seq_len)
    if len(windows) < MIN_WINDOWS:
        raise EdgewiseError(f"the text has {len(ids)} tokens: too short to train on; give at least {MIN_WINDOWS * seq_len + 1} tokens"
                            f" (about {MIN_WINDOWS * seq_len * 4} characters), or a shorter --seq-len")
    net = Llama.from_gguf(gguf, "quant")
    frozen = freeze(net)
    with torch.no_grad():
        window_loss(net, windows[0], cfg.n_layers, False)
    # the inference footprint: the base loaded and run, the text's tokens held; the training's peak counts from here
    # (not from before: tokenizing a long text peaks higher than either, and is over)
    inference_mb = current_rss_mb() if reset_peak_rss() else peak_rss_mb()

    if resumed is None:
        plan = make_plan(net, frozen, windows, seq_len) if make_plan is not None else _plan(net, frozen, windows, budget, seq_len, batch, seed, log, analysis_progress)
        seq_len = plan.seq_len
        windows = text_windows(ids, seq_len)
        params = attach(net, plan.terms, rows=plan.rows, seed=seed)
        step0, losses, seconds0, tokens0 = 0, [], 0.0, 0
        opt_state = None
    else:
        header, tensors = resumed
        plan = Plan.from_json(header.plan)
        log(f"resuming {out} at step {header.state.get('step', 0)} of {header.training.get('steps')}")
        params = attach(net, plan.terms, rows=plan.rows, tensors=tensors, seed=seed)
        step0, losses = int(header.state.get("step", 0)), list(header.state.get("losses", []))
        seconds0, tokens0 = float(header.state.get("seconds", 0.0)), int(header.state.get("tokens", 0))
        opt_state = tensors
    log(plan.table(cfg))

    opt = Adam(params, lr, in_backward=batch == 1)
    if opt_state is not None:
        opt.load(opt_state, step0)
    warmup = max(1, steps // 10)
    order = _window_order(len(windows), seed)
    training = {"lr": lr, "steps": steps, "seq_len": seq_len, "batch": batch, "seed": seed, "text_sha256": text_sha, "text_tokens": len(ids)}

    def save(step: int, seconds: float, tokens: int) -> None:
        tensors = {**{f"param/{n}": p for n, p in params.items()}, **opt.state_tensors()}
        state = {"step": step, "tokens": tokens, "seconds": round(seconds, 3), "losses": losses[-LOSS_HISTORY:], "complete": step >= steps}
        save_adapter(out, AdapterHeader(base, plan.to_json(), training, state), tensors)

    if step0 >= steps:
        log(f"{out} has already trained {step0} steps: pass a larger --steps to train on")
    started = time.perf_counter()
    run_losses: list[float] = []
    step, tokens = step0, tokens0
    for step in range(step0 + 1, steps + 1):
        opt.lr = lr * min(step / warmup, max(0.0, (steps - step + 1) / max(1, steps - warmup + 1)))
        total = 0.0
        opt.begin_step()
        for b in range(batch):
            window = windows[order[((step - 1) * batch + b) % len(order)]]
            loss = window_loss(net, window, plan.cut, plan.recompute) / batch
            loss.backward()
            total += float(loss.detach())
            tokens += len(window) - 1
        opt.step()  # with one window a step, done inside its backward
        losses.append(round(total, 5))
        run_losses.append(total)
        elapsed = time.perf_counter() - started
        if progress is not None:
            progress(step, steps, total, (tokens - tokens0) / elapsed, rss_high_water_mb())
        out_of_time = minutes is not None and elapsed > minutes * 60
        if step % checkpoint_every == 0 or step == steps or out_of_time:
            save(step, seconds0 + elapsed, tokens)
        if out_of_time:
            log(f"stopped at step {step} of {steps}: --minutes {minutes} reached (a rerun resumes)")
            break
    opt.close()
    elapsed = time.perf_counter() - started
    if not run_losses:
        save(step0, seconds0, tokens0)
    tail = run_losses[-max(1, len(run_losses) // 10):] or [math.nan]
    return TuneResult(out, plan, max(step, step0), step0, run_losses[0] if run_losses else math.nan, sum(tail) / len(tail),
                      rss_high_water_mb(), inference_mb, elapsed, (tokens - tokens0) / elapsed if elapsed > 0 else 0.0)


def _window_order(n: int, seed: int) -> list[int]:
    """The windows' order, shuffled by `seed` (the same on a resume), repeated for as many epochs as steps take."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _plan(net, frozen, windows, budget, seq_len, batch, seed, log, progress) -> Plan:
    """The contribution analysis on a few windows (shortened if the whole model's gradients would not fit `budget`),
    then the search at `seq_len` and at halvings of it (`MIN_SEQ_LEN`, `LENGTH_TOLERANCE`)."""
    cfg = net.cfg
    analysis_len, cut = seq_len, 0
    while analysis_len > 16 and analysis_bytes(cfg, analysis_len) > budget:
        analysis_len //= 2
    while cut < cfg.n_layers and analysis_bytes(cfg, analysis_len, cut) > budget:
        cut += 1
    pick = random.Random(seed + 1).sample(range(len(windows)), min(ANALYSIS_WINDOWS, len(windows)))
    sample = [windows[i][: analysis_len + 1] for i in pick]
    log(f"contribution analysis: {len(sample)} windows of {analysis_len} tokens, gradients through blocks {cut}-{cfg.n_layers - 1}")
    contributions = analyse(net, frozen, sample, window_loss, progress=progress, cut=cut)
    plans = []
    length = seq_len
    while length >= MIN_SEQ_LEN or not plans:
        try:
            plans.append(search(net, contributions, budget, length, batch))
        except EdgewiseError:
            if length < MIN_SEQ_LEN:
                raise
        length //= 2
    best = max(p.gain for p in plans)
    return next(p for p in plans if p.gain >= LENGTH_TOLERANCE * best)  # the longest windows that lose little gain
