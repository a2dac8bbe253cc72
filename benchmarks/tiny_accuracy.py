"""Real transfer learning under a microcontroller's memory: torchvision's ImageNet MobileNetV2-1.0
fine-tuned on Fashion-MNIST at batch 1 with plain SGD, five ways (the paper's Table 2 / Fig. 7
comparison), each with the memory its training step needs:

  fp32 full fine-tune (PyTorch)      every parameter, PyTorch autograd, BN frozen (folded statistics)
  fp32 last layer                    the compiled fp32 step, classifier only
  fp32 sparse                        the compiled fp32 step, the sparse scheme below
  int8 sparse, no QAS                the int8 step (int8_train), plain SGD on the int8 graph
  int8 sparse, QAS                   the int8 step with quantization-aware scaling

plus, with --rules, the int8+QAS row under each sub-LSB update rule (round, stochastic,
master16, master32), which is how edgewise's default rule was chosen.

Every row uses the same training subset (drawn with --seed), the same order, the same number of
epochs, the same learning rate and no augmentation; the new 10-way head starts at zero. Images are
28x28 grayscale, resized to RES x RES and ImageNet-normalized. The int8 rows calibrate on the
first 64 training images. Rows run in parallel worker processes, one thread each.

    python benchmarks/tiny_accuracy.py                          # the table (about 20 min on 2 cores)
    python benchmarks/tiny_accuracy.py --rules                  # plus the rule comparison
    python benchmarks/tiny_accuracy.py --train-samples 300 --val-samples 300   # a quick look

Writes benchmarks/results/tiny_accuracy.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCHEME = {"bias_depth": 9, "weights": {"features.18.0": 0.125, "features.17.conv.0.0": 0.125}}
ROWS = ["fp32 full fine-tune (PyTorch)", "fp32 last layer", "fp32 sparse", "int8 sparse, no QAS", "int8 sparse, QAS"]


def backbone():
    import torch

    from edgewise.tiny.models import imagenet_mobilenet_v2

    model = imagenet_mobilenet_v2()
    model.classifier[1] = torch.nn.Linear(model.classifier[1].in_features, 10)
    torch.nn.init.zeros_(model.classifier[1].weight)
    torch.nn.init.zeros_(model.classifier[1].bias)
    return model


def data(args):
    import numpy as np
    import torch

    from edgewise.data.images import load_fashion_mnist
    from edgewise.tiny.train import to_model_input

    images, labels = load_fashion_mnist("train")
    val_images, val_labels = load_fashion_mnist("test")
    rng = np.random.default_rng(args.seed)
    chosen = rng.permutation(len(images))[: args.train_samples]
    x, y = to_model_input(images[chosen], args.resolution), torch.from_numpy(labels[chosen])
    x_val, y_val = to_model_input(val_images[: args.val_samples], args.resolution), torch.from_numpy(val_labels[: args.val_samples])
    orders = [rng.permutation(len(x)) for _ in range(args.epochs)]
    return x, y, x_val, y_val, orders


def run_row(row: str, rule: str, args, lr: float | None = None) -> dict:
    import torch

    from edgewise.tiny.int8_train import Int8Trainer
    from edgewise.tiny.plan import training_plan
    from edgewise.tiny.sparse import Scheme
    from edgewise.tiny.train import CompiledTrainer

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x, y, x_val, y_val, orders = data(args)
    shape = (1, 3, args.resolution, args.resolution)
    scheme = Scheme.from_dict(SCHEME)
    model = backbone()
    start = time.perf_counter()
    if row.startswith("fp32 full"):
        from edgewise.metrics.torch_memory import measure_full_finetune

        model.eval()  # BatchNorm statistics frozen (batch 1), dropout off: what the compiled rows fold
        opt = torch.optim.SGD(model.parameters(), lr=lr or args.lr)
        for order in orders:
            for i in order:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
                opt.step()
        with torch.no_grad():
            acc = sum(int((model(x_val[j : j + 256]).argmax(-1) == y_val[j : j + 256]).sum()) for j in range(0, len(x_val), 256)) / len(x_val)
        mem = measure_full_finetune("edgewise.tiny.models:mobilenet_v2", {"width": 1.0, "n_classes": 10}, shape)
        memory = f"{mem.total_peak_bytes / 2**20:.1f} MB tensors, {mem.rss_peak_bytes / 2**20:.0f} MB process RSS"
        return {"row": row, "rule": f"lr {lr}" if lr else "", "val_acc": acc, "memory": memory, "minutes": (time.perf_counter() - start) / 60}
    if row.startswith("fp32"):
        sch = Scheme(bias_depth=0) if "last layer" in row else scheme
        trainer = CompiledTrainer(model, args.resolution, sch, args.lr)
        for order in orders:
            for i in order:
                trainer.train_step(x[i : i + 1], y[i : i + 1])
        acc = trainer.accuracy(x_val, y_val)
        plan = training_plan(model, shape, sch, precision="fp32")
        return {"row": row, "rule": "", "val_acc": acc, "memory": f"{plan.peak_kb:.1f} KB (fp32 plan)", "minutes": (time.perf_counter() - start) / 60}
    qas = "no QAS" not in row
    plan = training_plan(model, shape, scheme, lr=args.lr, precision="int8", update_rule=rule)
    trainer = Int8Trainer(plan, x[:64], rule=rule, qas=qas, seed=args.seed)
    chunk = 256
    prefix = [trainer.prefix(x[j : j + chunk]) for j in range(0, len(x), chunk)]  # the frozen part, once per image
    for order in orders:
        for i in order:
            p = prefix[i // chunk]
            trainer.train_step(None, y[i : i + 1], {k: v[i % chunk : i % chunk + 1] for k, v in p.items()})
    correct = 0
    for j in range(0, len(x_val), chunk):
        correct += int((trainer.logits(None, trainer.prefix(x_val[j : j + chunk])).argmax(-1) == y_val[j : j + chunk]).sum())
    return {"row": row, "rule": rule, "val_acc": correct / len(x_val), "memory": f"{plan.peak_kb:.1f} KB (int8 plan)", "minutes": (time.perf_counter() - start) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=3000)
    parser.add_argument("--val-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rule", default="stochastic", help="sub-LSB rule of the int8 rows (default stochastic)")
    parser.add_argument("--rules", action="store_true", help="also run int8+QAS under every sub-LSB rule")
    parser.add_argument("--full-lrs", default="", help="also run the PyTorch full fine-tune at these learning rates, e.g. 0.0003,0.0001")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from edgewise.tiny.int8_ops import UPDATE_RULES

    jobs = [(row, args.rule if row.startswith("int8") else "", None) for row in ROWS]
    if args.rules:
        jobs += [("int8 sparse, QAS", rule, None) for rule in UPDATE_RULES if rule != args.rule]
    full_lrs = [float(v) for v in args.full_lrs.split(",") if v]
    jobs += [(ROWS[0], "", lr) for lr in full_lrs]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_row, row, rule, args, lr) for row, rule, lr in jobs]
        results = []
        for f in futures:
            results.append(f.result())
            r = results[-1]
            print(f"{r['row']:<32} {r['rule']:<10} val_acc {r['val_acc']:.4f}  {r['memory']}  ({r['minutes']:.1f} min)", file=sys.stderr)

    by = {(r["row"], r["rule"]): r for r in results}
    main_rows = [by[job[:2]] for job in jobs[: len(ROWS)]]
    md = [
        f"# Transfer learning: ImageNet MobileNetV2-1.0 -> Fashion-MNIST at {args.resolution}x{args.resolution}, batch 1",
        "",
        f"Command: `python benchmarks/tiny_accuracy.py --resolution {args.resolution} --train-samples {args.train_samples} "
        f"--val-samples {args.val_samples} --epochs {args.epochs} --lr {args.lr} --seed {args.seed}{' --rules' if args.rules else ''}"
        f"{' --full-lrs ' + args.full_lrs if args.full_lrs else ''}`.",
        f"Every row: the same {args.train_samples} training images (seed {args.seed}), {args.epochs} epoch(s) in the same order, "
        f"SGD lr {args.lr} without momentum, no augmentation, a zero-initialized 10-way head; validation on the first "
        f"{args.val_samples} test images. Sparse scheme: `{SCHEME}` plus the classifier. int8 rows: sub-LSB rule `{args.rule}`.",
        "",
        "| setting | val accuracy | memory of its training step |",
        "|---|---:|---|",
    ]
    md += [f"| {r['row']} | {100 * r['val_acc']:.2f}% | {r['memory']} |" for r in main_rows]
    acc = {r["row"]: 100 * r["val_acc"] for r in main_rows}
    q = acc["int8 sparse, QAS"]
    md += [
        "",
        "Targets for int8 sparse + QAS:",
        f"- within 1 pp of fp32 with the same scheme: {q - acc['fp32 sparse']:+.2f} pp",
        f"- within 3 pp of fp32 full fine-tuning: {q - acc['fp32 full fine-tune (PyTorch)']:+.2f} pp",
        f"- at least 2 pp above last layer only: {q - acc['fp32 last layer']:+.2f} pp",
        f"- QAS against no QAS (int8): {q - acc['int8 sparse, no QAS']:+.2f} pp",
    ]
    if full_lrs:
        md += ["", "PyTorch full fine-tune at other learning rates (same data and order): "
               + ", ".join(f"lr {lr}: {100 * by[(ROWS[0], f'lr {lr}')]['val_acc']:.2f}%" for lr in full_lrs) + "."]
    if args.rules:
        md += ["", "## int8 sparse + QAS by sub-LSB update rule", "", "| rule | val accuracy | memory |", "|---|---:|---|"]
        md += [f"| {rule} | {100 * by[('int8 sparse, QAS', rule)]['val_acc']:.2f}% | {by[('int8 sparse, QAS', rule)]['memory']} |" for rule in UPDATE_RULES]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "tiny_accuracy.md"
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
