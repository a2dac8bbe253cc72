"""Training-step time at batch 1 on this host: edgewise's generated C step against its int8 reference
executor and PyTorch eager, with the same model, the same sparse scheme and the same real images,
plus the Cortex-M7 instruction count of the same C step under QEMU.

Model: torchvision's ImageNet MobileNetV2-1.0 with a zero-initialized 10-way head
(`transfer.imagenet_backbone`), Fashion-MNIST images resized to RES x RES (default 64), the sparse
scheme of benchmarks/tiny_accuracy.py (biases of the last 9 convs, the first 1/8 of the input
channels of features.18.0 and features.17.conv.0.0, the fp32 classifier), SGD lr 0.001, batch 1.

Engines, each timed per step (time.perf_counter around the step only) on the same images:

  edgewise C           the generated C project built for this host (`cbackend.CTrainer`, -O2, one
                       thread), `train_step_codes` on int8 codes quantized outside the timed region;
                       sub-LSB rule stochastic, QAS on
  edgewise reference   the int8 reference executor (`Int8Trainer.train_step`, PyTorch int8/fp32 ops,
                       the whole step, no frozen-prefix caching), 1 thread
  PyTorch eager fp32   the same sparse scheme through requires_grad: BN frozen (eval mode, running
                       statistics, as edgewise folds it), trained tensors = the classifier, the BN
                       shifts (beta) of the last 9 convs, the two partial weights with a gradient hook
                       zeroing all but their first 1/8 input channels; torch.optim.SGD, 1 thread, and
                       again with PyTorch's default thread count

The engines run interleaved in rounds (--round images: each engine runs the round's steps back to
back, then the next engine; who goes first rotates), so a load change on this shared machine hits
them alike; the first --warmup images are not timed. Medians are reported.

Cortex-M7: when arm-none-eabi-gcc and qemu-system-arm are installed, the same project is built into
firmware (`firmware.build_firmware`, 256 KiB SRAM / 4 MiB flash budget) and its instructions per
training step are counted under QEMU (`firmware.insns_per_step`, k and 2k steps); the time at
216 MHz (STM32F746, the paper's board) assuming one instruction per cycle is an ESTIMATE only.

    python benchmarks/tiny_speed.py                  # 1.5 to 3 minutes on 2 cores
    python benchmarks/tiny_speed.py --quick          # a smoke run, results file not written
    python benchmarks/tiny_speed.py --steps 60 --resolution 96

Writes benchmarks/results/tiny_speed.md. Last lines printed: `ratio pytorch/c step = X`,
`ratio reference/c step = Y`, `insns_per_step = W` (or n/a).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm import tqdm

from edgewise.files import write_text_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
N_CLASSES = 10
LR = 0.001
RULE = "stochastic"
MCU_HZ = 216e6  # STM32F746 (Cortex-M7), the paper's board


def accuracy_scheme() -> dict:
    """SCHEME of benchmarks/tiny_accuracy.py, loaded from its file (its imports are light and its
    main() is guarded), so the two benchmarks cannot drift apart."""
    spec = importlib.util.spec_from_file_location("tiny_accuracy", HERE / "tiny_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return copy.deepcopy(module.SCHEME)


def last_convs(model: nn.Module, resolution: int, depth: int) -> list[str]:
    """The last `depth` conv layers in graph order, as `sparse.apply_scheme` counts bias depth: the
    conv nodes of the edgewise graph (the head conv features.18.0 included), by module name."""
    from edgewise.tiny.frontend import from_module
    from edgewise.tiny.sparse import conv_layers

    graph, _ = from_module(copy.deepcopy(model), (1, 3, resolution, resolution))
    names = list(conv_layers(graph))
    return names[len(names) - depth :]


def torch_sparse_model(model: nn.Module, scheme: dict, resolution: int) -> tuple[nn.Module, list[torch.Tensor], list[str]]:
    """A copy of `model` for PyTorch eager with the scheme's trained tensors as the only ones that
    require grad. Returns (model, trained tensors, a description of each)."""
    model = copy.deepcopy(model).eval()  # BN on running statistics and dropout off, as edgewise folds it
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    # the BatchNorm right after each conv, found like the frontend folds it (the conv's only user)
    gm = fx.symbolic_trace(model)
    bn_after = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Conv2d):
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), nn.BatchNorm2d):
                bn_after[node.target] = users[0].target
    trained, described = [], []
    for name in last_convs(model, resolution, scheme["bias_depth"]):
        conv = modules[name]
        if name in bn_after:  # the folded conv's bias is the BN shift: d loss / d folded bias = d loss / d beta
            bias, what = modules[bn_after[name]].bias, f"{bn_after[name]}.bias (BN beta after {name})"
        elif conv.bias is not None:
            bias, what = conv.bias, f"{name}.bias"
        else:
            raise SystemExit(f"conv {name} has neither a bias nor a BatchNorm after it: no bias to train in PyTorch")
        trained.append(bias)
        described.append(what)
    for name, ratio in scheme["weights"].items():
        w = modules[name].weight
        n_in = w.shape[1]
        keep = max(1, round(n_in * ratio))  # as sparse.apply_scheme slices it
        w.requires_grad_(True)  # before the hook: PyTorch hooks only tensors that require grad
        if keep < n_in:
            mask = torch.zeros_like(w)
            mask[:, :keep] = 1
            w.register_hook(lambda g, mask=mask: g * mask)
        trained.append(w)
        described.append(f"{name}.weight[:, :{keep}] of {n_in} input channels")
    head = model.classifier[1]
    trained += [head.weight, head.bias]
    described += ["classifier.1.weight", "classifier.1.bias"]
    for p in trained:
        p.requires_grad_(True)
    return model, trained, described


def forward_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (convs and linears), by forward hooks."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        else:
            total += output.numel() * module.in_features

    model = copy.deepcopy(model).eval()
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    return total


def percentile(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per engine (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per engine before timing (default 3)")
    parser.add_argument("--resolution", type=int, default=64, help="input resolution RES x RES (default 64)")
    parser.add_argument("--round", type=int, default=5, help="images per round: each engine runs a round's steps back to back, engines take turns (default 5)")
    parser.add_argument("--insns-k", type=int, default=4, help="QEMU counts k and 2k steps; per step = the difference / k (default 4)")
    parser.add_argument("--no-firmware", action="store_true", help="skip the Cortex-M7 build and QEMU count")
    parser.add_argument("--work", default=None, help="keep the generated project and firmware here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 warm-up, k = 1; the results file is not written")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.insns_k = 3, 1, 1
    if args.steps < 1 or args.warmup < 0 or args.insns_k < 1 or args.round < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --insns-k >= 1, --round >= 1")

    from edgewise.tiny.cbackend import CTrainer
    from edgewise.tiny.sparse import Scheme
    from edgewise.tiny.transfer import CALIBRATION_IMAGES, imagenet_backbone, load_transfer_data, make_c_project

    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    res, n_steps = args.resolution, args.warmup + args.steps
    scheme_dict = accuracy_scheme()
    scheme = Scheme.from_dict(scheme_dict)
    # at least the calibration images, so the int8 ranges are those of `edgewise tiny train`
    data = load_transfer_data("fashion-mnist", None, res, train_samples=max(n_steps, CALIBRATION_IMAGES), val_samples=1, seed=0)
    print(f"data: {data.description}", file=sys.stderr)
    model = imagenet_backbone(data.n_classes)
    pt_model, pt_params, pt_trained = torch_sparse_model(model, scheme_dict, res)
    macs = forward_macs(model, res)
    first_trained = last_convs(model, res, scheme.bias_depth)[0] if scheme.bias_depth else "the classifier"
    print("PyTorch trained tensors (last 9 convs in edgewise graph order, then the partial weights and the head):", file=sys.stderr)
    for line in pt_trained:
        print(f"  {line}", file=sys.stderr)

    work_tmp = None if args.work else tempfile.TemporaryDirectory(prefix="ew-tiny-speed-")
    work = Path(args.work or work_tmp.name)
    t0 = time.perf_counter()
    reference, project = make_c_project(model, data, scheme, LR, work / "project", RULE, qas=True, seed=0)
    c = CTrainer(project, reference.quantize_images, reference.plan)
    print(f"C project and host build: {time.perf_counter() - t0:.1f} s ({work / 'project'})", file=sys.stderr)
    # the reference trainer is the one the project was generated from; generate_c wrote its initial
    # parameters before any step, and the C library holds its own copy, so the two never interfere

    opt = torch.optim.SGD(pt_params, lr=LR)
    codes = reference.quantize_images(data.x[:n_steps])  # int8 [N, C, H, W], outside the timed region

    def step_c(i):
        return c.train_step_codes(codes[i], int(data.y[i]))

    def step_reference(i):
        return reference.train_step(data.x[i : i + 1], data.y[i : i + 1])

    def step_torch(i):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(pt_model(data.x[i : i + 1]), data.y[i : i + 1])
        loss.backward()
        opt.step()
        return loss.item()

    def step_torch_threads(i):
        torch.set_num_threads(default_threads)
        try:
            return step_torch(i)
        finally:
            torch.set_num_threads(1)

    engines = {
        "edgewise C": step_c,
        "edgewise reference (int8, Python/torch)": step_reference,
        "PyTorch eager fp32, 1 thread": step_torch,
        f"PyTorch eager fp32, {default_threads} threads (default)": step_torch_threads,
    }
    names = list(engines)
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    # rounds of --round images: each engine in turn runs the round's steps, who goes first rotating,
    # so a load change on the shared machine hits every engine alike while each still runs a few
    # steps back to back (its weights and buffers in cache, as in training). Both PyTorch rows train
    # one model: they see the images in the same order, one step each.
    rounds = [range(i, min(i + args.round, n_steps)) for i in range(0, n_steps, args.round)]
    with tqdm(total=n_steps * len(names), desc="steps (all engines)", unit="step", file=sys.stderr) as bar:
        for r, images in enumerate(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                for i in images:
                    t = time.perf_counter()
                    loss = engines[name](i)
                    dt = time.perf_counter() - t
                    if i >= args.warmup:
                        times[name].append(dt)
                    losses[name].append(loss)
                    bar.update()
    med = {n: float(np.median(times[n])) * 1e3 for n in names}
    c_ms = med["edgewise C"]
    loss_diff = max(abs(a - b) for a, b in zip(losses["edgewise C"], losses["edgewise reference (int8, Python/torch)"]))

    notes = {
        names[0]: f"generated C, host gcc -O2, 1 thread; int8 codes in, rule {RULE}, QAS",
        names[1]: "Int8Trainer.train_step, whole step (no frozen-prefix cache), 1 thread",
        names[2]: "requires_grad masks, BN frozen (eval), SGD; autograd stops below the first trained tensor",
        names[3]: f"as above, torch default threads ({default_threads})",
    }
    cpu = platform.processor() or platform.machine()
    cmd = "python benchmarks/tiny_speed.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v, d in (("steps", args.steps, 30), ("warmup", args.warmup, 3), ("resolution", res, 64), ("round", args.round, 5), ("insns_k", args.insns_k, 4)) if v != d
    ) + (" --no-firmware" if args.no_firmware else "")
    md = [
        f"# Training-step time at batch 1: ImageNet MobileNetV2-1.0 -> Fashion-MNIST at {res}x{res}, sparse scheme",
        "",
        f"Command: `{cmd}`. Machine: {os.cpu_count()} cores ({cpu}), shared and noisy (1-min load average {load:.2f} at start); "
        f"medians of {args.steps} timed steps per engine after {args.warmup} warm-up steps, the engines interleaved in rounds of "
        f"{args.round} images (each runs the round's steps back to back; who goes first rotates). Same model, scheme, images, "
        "initial weights and lr for every row.",
        f"Scheme: `{scheme.to_dict()}`, SGD lr {LR}, batch 1, 10 classes.",
        "",
        "| engine | median step (ms) | p10 - p90 (ms) | vs edgewise C | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for n in names:
        md.append(f"| {n} | {med[n]:.1f} | {percentile(times[n], 10):.1f} - {percentile(times[n], 90):.1f} | {med[n] / c_ms:.2f}x | {notes[n]} |")
    md += [
        "",
        "Notes:",
        "",
        f"- edgewise C and the reference run the same int8 step from the same initial state on the same images: largest "
        f"difference of their losses over the {n_steps} steps {loss_diff:.2e}.",
        "- PyTorch's trained tensors (the same set the scheme trains in edgewise's BN-folded graph): "
        + "; ".join(f"`{t}`" for t in pt_trained) + ". A folded conv's bias is BN's shift beta (the gradient with respect to "
        "the folded bias equals that with respect to beta); the partial weights get a full gradient from autograd, masked "
        "by a hook to their first 1/8 input channels (PyTorch computes the whole weight gradient; edgewise computes only the slice).",
        "- The reference executor runs every node of the step in Python over torch ops; `fit` skips the frozen prefix "
        "(computed once per image), which is not timed here.",
        f"- One forward pass is {macs / 1e6:.1f} M MACs (convs and the classifier); every engine runs the whole forward "
        f"and the backward from the loss down to {first_trained} (the first trained layer). edgewise C: "
        f"{c_ms * 1e6 / macs:.2f} ns per forward MAC on this host.",
    ]
    t2 = times[names[3]]
    if percentile(t2, 90) > 3 * percentile(t2, 10):
        md.append(
            f"- The default-threads PyTorch row measures this machine's load more than PyTorch: its {default_threads} OpenMP "
            f"threads meet at a barrier in every op, and while another process holds a core each barrier waits for the "
            f"scheduler (p10 {percentile(t2, 10):.1f} ms, p90 {percentile(t2, 90):.1f} ms in this run; 1-min load average "
            f"{os.getloadavg()[0]:.2f} at the end). The 1-thread rows do not have this problem."
        )

    mcu_lines, insns_line = [], "insns_per_step = n/a"
    missing = [t for t in ("arm-none-eabi-gcc", "qemu-system-arm") if shutil.which(t) is None]
    if args.no_firmware:
        mcu_lines.append("Cortex-M7: skipped (--no-firmware).")
    elif missing:
        mcu_lines.append(f"Cortex-M7: skipped ({', '.join(missing)} not found; Debian: gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm).")
    else:
        from edgewise.tiny import firmware

        print("Cortex-M7: building the firmware and counting instructions under QEMU ...", file=sys.stderr)
        t0 = time.perf_counter()
        build = firmware.build_firmware(project.dir, work / "fw", sram_bytes=256 * 1024, flash_bytes=4 * 1024 * 1024)
        k = args.insns_k
        x_codes = reference.quantize_images(data.x[: 2 * k]).numpy()
        labels = data.y[: 2 * k].numpy()
        with tqdm(total=1, desc=f"QEMU instruction count ({k} and {2 * k} steps)", file=sys.stderr) as bar:
            count = firmware.insns_per_step(build, x_codes, labels, k=k)
            bar.update()
        est_ms = count.per_item / MCU_HZ * 1e3
        mcu_lines += [
            f"Cortex-M7 (QEMU mps2-an500, the same generated C, arm-none-eabi-gcc -O2 -mcpu=cortex-m7): "
            f"{count.per_item:,.0f} instructions per training step (({count.insns_2k:,} - {count.insns_k:,}) / {count.k}; "
            f"QEMU {count.wall_s:.0f} s, build and count {time.perf_counter() - t0:.0f} s).",
            f"ESTIMATE at 216 MHz (STM32F746, the paper's board) assuming 1 instruction per cycle: {est_ms:.0f} ms per step "
            "(real Cortex-M7 CPI differs: dual issue lowers it, flash wait states and memory stalls raise it).",
            f"Firmware: SRAM used {build.sram_used:,} bytes ({build.sram_used / 1024:.1f} KiB) of a {build.sram_budget // 1024} KiB budget, "
            f"flash used {build.flash_used:,} bytes ({build.flash_used / 1024:.1f} KiB).",
        ]
        mcu_lines.append(f"{count.per_item / macs:.1f} instructions per forward MAC ({macs / 1e6:.1f} M): an upper bound on "
                         "instructions per MAC, since the step also runs the backward of the last blocks.")
        insns_line = f"insns_per_step = {count.per_item:.0f}"
    md += ["", "## Cortex-M7", "", *(f"- {line}" for line in mcu_lines)]
    final = [
        f"ratio pytorch/c step = {med[names[2]] / c_ms:.2f}",
        f"ratio reference/c step = {med[names[1]] / c_ms:.2f}",
        insns_line,
    ]
    md += ["", "```", *final, "```", ""]
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        write_text_atomic(RESULTS / "tiny_speed.md", "\n".join(md))
    print("\n".join(md[: -len(final) - 3]))
    for line in final:
        print(line)
    if work_tmp is not None:
        work_tmp.cleanup()


if __name__ == "__main__":
    main()
