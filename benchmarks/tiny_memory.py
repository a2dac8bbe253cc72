"""Training-step memory against MIT's "On-Device Training Under 256KB Memory" (Fig. 10 / Table)
and against PyTorch, for MobileNetV2-w0.35, ProxylessNAS-w0.3 and an MCUNet-style 5 FPS net at
128x128, batch 1, 10 classes.

For each model, edgewise's int8 training plan (`training_plan(..., precision="int8")`):
- full update (every parameter), updates after the backward pass, layer-by-layer buffers;
- the sparse scheme below, layer-by-layer buffers, updates after the backward pass;
- the sparse scheme, in-place reordered updates and the full int8 layout (fused activations,
  in-place depthwise and adds, streamed frozen conv chains, gradients computed where read).
"SRAM" is the arena plus the trained parameters in RAM (int8 trained weight slices with the
chosen sub-LSB rule's master copies, int32 biases, the fp32 classifier); the arena alone is
shown too. Memory depends on shapes only, so weights are random.

PyTorch's full fine-tune of the same model (SGD, batch 1, train mode, 1 thread) is measured in
fresh subprocesses by `edgewise.metrics.torch_memory`: the allocator's peak of live tensor bytes
(profiler memory events) and the process's peak RSS. The paper's 303 MB for PyTorch matches the
process figure; tensor memory alone is far smaller (both are printed).

    python benchmarks/tiny_memory.py [--rule stochastic] [--no-pytorch]

Prints one line per model, `MODEL edgewise_kb = X paper_kb = Y pytorch_full_mb = Z`, and writes
benchmarks/results/tiny_memory.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from edgewise.files import write_text_atomic
from edgewise.tiny.frontend import from_module
from edgewise.tiny.models import mcunet_5fps_like, mobilenet_v2, proxyless_mobile
from edgewise.tiny.plan import training_plan
from edgewise.tiny.sparse import Scheme, conv_layers

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (1, 3, 128, 128)

# model name -> (factory for the subprocess, kwargs, paper's full / sparse / sparse+reorder KB)
MODELS = {
    "MbV2-w0.35": ("edgewise.tiny.models:mobilenet_v2", {"width": 0.35, "n_classes": 10}, (2939, 335, 141)),
    "ProxylessNAS-w0.3": ("edgewise.tiny.models:proxyless_mobile", {"width": 0.3, "n_classes": 10}, (2745, 326, 135)),
    "MCUNet-5FPS-like": ("edgewise.tiny.models:mcunet_5fps_like", {"n_classes": 10}, (3650, 560, 173)),
}
BUILD = {"MbV2-w0.35": lambda: mobilenet_v2(0.35, 10), "ProxylessNAS-w0.3": lambda: proxyless_mobile(0.3, 10), "MCUNet-5FPS-like": lambda: mcunet_5fps_like(10)}


def sparse_scheme(model) -> Scheme:
    """The same 100 KB-class scheme shape for every model, in the paper's style: biases of the last
    9 convs, the classifier, and the first pointwise (expand) conv of each of the last two blocks
    at a quarter of its input channels."""
    graph, _ = from_module(model, SHAPE)
    layers = conv_layers(graph)
    expands = [name for name, node in layers.items() if name.endswith("conv.0.0") and node.attrs["groups"] == 1]
    return Scheme(bias_depth=9, weights={expands[-1]: 0.25, expands[-2]: 0.25})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="stochastic", help="sub-LSB update rule, for the master-copy bytes (default stochastic: none)")
    parser.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch measurement (minutes)")
    args = parser.parse_args()

    rows, lines = [], []
    for name, (factory, kwargs, paper) in tqdm(MODELS.items(), desc="models", file=sys.stderr):
        model = BUILD[name]()
        graph, _ = from_module(model, SHAPE)
        full = Scheme(len(conv_layers(graph)), {layer: 1.0 for layer in conv_layers(graph)})
        sparse = sparse_scheme(model)
        plans = {
            "full": training_plan(model, SHAPE, full, reorder=False, precision="int8", update_rule=args.rule, layout_stage="layer_by_layer"),
            "sparse": training_plan(model, SHAPE, sparse, reorder=False, precision="int8", update_rule=args.rule, layout_stage="layer_by_layer"),
            "ours": training_plan(model, SHAPE, sparse, reorder=True, precision="int8", update_rule=args.rule, layout_stage="streamed"),
        }
        torch_mem = None
        if not args.no_pytorch:
            from edgewise.metrics.torch_memory import measure_full_finetune

            torch_mem = measure_full_finetune(factory, kwargs, SHAPE)
        rows.append((name, sparse, plans, paper, torch_mem))
        ours_kb = plans["ours"].peak_kb
        rss_mb = torch_mem.rss_peak_bytes / 2**20 if torch_mem else float("nan")
        line = f"{name} edgewise_kb = {ours_kb:.1f} paper_kb = {paper[2]} pytorch_full_mb = {rss_mb:.1f}"
        lines.append(line)

    md = [
        "# Training-step memory at 128x128, batch 1, 10 classes (int8 graph)",
        "",
        f"Command: `python benchmarks/tiny_memory.py{' --rule ' + args.rule if args.rule != 'stochastic' else ''}`. "
        f"SRAM = arena + trained parameters in RAM (sub-LSB rule `{args.rule}`). Paper: Lin et al. 2022, Cortex-M7, int8.",
        "",
        "| model | paper full | paper sparse | paper sparse+reorder | edgewise full (SRAM) | edgewise sparse, layer by layer (SRAM) | **edgewise sparse + reorder + int8 layout (SRAM)** | its arena | its trained params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, plans, paper, _ in rows:
        o = plans["ours"]
        md.append(
            f"| {name} | {paper[0]} | {paper[1]} | {paper[2]} | {plans['full'].peak_kb:.1f} | {plans['sparse'].peak_kb:.1f} | "
            f"**{o.peak_kb:.1f}** | {o.arena_kb:.1f} | {o.trained_param_bytes / 1024:.1f} |"
        )
    md += ["", "Sparse schemes (biases of the last 9 convs, the fp32 classifier, two expand convs at 1/4 of their input channels):", ""]
    md += [f"- {name}: `{scheme.to_dict()}`" for name, scheme, *_ in rows]
    if not args.no_pytorch:
        md += [
            "",
            "## PyTorch full fine-tune of the same models (measured, fresh subprocess, SGD, batch 1, 1 thread)",
            "",
            "| model | tensor peak (allocator, MB) | process peak RSS (MB) | RSS growth during steps (MB) | edgewise SRAM (KB) | ratio RSS / edgewise | ratio tensors / edgewise |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, _, plans, _, t in rows:
            ours = plans["ours"].peak_kb * 1024
            md.append(
                f"| {name} | {t.total_peak_bytes / 2**20:.1f} | {t.rss_peak_bytes / 2**20:.1f} | {t.rss_step_peak_bytes / 2**20:.1f} | "
                f"{ours / 1024:.1f} | {t.rss_peak_bytes / ours:.0f}x | {t.total_peak_bytes / ours:.0f}x |"
            )
        md += [
            "",
            "The paper's PyTorch figure (303 MB for MbV2-w0.35) is a whole-process number; the process ratio is the like-for-like one. "
            "Tensor memory alone (parameters, gradients, activations, temporaries) is an order of magnitude smaller than the process.",
        ]
    md += ["", "```", *lines, "```", ""]
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(RESULTS / "tiny_memory.md", "\n".join(md))
    print("\n".join(md[:-len(lines) - 3]))
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
