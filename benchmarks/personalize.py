"""Personalization benchmark: a "user" is one author's writing; the model learns it on this CPU.

    .venv/bin/python benchmarks/personalize.py [--steps 40] [--seq-len 128] [--budgets 16,64,256]
    .venv/bin/python benchmarks/personalize.py --model qwen2.5-coder-1.5b --user code --budgets 64 --peers peft-lora

Users: `austen` (the default, with SmolLM2-135M) is Jane Austen, split by chapter: every tenth chapter (9, 19, ...)
is the user's held-out text, the rest is what she has typed. `code` is a programmer: the Python standard library's
top-level modules (on every machine), every tenth file held out. Every method trains on the same tokens (the same
windows of --seq-len, the same order, one window a step, --steps steps) and runs in a fresh process, which measures
its own memory: the *inference footprint* (RSS with the model loaded and one window run without gradients) and the
*training peak* above it (VmHWM reset at that point).
- edgewise tune at each budget of --budgets (MB of training memory above the inference footprint), on the GGUF;
- the peers of --peers: PyTorch full fine-tuning (transformers' model of the same GGUF, dequantized to fp32; AdamW,
  lr 5e-5) and LoRA with peft on the same fp32 model (r = 8 on every projection, alpha 16, AdamW, lr 1e-3, edgewise's
  rate). Full fine-tuning of a 1.5B model needs ~24 GB (fp32 weights, gradients, two Adam moments): leave it out there.
Measured after training: held-out perplexity on the user's text and on general text (Shakespeare: the forgetting
check), against each method's own model before training; for edgewise at 64 MB and its base, the next-word top-3
accuracy and keystroke savings on held-out words (`edgewise.personalize.keyboard`). Speed: tok/s of each method,
what a 10-minute training budget buys at that rate, and edgewise 64 MB and peft LoRA trained again beside a
competing process (one core kept busy), as on a phone or laptop that is doing something else. Writes
benchmarks/results/personalize[-MODEL-USER].md and .png (held-out perplexity against training memory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "personalize-bench"


USERS = {"austen": "Jane Austen's novels, split by chapter", "code": "the Python standard library's top-level modules, split by file"}


def user_texts(user: str = "austen") -> tuple[str, str]:
    """(what the user typed, their held-out text): every tenth chapter or file held out."""
    if user == "code":
        import sysconfig

        pieces = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
    else:
        from edgewise.data.text import load_text, split_chapters

        pieces = split_chapters(load_text("austen"))
    train = "".join(c for i, c in enumerate(pieces) if i % 10 != 9)
    test = "".join(c for i, c in enumerate(pieces) if i % 10 == 9)
    return train, test


def ppl_windows(nll_of, ids: list[int], ctx: int, max_tokens: int) -> float:
    """exp(mean NLL) over non-overlapping windows of ctx tokens of the first max_tokens ids."""
    ids = ids[:max_tokens]
    total, count = 0.0, 0
    for s in range(0, len(ids) - ctx + 1, ctx):
        w = ids[s : s + ctx]
        total += nll_of(w)
        count += ctx - 1
    return math.exp(total / count)


def competitor() -> subprocess.Popen:
    """A competing process: one core kept busy, as another app on a phone or laptop would."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


