"""The personalization memory model against measurement: hand-made plans, each trained a few steps in a fresh process.

    .venv/bin/python benchmarks/personalize_memory.py [--steps 3]

`edgewise.personalize.plan` predicts a training step's bytes above the inference footprint (the trained state at 16
bytes a parameter, the activations by cut, window length and kept/recomputed, the chunked cross-entropy, and two
measured constants). This script measures what `tune` really adds: for each configuration a plan is made by hand
(norm gains only, or LoRA or rows on every projection of the blocks that take gradients), `tune` runs its
contribution analysis and search as for a budget of the plan's size (their result dropped), trains the hand-made plan
on Austen for --steps steps in a fresh process, and the process's peak RSS above its inference footprint is compared
with the model's total. The model must stay above every measurement (it decides what fits a budget) and close to
it (what it over-counts is budget a plan cannot use). Writes benchmarks/results/personalize-memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "personalize-bench"

# (window tokens, cut, recompute, kind, size): kind "norm" trains norm gains only (a near-zero state: the fixed
# part alone); "lora" and "rows" add a term of that size on every projection of every block from the cut.
CONFIGS = [
    (128, 30, True, "norm", 0),
    (128, 15, True, "norm", 0),
    (128, 0, True, "norm", 0),
    (64, 0, True, "norm", 0),
    (256, 0, True, "norm", 0),
    (128, 15, False, "norm", 0),
    (128, 0, False, "norm", 0),
    (128, 15, False, "lora", 8),
    (128, 0, True, "lora", 4),
    (128, 0, True, "lora", 32),
    (128, 20, True, "rows", 64),
]


def worker(args) -> dict:
    from edgewise.personalize.adapter import PROJECTIONS, Term
    from edgewise.personalize.plan import Plan, plan_fixed_bytes, state_bytes, with_bytes
    from edgewise.personalize.train import _plan, tune

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from personalize import user_texts

    T, cut, recompute, kind, size = json.loads(args.worker_config)

    def hand_made(net, frozen, windows, seq_len):
        cfg = net.cfg
        terms = [Term("norm", "output_norm")]
        for i in range(cut, cfg.n_layers):
            terms += [Term("norm", f"blk.{i}.attn_norm"), Term("norm", f"blk.{i}.ffn_norm")]
            terms += [Term(kind, f"blk.{i}.{p}", size) for p in PROJECTIONS if kind != "norm"]
        terms = [with_bytes(t, net, 1) for t in terms]
        rows = {t.name: list(range(t.size)) for t in terms if t.kind == "rows"}
        state = state_bytes(terms, 1)
        made = Plan(terms, seq_len, cut, recompute, 1 << 40, state, plan_fixed_bytes(cfg, seq_len, cut, recompute, terms), 0.0, rows)
        # what tune runs before training, for a budget of this plan's size: the contribution analysis (shortened to
        # fit that budget, as tune would) and the search; their result is dropped, what they leave resident is not
        _plan(net, frozen, windows, made.total_bytes, seq_len, 1, 0, lambda msg: None, None)
        return made

    train, _ = user_texts()
    out = WORK / "memory-calibration.adapter"
    out.unlink(missing_ok=True)
    r = tune(train, out, 1 << 40, steps=args.steps, seq_len=T, checkpoint_every=args.steps, make_plan=hand_made)
    out.unlink(missing_ok=True)
    return {"params": r.plan.params, "state_mb": r.plan.state_bytes / 2**20, "fixed_mb": r.plan.fixed_bytes / 2**20,
            "model_mb": r.plan.total_bytes / 2**20, "measured_mb": r.training_mb, "inference_mb": r.inference_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="training steps per configuration (each one saves the adapter once, at the end)")
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.worker_config:
        print(json.dumps(worker(args)))
        return
    from tqdm import tqdm

    lines = [
        "# Personalization: the memory model against measured peak RSS",
        "",
        f"`.venv/bin/python benchmarks/personalize_memory.py --steps {args.steps}`. SmolLM2-135M (Q4_1) on Austen; each"
        f" configuration a hand-made plan trained {args.steps} steps by `tune` in a fresh process. MiB above the"
        " inference footprint (RSS with the model loaded, the text tokenized and one window run without gradients);"
        " measured: VmHWM reset at that point. Kinds: norm = norm gains only (the fixed part alone); lora r / rows k on"
        " all 7 projections of every block from the cut.",
        "",
        "| window | cut | activations | trained | params | model: state | model: rest | model total | measured | model - measured |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    slack = []
    for config in tqdm(CONFIGS, desc="configurations", unit="run"):
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--worker-config", json.dumps(config)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        T, cut, recompute, kind, size = config
        slack.append(r["model_mb"] - r["measured_mb"])
        lines.append(f"| {T} | {cut} | {'recomputed' if recompute else 'kept'} | {kind}{f' {size}' if size else ''} | {r['params']:,} |"
                     f" {r['state_mb']:.1f} | {r['fixed_mb']:.1f} | {r['model_mb']:.1f} | {r['measured_mb']:.1f} | {slack[-1]:+.1f} |")
    lines += ["", f"model - measured: min {min(slack):+.1f} MB, max {max(slack):+.1f} MB (negative: the model under-counts, a plan could exceed its budget)"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "personalize-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
