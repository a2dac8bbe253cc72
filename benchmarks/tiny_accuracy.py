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
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from edgewise.files import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
SCHEME = {"bias_depth": 9, "weights": {"features.18.0": 0.125, "features.17.conv.0.0": 0.125}}
ROWS = ["fp32 full fine-tune (PyTorch)", "fp32 last layer", "fp32 sparse", "int8 sparse, no QAS", "int8 sparse, QAS"]


def run_row(row: str, rule: str, args, lr: float | None = None) -> dict:
    import numpy as np
    import torch

    from edgewise.tiny.plan import training_plan
    from edgewise.tiny.sparse import Scheme
    from edgewise.tiny.transfer import (
        fit,
        imagenet_backbone,
        load_transfer_data,
        make_trainer,
    )

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load_transfer_data("fashion-mnist", None, args.resolution, args.train_samples, args.val_samples, args.seed)
    shape = (1, 3, args.resolution, args.resolution)
    scheme = Scheme(bias_depth=0) if "last layer" in row else Scheme.from_dict(SCHEME)
    model = imagenet_backbone(data.n_classes)
    start = time.perf_counter()
    if row.startswith("fp32 full"):
        from edgewise.metrics.torch_memory import measure_full_finetune

        model.eval()  # BatchNorm statistics frozen (batch 1), dropout off: what the compiled rows fold
        opt = torch.optim.SGD(model.parameters(), lr=lr or args.lr)
        rng = np.random.default_rng(args.seed)  # the same orders as `fit`
        for _ in range(args.epochs):
            for i in rng.permutation(len(data.x)):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(data.x[i : i + 1]), data.y[i : i + 1]).backward()
                opt.step()
        with torch.no_grad():
            acc = sum(int((model(data.x_val[j : j + 256]).argmax(-1) == data.y_val[j : j + 256]).sum()) for j in range(0, len(data.x_val), 256)) / len(data.x_val)
        mem = measure_full_finetune("edgewise.tiny.models:mobilenet_v2", {"width": 1.0, "n_classes": data.n_classes}, shape)
        memory = f"{mem.total_peak_bytes / 2**20:.1f} MB tensors, {mem.rss_peak_bytes / 2**20:.0f} MB process RSS"
        return {"row": row, "rule": f"lr {lr}" if lr else "", "val_acc": acc, "memory": memory, "minutes": (time.perf_counter() - start) / 60}
    precision = "fp32" if row.startswith("fp32") else "int8"
    trainer = make_trainer(model, data, scheme, args.lr, precision, rule or "stochastic", qas="no QAS" not in row, seed=args.seed)
    acc = fit(trainer, data, args.epochs, args.seed, progress=False)[-1][2]
    plan = trainer.plan if precision == "int8" else training_plan(model, shape, scheme, precision="fp32")
    return {"row": row, "rule": rule, "val_acc": acc, "memory": f"{plan.peak_kb:.1f} KB ({precision} plan)", "minutes": (time.perf_counter() - start) / 60}


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
    full_accs = [100 * by[(ROWS[0], f"lr {lr}")]["val_acc"] for lr in full_lrs]
    q = acc["int8 sparse, QAS"]
    md += [
        "",
        "Targets for int8 sparse + QAS:",
        f"- within 1 pp of fp32 with the same scheme: {q - acc['fp32 sparse']:+.2f} pp",
        f"- within 3 pp of fp32 full fine-tuning: {q - acc['fp32 full fine-tune (PyTorch)']:+.2f} pp at the shared lr"
        + (f"; {q - max(acc['fp32 full fine-tune (PyTorch)'], *full_accs):+.2f} pp against its best learning rate" if full_lrs else ""),
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
    write_text_atomic(RESULTS / "tiny_accuracy.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