# -- workers: one method each, in a fresh process ---------------------------------------------------------
def worker_edgewise(args) -> dict:
    from edgewise.data.text import load_text
    from edgewise.lm.runtime import LanguageModel
    from edgewise.metrics.perplexity import perplexity
    from edgewise.personalize.train import tune

    train, test = user_texts(args.user)
    out = WORK / f"edgewise-{args.model}-{args.user}-{args.budget}.adapter"
    out.unlink(missing_ok=True)
    rival = competitor() if args.busy else None
    t0 = time.perf_counter()
    try:
        r = tune(train, out, args.budget << 20, model=args.model, steps=args.steps, seq_len=args.seq_len, lr=1e-3, checkpoint_every=args.steps)
    finally:
        if rival is not None:
            rival.kill()
    wall = time.perf_counter() - t0
    result = {"method": f"edgewise {args.budget}MB", "budget_mb": args.budget, "inference_mb": r.inference_mb, "training_mb": r.training_mb, "tok_s": r.tokens_per_s,
              "train_s": r.seconds, "wall_s": wall, "params": r.plan.params, "seq_len": r.plan.seq_len}
    if args.busy:
        return result
    merged = None
    if args.merged:  # the adapter folded into a standalone GGUF (tune --merge): what requantizing costs
        from edgewise.personalize.merge import merge

        merged = WORK / f"merged-{args.model}-{args.user}-{args.budget}.gguf"
        merge(out, merged, model=args.model)
    for label, adapter in (("before", None), ("after", out)):
        lm = LanguageModel.load(args.model, compile=False, adapter=adapter)
        for name, text in (("user", test), ("general", load_text("shakespeare")[:200_000])):
            ids = lm.tokenizer.encode(text)
            cache = lm.new_cache(args.ctx)
            p = perplexity(lambda w: lm.prefill_chunks(w, cache), ids, args.ctx, args.eval_tokens)
            result[f"ppl_{name}_{label}"] = p.ppl
    if merged is not None:
        lm = LanguageModel.load(str(merged), compile=False)
        ids = lm.tokenizer.encode(test)
        cache = lm.new_cache(args.ctx)
        result["ppl_user_merged"] = perplexity(lambda w: lm.prefill_chunks(w, cache), ids, args.ctx, args.eval_tokens).ppl
        merged.unlink()
    return result


def _hf_model(name: str):
    from transformers import AutoModelForCausalLM

    from edgewise.models import resolve_model

    path = resolve_model(name)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype="float32")


