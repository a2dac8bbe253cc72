"""`edgewise compress`: a model made smaller for the device, written as a standard GGUF (edgewise and llama.cpp run it)."""

from __future__ import annotations

import argparse
import sys

from edgewise.cli.args import number, positive_float, progress_bar, size_in_bytes
from edgewise.sizes import UNITS

MB = UNITS["m"]  # 2^20 bytes, as --size counts them


def quant_type(text: str):
    """An argparse type: a block format the compressor writes (Q4_K, q3_k, ...)."""
    from gguf import GGMLQuantizationType as QT

    from edgewise.compress.blocks import FORMATS

    qtype = QT.__members__.get(text.upper())
    if qtype not in FORMATS:
        raise argparse.ArgumentTypeError(f"unknown type '{text}': choose one of {', '.join(q.name for q in FORMATS)}")
    return qtype


def add_commands(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="quantize a model into a smaller standard GGUF, rounded by GPTQ on calibration text",
        description="Quantize MODEL into OUT.gguf, a standard GGUF that edgewise and llama.cpp both run. Each matrix is "
        "dequantized to fp32 (the reference) and written in --type's own block format; only the choice of scales and mins "
        "is smarter: scales searched per block to minimise the squared error weighted by each input column's mean square on "
        "--calib text (llama.cpp's importance matrix, computed here by edgewise's own forward), and codes rounded by GPTQ "
        "under each layer's Hessian from the same text (one fp32 [in, in] matrix per distinct layer input is held: 0.4 GB "
        "for SmolLM2-135M, 9.8 GB for Qwen2.5-Coder-1.5B). Vectors stay as they are, "
        "the output head stays at Q6_K or better, and a matrix whose rows are no whole number of 256-blocks takes a "
        "32-element format of about the same size (the plan table says which).\n\n"
        "With --size or --bpw instead of --type, each matrix gets its own type (mixed precision): every type below the "
        "source's own bytes is quantized, each tensor's sensitivity is measured (the KL divergence of the model's "
        "next-token distribution, on --sensitivity-tokens of the calibration text, when that tensor alone takes its "
        "smallest type; larger types predicted from it by their rounding error), and the types with the least summed "
        "KL that fit the size are chosen. The plan table prints each choice with its predicted KL. A size out of reach "
        "is refused with the reachable range. The measurement (about two hours for a 1.5B model on 2 cores) is kept in OUT.gguf.rungs/ as "
        "it goes, so a rerun of an interrupted command resumes it; the folder is removed once OUT.gguf is written.\n\n"
        "--prune-ffn, --prune-heads and --drop-layers make the model smaller first (structured pruning: a dense model that any runtime "
        "runs faster), --distill-steps recovers some of what pruning cost (a short fine-tune against the source's "
        "next-token distribution on --calib); then the type, size or bpw quantizes the result, calibrated on it. "
        "Pruning alone keeps the source's types.\n\n"
        "Ends with a line `out = PATH size_mb = X bpw = Y` (the file's MB of 2^20 bytes, as --size counts them; bits "
        "per weight of the tensors' bytes).",
        epilog="examples:\n  edgewise compress smollm2-135m smol-q4_0.gguf --type Q4_0      # several minutes on 2 cores\n"
        "  edgewise compress smollm2-135m smol-84.gguf --size 84MB       # mixed precision, about 15 minutes\n"
        "  edgewise compress smollm2-135m smol-pruned.gguf --prune-ffn 0.33 --drop-layers 6 --distill-steps 100 --type Q4_0   # ~15 min\n"
        "  edgewise compress ~/models/model.gguf small.gguf --type Q4_K --calib my_text.txt\n"
        "  edgewise eval ppl --model smol-q4_0.gguf --text austen --ctx 512 --max-tokens 8192",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="an embedded model's name or a GGUF file")
    p.add_argument("out", metavar="OUT.gguf", help="the file to write (appears whole or not at all)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--type", dest="qtype", type=quant_type, metavar="TYPE", help="one block format for every matrix: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0 or Q8_0")
    target.add_argument("--size", type=size_in_bytes, metavar="SIZE", help="the output file's size, e.g. 84MB (2^20 bytes a MB): a type per matrix")
    target.add_argument("--bpw", type=positive_float, metavar="BITS", help="bits per weight of the tensors, e.g. 4.5: a type per matrix")
    p.add_argument("--calib", default="shakespeare", metavar="shakespeare|austen|FILE|none", help="calibration text (default shakespeare); none: plain squared error")
    p.add_argument("--calib-tokens", type=number(int, 1024), default=8192, help="calibration tokens, in windows of 512 (default 8192)")
    p.add_argument(
        "--rounding", choices=("gptq", "search", "plain"), default="gptq",
        help="gptq (default): columns rounded one at a time, each one's error passed on to the columns not yet rounded, "
        "under the layer's calibration Hessian (GPTQ); search: each weight to its nearest grid point; plain: min-max "
        "scales, nearest points, no calibration (the baseline)",
    )
    shape = p.add_argument_group("pruning and distillation (before quantization)")
    shape.add_argument("--prune-ffn", type=number(float, 0.0, high=0.95), default=0.0, metavar="FRACTION",
                       help="remove this share of every FFN's neurons, the least important by E[h^2] * |W_down column|^2 on --calib (kept: a multiple of 256 where the width allows)")
    shape.add_argument("--prune-heads", type=number(float, 0.0, high=0.95), default=0.0, metavar="FRACTION",
                       help="remove this share of every layer's query heads, as many from each group that shares a K/V head (at least one "
                       "stays a group), the least important by E|W_o z_h|^2 on --calib; the K/V heads stay")
    shape.add_argument("--drop-layers", type=number(int, 0), default=0, metavar="N",
                       help="remove the N layers whose skipping alone changes the model's output least (KL on --calib)")
    shape.add_argument("--distill-steps", type=number(int, 0), default=0, metavar="N",
                       help="then train the pruned model's matrices N steps (a window of 256 tokens each) to match the source's "
                       "next-token distribution (KL); checkpointed to OUT.gguf.distill, so a rerun resumes")
    shape.add_argument("--distill-lr", type=positive_float, default=None, help="AdamW's peak learning rate (default 1e-4, which suits SmolLM2-135M; on Qwen2.5-Coder-1.5B it raised the KL "
                       "it trains against, and 1e-5 lowered it: give about 1e-5 for a model of a billion weights or more)")
    p.add_argument("--sensitivity-tokens", type=number(int, 16), default=512, help="with --size/--bpw: calibration tokens each tensor's KL is measured on (default 512)")
    p.set_defaults(handler=cmd_compress)


