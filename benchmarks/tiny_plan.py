"""Planned training-step memory of MobileNetV2 under sparse update schemes, fp32 and int8 graphs.

For each scheme: the arena peak of the static plan of the fp32 graph (every value its own fp32
buffer) and of the int8 graph (`int8_layout`), the int8 step's SRAM (arena + trained parameters,
sub-LSB rule `stochastic`), and the bytes live when the loss is computed in the int8 graph (what
the forward pass keeps for the backward pass). Memory depends on shapes only, so the weights are
random. The paper comparison is `benchmarks/tiny_memory.py`.

    python benchmarks/tiny_plan.py                # MobileNetV2-w0.35 at 128x128
    python benchmarks/tiny_plan.py --width 1.0 --resolution 96

Writes benchmarks/results/tiny_plan.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgewise.files import write_text_atomic
from edgewise.tiny.frontend import from_module
from edgewise.tiny.models import mobilenet_v2
from edgewise.tiny.plan import training_plan
from edgewise.tiny.sparse import Scheme, conv_layers

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.35)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    shape = (1, 3, args.resolution, args.resolution)
    model = mobilenet_v2(args.width, n_classes=args.classes)
    layers = list(conv_layers(from_module(model, shape)[0]))
    full = Scheme(len(layers), {name: 1.0 for name in layers})
    sparse = {"features.14.conv.0.0": 1.0, "features.15.conv.0.0": 1.0}
    rows = [
        ("full update, updates after backward", full, False),
        ("full update, in place (reordered)", full, True),
        ("12 biases + 2 pointwise weights", Scheme(12, sparse), True),
        ("12 biases + 2 pointwise weights, one at 1/8", Scheme(12, {**sparse, "features.14.conv.0.0": 0.125}), True),
        ("classifier only", Scheme(0), True),
    ]
    lines = [
        f"# Planned training-step memory: MobileNetV2-w{args.width} at {args.resolution}x{args.resolution}, batch 1 (`python benchmarks/tiny_plan.py`)",
        "",
        "| scheme | trained tensors | fp32 arena (KB) | int8 arena (KB) | int8 SRAM: arena + trained params (KB) | int8 kept for backward (KB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, scheme, reorder in rows:
        fp32 = training_plan(model, shape, scheme, reorder=reorder)
        plan = training_plan(model, shape, scheme, reorder=reorder, precision="int8", update_rule="stochastic")
        lines.append(f"| {name} | {len(plan.trainable)} | {fp32.arena_kb:.1f} | {plan.arena_kb:.1f} | {plan.peak_kb:.1f} | {plan.kept_for_backward / 1024:.1f} |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "tiny_plan.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