def worker_torch(args) -> dict:
    import torch

    from edgewise.data.text import load_text
    from edgewise.gguf_io import read_gguf
    from edgewise.lm.tokenizer import TextTokenizer
    from edgewise.metrics.memory import current_rss_mb, release_freed_memory, reset_peak_rss, rss_high_water_mb
    from edgewise.models import resolve_model
    from edgewise.personalize.train import _window_order, text_windows

    release_freed_memory()
    tok = TextTokenizer.from_gguf(read_gguf(resolve_model(args.model)))
    train, test = user_texts(args.user)
    windows = text_windows(tok.encode_long(train), args.seq_len)
    order = _window_order(len(windows), 0)
    model = _hf_model(args.model)
    if args.method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        lr = 1e-3
    else:
        lr = 5e-5

    def nll(w):
        with torch.no_grad():
            logits = model(torch.tensor([w])).logits[0]
        return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))

    result = {"method": args.method}
    evals = {} if args.busy else {"user": tok.encode_long(test), "general": tok.encode_long(load_text("shakespeare")[:200_000])}
    model.eval()
    for name, ids in evals.items():
        result[f"ppl_{name}_before"] = ppl_windows(nll, ids, args.ctx, args.eval_tokens)
    with torch.no_grad():
        model(torch.tensor([list(windows[0])]))
    reset_peak_rss()
    result["inference_mb"] = current_rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    result["params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    model.train()
    rival = competitor() if args.busy else None
    t0, tokens = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(step / warmup, max(0.0, (args.steps - step + 1) / max(1, args.steps - warmup + 1)))
        w = list(windows[order[(step - 1) % len(order)]])
        logits = model(torch.tensor([w[:-1]])).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += len(w) - 1
    train_s = time.perf_counter() - t0
    if rival is not None:
        rival.kill()
    result.update({"training_mb": rss_high_water_mb() - result["inference_mb"], "tok_s": tokens / train_s, "train_s": train_s, "wall_s": train_s,
                   "seq_len": args.seq_len})
    model.eval()
    for name, ids in evals.items():
        result[f"ppl_{name}_after"] = ppl_windows(nll, ids, args.ctx, args.eval_tokens)
    return result


def worker_keyboard(args) -> dict:
    from edgewise.lm.runtime import LanguageModel
    from edgewise.personalize.keyboard import keystroke_savings

    _, test = user_texts(args.user)
    text = test[len(test) // 3 :]
    out = {}
    for label, adapter in (("before", None), ("after", WORK / f"edgewise-{args.model}-{args.user}-{args.budget}.adapter")):
        lm = LanguageModel.load(args.model, compile=False, adapter=adapter)
        r = keystroke_savings(lm, text, max_words=args.words)
        out[label] = {"words": r.words, "top3": r.top3_accuracy, "savings": r.savings}
    return out


# -- the driver -----------------------------------------------------------------------------------------
def run_worker(kind: str, extra: list[str], common: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, *common, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model's name (`edgewise models`)")
    ap.add_argument("--user", choices=sorted(USERS), default="austen", help="whose writing: " + "; ".join(f"{k}: {v}" for k, v in USERS.items()))
    ap.add_argument("--peers", default="peft-lora,full-ft", help="the PyTorch methods to run beside edgewise (peft-lora, full-ft)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--budgets", default="16,64,256")
    ap.add_argument("--ctx", type=int, default=256, help="perplexity window")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--words", type=int, default=100, help="held-out words the keyboard replay types")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--merged", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-busy", action="store_true", help="skip the runs beside a competing process (they repeat edgewise 64 MB and peft LoRA)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.worker:
        fn = {"edgewise": worker_edgewise, "torch": worker_torch, "keyboard": worker_keyboard}[args.worker]
        print(json.dumps(fn(args)))
        return
    peers = [m for m in args.peers.split(",") if m]
    if "peft-lora" not in peers or any(m not in ("peft-lora", "full-ft") for m in peers):
        raise SystemExit(f"--peers {args.peers!r}: give peft-lora (the yardstick of the last lines), optionally with full-ft")
    common = ["--model", args.model, "--user", args.user, "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--ctx", str(args.ctx), "--eval-tokens", str(args.eval_tokens), "--words", str(args.words)]
    rows = []
    budgets = [int(b) for b in args.budgets.split(",")]
    kb_budget = 64 if 64 in budgets else budgets[0]  # the budget whose adapter the keyboard replays and merge folds
    for b in budgets:
        print(f"edgewise tune at {b} MB ...", flush=True)
        rows.append(run_worker("edgewise", ["--budget", str(b), *(["--merged"] if b == kb_budget else [])], common))
    for method in peers:
        print(f"{method} ...", flush=True)
        rows.append(run_worker("torch", ["--method", method], common))
    print("keyboard replay ...", flush=True)
    kb = run_worker("keyboard", ["--budget", str(kb_budget)], common)
    busy = {}
    for kind, extra in [] if args.no_busy else (("edgewise", ["--budget", str(kb_budget)]), ("torch", ["--method", "peft-lora"])):
        print(f"{kind} training beside a competing process ...", flush=True)
        r = run_worker(kind, [*extra, "--busy"], common)
        busy[r["method"]] = r

    def gain(r, name):
        return 100 * (r[f"ppl_{name}_after"] / r[f"ppl_{name}_before"] - 1)

    lines = [
        f"# Personalization: {args.model} learns a user's writing ({args.user}) on this CPU",
        "",
        f"`.venv/bin/python benchmarks/personalize.py --model {args.model} --user {args.user} --peers {args.peers} --steps {args.steps}"
        f" --seq-len {args.seq_len} --budgets {args.budgets} --eval-tokens {args.eval_tokens} --words {args.words}`."
        f" The user: {USERS[args.user]}; every tenth held out. Every method: {args.steps} steps of one"
        f" {args.seq_len}-token window, the same windows in the same order. Perplexity on the first {args.eval_tokens} tokens,"
        f" windows of {args.ctx}; general text: Shakespeare (the forgetting check). Each method in a fresh process; memory"
        " in MiB: inference footprint (RSS, model loaded and run once) and training peak above it (VmHWM). edgewise runs"
        " the quantized GGUF; the PyTorch peers run transformers' fp32 model of the same file, so each"
        " method's 'before' is its own model's.",
        "",
        "| method | trained params | inference MB | training MB above it | tok/s | train s | tokens in 10 min | held-out ppl before | after | gain | Shakespeare before | after | change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['params']:,} | {r['inference_mb']:.0f} | {r['training_mb']:.1f} | {r['tok_s']:.1f} | {r['train_s']:.0f} |"
            f" {600 * r['tok_s'] / 1000:.0f}k |"
            f" {r['ppl_user_before']:.2f} | {r['ppl_user_after']:.2f} | {gain(r, 'user'):+.1f}% | {r['ppl_general_before']:.2f} |"
            f" {r['ppl_general_after']:.2f} | {gain(r, 'general'):+.1f}% |"
        )
    merged = next((r for r in rows if "ppl_user_merged" in r), None)
    if merged is not None:
        lines += ["", f"`tune --merge` of the {merged['method']} adapter (norms exact, changed matrices requantized to their own types):"
                  f" held-out ppl {merged['ppl_user_merged']:.2f}, against {merged['ppl_user_after']:.2f} with the adapter applied"
                  f" ({100 * (merged['ppl_user_merged'] / merged['ppl_user_after'] - 1):+.1f}%) and {merged['ppl_user_before']:.2f} before tuning."]
    lines += [
        "",
        "tokens in 10 min: what a 10-minute training budget buys at the measured tok/s (tok/s x 600; edgewise's"
        " contribution analysis, done once before training, is not in it).",
    ]
    if busy:
        lines += [
            "",
            f"Beside a competing process (one core kept busy by a Python loop; the same {args.steps} steps, training only):",
            "",
            "| method | tok/s alone | tok/s beside it | ratio |",
            "|---|---:|---:|---:|",
        ]
    for method, r in busy.items():
        alone = next(x for x in rows if x["method"] == method)
        lines.append(f"| {method} | {alone['tok_s']:.1f} | {r['tok_s']:.1f} | {r['tok_s'] / alone['tok_s']:.2f} |")
    lines += [
        "",
        f"Keyboard replay ({kb['before']['words']} held-out words, 3 suggestions; edgewise runtime):",
        "",
        "| model | next-word top-3 accuracy | keystroke savings |",
        "|---|---:|---:|",
        f"| before tuning | {100 * kb['before']['top3']:.1f}% | {100 * kb['before']['savings']:.1f}% |",
        f"| after edgewise tune | {100 * kb['after']['top3']:.1f}% | {100 * kb['after']['savings']:.1f}% |",
        "",
    ]
    by = {r["method"]: r for r in rows}
    ew64 = by[f"edgewise {kb_budget}MB"]  # 64 MB, the operating point, when --budgets has it
    lora = by["peft-lora"]
    lines += ["Each edgewise budget against peft LoRA (training memory above the inference footprint; held-out ppl gain):", ""]
    def windows(r):
        return "" if r["seq_len"] == args.seq_len else f" ({r['seq_len']}-token windows: its plan halved them to fit)"

    lines += [f"- {r['method']}{windows(r)}:"
              f" {r['training_mb']:.1f} MB ({'within' if r['training_mb'] <= r['budget_mb'] else 'OVER'} its budget),"
              f" {lora['training_mb'] / max(r['training_mb'], 1e-9):.2f}x less than peft-lora;"
              f" gain {gain(r, 'user'):.1f}% against {gain(lora, 'user'):.1f}%" for r in rows if r["method"].startswith("edgewise")]
    # the same comparison at equal quality: the least memory that gets within 2 points of LoRA's gain
    close = [r for r in rows if r["method"].startswith("edgewise") and gain(r, "user") <= gain(lora, "user") + 2.0]
    if close:
        r = min(close, key=lambda r: r["training_mb"])
        lines += ["", f"Least edgewise memory within 2 points of peft LoRA's gain: {r['method']}, {r['training_mb']:.1f} MB,"
                  f" {lora['training_mb'] / max(r['training_mb'], 1e-9):.2f}x less (gain {gain(r, 'user'):.1f}% against {gain(lora, 'user'):.1f}%)"]
    lines += [
        "",
        f"ratio memory peft-lora/edgewise = {lora['training_mb'] / max(ew64['training_mb'], 1e-9):.2f}",
        f"ppl gain {ew64['method']} = {gain(ew64, 'user'):.1f}%",
        f"ppl gain peft-lora = {gain(lora, 'user'):.1f}%",
        f"keystroke savings before = {100 * kb['before']['savings']:.1f}% after = {100 * kb['after']['savings']:.1f}%",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "personalize" if (args.model, args.user) == ("smollm2-135m", "austen") else f"personalize-{args.model}-{args.user}"
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, RESULTS / f"{stem}.png", f"{args.model} learns {args.user}: quality against memory")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    before = [r for r in rows if r["method"].startswith("edgewise")][0]["ppl_user_before"]
    ax.axhline(before, color="gray", linestyle="--", label=f"before tuning (edgewise base) {before:.1f}")
    for r in rows:
        ax.scatter(r["training_mb"], r["ppl_user_after"], s=60, label=f"{r['method']}: {r['ppl_user_after']:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("training memory above the inference footprint (MiB, measured, log scale)")
    ax.set_ylabel("held-out perplexity on the user's text")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