def cmd_compress(args) -> int:
    from edgewise.compress.pipeline import compress

    calib = None if args.rounding == "plain" or args.calib.lower() == "none" else args.calib
    if calib is None and args.calib.lower() != "none" and (args.qtype is None or args.prune_ffn or args.prune_heads or args.drop_layers or args.distill_steps):
        calib = args.calib  # mixed plans, pruning and distillation read calibration text even when rounding plainly
    result = compress(
        args.model,
        args.out,
        args.qtype,
        calib=calib,
        calib_tokens=args.calib_tokens,
        rounding=args.rounding,
        size=args.size,
        bpw=args.bpw,
        sensitivity_tokens=args.sensitivity_tokens,
        log=lambda msg: print(msg, file=sys.stderr),
        calib_progress=progress_bar("calibrating", unit="window"),
        progress=progress_bar("quantizing", unit="weight"),
        sensitivity_progress=progress_bar("sensitivity", unit="tensor"),
        prune_ffn=args.prune_ffn,
        prune_heads=args.prune_heads,
        drop_layers=args.drop_layers,
        distill_steps=args.distill_steps,
        **({} if args.distill_lr is None else {"distill_lr": args.distill_lr}),  # else the library's default (distill.DISTILL_LR)
        distill_progress=progress_bar("distilling", unit="step", postfix=("KL",)),
        teacher_progress=progress_bar("teacher's answers", unit="layer"),
    )
    print(f"{result.source_bytes / MB:.1f} MB -> {result.out_bytes / MB:.1f} MB ({result.out_bytes / result.source_bytes:.2f}x)"
          f", {args.rounding} rounding{f', calibrated on {result.calib_tokens} tokens of {calib}' if result.calib_tokens else ', no calibration'}", file=sys.stderr)
    print(f"out = {result.out} size_mb = {result.out_bytes / MB:.2f} bpw = {result.bits_per_weight:.3f}")
    return 0

