"""The `edgewise` command: a thin layer over the Python API, one module per command family.

- `lm`: generate, chat, eval ppl (a model from RAM, a flash store, or streamed from its GGUF)
- `flash`: flash convert, flash probe
- `tiny`: tiny plan, compile, train, codegen, firmware
- `compress`: compress (a smaller GGUF)
- `tune`: tune (a model learns its user's writing: an adapter), suggest (a keyboard's next words)
- `args`: the argument types and progress bar they share

Every user-facing failure is an `EdgewiseError`, printed as one line (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from edgewise import __version__
from edgewise.cli import compress, flash, lm, tiny, tune
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
  edgewise compress smollm2-135m smol-q4_0.gguf --type Q4_0   # a smaller standard GGUF, rounded by GPTQ on calibration text
  edgewise tune --text my-notes/ --budget 64MB --out me.adapter   # learn your writing, on the device, in 64 MB
  edgewise suggest --adapter me.adapter "See you at the"          # a keyboard's next words
  edgewise tiny plan --width 0.35 --resolution 128 --scheme scheme.json --png memory.png
  edgewise tiny train --scheme scheme.json --train-samples 2000 --epochs 2
  edgewise tiny compile mbv2-w0.35 --resolution 128 --scheme scheme.json --budget 256KB
  edgewise tiny compile --search --budget 256KB --resolution 64 --data fashion-mnist
  edgewise tiny train --data mnist --epochs 2
  edgewise tiny train --data photos/ --val photos-val/ --resolution 96
"""


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

    lm.add_commands(sub)
    flash.add_commands(sub)
    tiny.add_commands(sub)
    compress.add_commands(sub)
    tune.add_commands(sub)
    return parser


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
    try:
        return args.handler(args)
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
