"""What each structure costs to prune: FFN neurons, attention heads and whole layers, each alone, at about the same
number of parameters removed, on SmolLM2-135M (or another embedded model).

    .venv/bin/python benchmarks/prune_structures.py [--model smollm2-135m] [--calib-tokens 8192] [--eval-chars 16000]

The same calibration as `edgewise compress` (Shakespeare, windows of --ctx, the attention-sink token weighted up;
every layer input's Hessian), the same importance rules (`edgewise.compress.prune`): FFN neurons by
E[h_j^2] * |W_down[:, j]|^2, query heads by tr(W_o,h H W_o,h^T) (as many from each KV group), layers by the KL of the
output when each alone is skipped. The matrices that lose columns (ffn_down, attn_output) are requantized by GPTQ
into their own type; no distillation, so each row shows what the structure alone costs. Held-out perplexity on the
head of Austen by edgewise's runtime (windows of --ctx, every position scored); decode tok/s eager, 2 threads,
median of 3 runs of 48 tokens (per-token overhead dominates a model this small: read it as no slower, not as a
speed-up). Rows: the source; one query head of each KV group (a third of SmolLM2's heads); the FFN neurons and
the layers that remove about as many parameters; the same three chosen at random instead (seed 0: does the
importance rule beat chance?); then twice the parameters of each. Writes
benchmarks/results/prune_structures[-MODEL].md. Its last line: `cheapest structure per parameter [MODEL] = S`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch starts its threads: idle-waiting workers decode slower

import numpy as np
import torch

from edgewise.compress.calibrate import SINK_WEIGHT, second_moments
from edgewise.compress.mixed import SENSITIVITY_TOKENS, KLProbe
from edgewise.compress.prune import ffn_importance, head_importance, parameter_count, plan_pruning, prune_gguf
from edgewise.data.text import load_text
from edgewise.files import write_text_atomic
from edgewise.gguf_io import read_gguf
from edgewise.lm.config import ModelConfig
from edgewise.lm.runtime import LanguageModel
from edgewise.metrics.perplexity import perplexity
from edgewise.metrics.speed import median_decode_tok_s
from edgewise.models import resolve_model

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def held_out_ppl(path: Path, text: str, ctx: int) -> float:
    lm = LanguageModel.load(path, compile=False)
    cache = lm.new_cache(ctx)
    return perplexity(lambda w: lm.prefill(w, cache, last_only=False), lm.tokenizer.encode(text), ctx).ppl


def decode_tok_s(path: Path) -> float:
    """Median decode tok/s on edgewise's runtime (eager: no AOT compile per file; 2 threads fixed), 3 runs of 48 tokens."""
    return median_decode_tok_s(LanguageModel.load(path, compile=False, threads=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model's name or a GGUF file")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (the head of Shakespeare)")
    ap.add_argument("--eval-chars", type=int, default=16000, help="held-out text: the head of Austen, this many characters")
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    src = resolve_model(args.model)
    source = read_gguf(src)
    cfg = ModelConfig.from_gguf(source)
    group = cfg.n_heads // cfg.n_kv_heads
    if group < 2:
        sys.exit(f"{src.name}: one query head per KV head; pruning heads would drop whole K/V heads, which this benchmark does not compare")
    eval_text = load_text("austen")[: args.eval_chars]

    t0 = time.perf_counter()
    lm = LanguageModel.load(src, compile=False)
    ids = lm.tokenizer.encode(load_text("shakespeare")[: 16 * args.calib_tokens])[: args.calib_tokens]
    moments = second_moments(lm, ids, args.ctx, full=True, sink_weight=SINK_WEIGHT)
    del lm
    width = min(args.ctx, SENSITIVITY_TOKENS)
    probe = KLProbe(source, torch.tensor(ids[: (SENSITIVITY_TOKENS // width) * width]).reshape(-1, width))
    layer_kl = np.array([probe.kl_skipping(i) for i in range(cfg.n_layers)])
    del probe
    neurons, heads = ffn_importance(source, moments), head_importance(source, moments)
    print(f"calibration and layer probe: {time.perf_counter() - t0:.0f} s", flush=True)

    all_neurons = cfg.ffn_dim
    per_head = 2 * cfg.dim * cfg.head_dim  # attn_q rows and attn_output columns of one query head
    per_neuron = 3 * cfg.dim
    per_layer = sum(math.prod(t.shape) for n, t in source.tensors.items() if n.startswith("blk.0."))
    head_params = cfg.n_layers * cfg.n_kv_heads * per_head  # one query head of each group, every layer

    def neurons_for(params: int) -> int:  # kept neurons (a multiple of 32) removing about `params`
        return cfg.ffn_dim - 32 * max(1, round(params / (cfg.n_layers * per_neuron * 32)))

    def layers_for(params: int) -> int:
        return max(1, round(params / per_layer))

    configs = [("source", None)]
    for scale, chance in ((1, False), (1, True), (2, False)):
        tag = ", at random" if chance else ""
        if scale <= group - 1:
            configs.append((f"heads: {group - scale} of {group} a KV group{tag}", dict(heads=group - scale, chance=chance)))
        configs.append((f"FFN: {neurons_for(scale * head_params)} of {cfg.ffn_dim} neurons{tag}", dict(keep=neurons_for(scale * head_params), chance=chance)))
        configs.append((f"layers: {layers_for(scale * head_params)} of {cfg.n_layers} dropped{tag}", dict(drop=layers_for(scale * head_params), chance=chance)))

    rows = []
    base_params = parameter_count(source)
    with tempfile.TemporaryDirectory(dir=ROOT / "build" if (ROOT / "build").is_dir() else None) as tmp:
        for label, how in configs:
            if how is None:
                path = src
            else:
                rng = np.random.default_rng(0)
                scores = dict(neurons=neurons, heads=heads, layers=layer_kl)
                if how["chance"]:
                    scores = dict(neurons={i: rng.random(len(s)) for i, s in neurons.items()}, heads={i: rng.random(len(s)) for i, s in heads.items()}, layers=rng.random(cfg.n_layers))
                drop = tuple(sorted(int(i) for i in np.argsort(scores["layers"])[: how.get("drop", 0)]))
                plan = plan_pruning(scores["neurons"], how.get("keep", all_neurons), drop, scores["heads"] if "heads" in how else None, cfg.n_kv_heads, how.get("heads"))
                path = prune_gguf(source, Path(tmp) / f"{len(rows)}.gguf", plan, moments)
            removed = base_params - parameter_count(read_gguf(path))
            ppl, speed = held_out_ppl(path, eval_text, args.ctx), decode_tok_s(path)
            rows.append((label, removed, path.stat().st_size / MB, ppl, speed))
            print(f"{label:36s} -{removed / 1e6:5.2f}M params {rows[-1][2]:7.2f} MiB ppl {ppl:8.3f} decode {speed:5.1f} tok/s", flush=True)

    base_ppl = rows[0][3]
    lines = [
        f"# What each structure costs to prune: {src.name}",
        "",
        f"`.venv/bin/python benchmarks/prune_structures.py --model {args.model} --calib-tokens {args.calib_tokens} --eval-chars {args.eval_chars} --ctx {args.ctx}`",
        "",
        f"Machine: {platform.machine()}, 2 cores. Calibration: the first {len(ids)} tokens of Shakespeare (every layer input's Hessian, as "
        f"`edgewise compress` computes it); layer importance: the KL when each alone is skipped, on {SENSITIVITY_TOKENS} of them. Held-out: "
        f"the first {args.eval_chars:,} characters of Austen, windows of {args.ctx}, every position scored. Each structure alone, no distillation; "
        "ffn_down / attn_output requantized by GPTQ into their own type. The source is already quantized; its own perplexity is row 1. "
        "decode: eager, 2 threads, median of 3 runs of 48 tokens (per-token overhead dominates: read it as no slower, not as a speed-up).",
        "",
        f"{cfg.n_heads} query heads in {cfg.n_kv_heads} KV groups of {group}, head_dim {cfg.head_dim}; FFN {cfg.ffn_dim}; {cfg.n_layers} layers "
        f"({per_layer / 1e6:.2f}M parameters each). Layers by KL when skipped, least first: "
        + ", ".join(f"{i} ({layer_kl[i]:.3f})" for i in np.argsort(layer_kl)[:6]) + ".",
        "",
        "| pruned | parameters removed | MiB | held-out ppl | vs source | ppl increase per 1M parameters removed | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, removed, mib, ppl, speed in rows:
        per_m = f"{(ppl / base_ppl - 1) * 100 / (removed / 1e6):+.2f}%" if removed else "-"
        lines.append(f"| {label} | {removed / 1e6:.2f}M ({removed / base_params:.1%}) | {mib:.2f} | {ppl:.3f} | {ppl / base_ppl - 1:+.1%} | {per_m} | {speed:.1f} |")
    costs = {}
    for label, removed, _, ppl, _ in rows[1:]:
        if label.endswith("at random"):
            continue
        kind = label.split(":")[0]
        costs.setdefault(kind, []).append((ppl / base_ppl - 1) / removed)
    cheapest = min(costs, key=lambda k: np.mean(costs[k]))
    lines += ["", "`at random`: the same number of heads, neurons or layers, chosen by a random number instead of the importance rule (the check that the rule chooses well).",
              "", "```", f"cheapest structure per parameter [{args.model}] = {cheapest} ("
              + ", ".join(f"{k} {np.mean(v) * 1e8:+.2f}% per 1M" for k, v in sorted(costs.items(), key=lambda kv: np.mean(kv[1]))) + ")", "```", ""]
    stem = "prune_structures" if args.model == "smollm2-135m" else f"prune_structures-{Path(str(args.model)).stem}"
    out = ROOT / "benchmarks" / "results" / f"{stem}.md"
    write_text_atomic(out, "\n".join(lines))
    print("\n".join(lines[-5:]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
