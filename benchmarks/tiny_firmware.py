"""The Fashion-MNIST transfer task trained on an emulated Cortex-M7 inside 256 KB of SRAM.

Runs `edgewise tiny firmware --run --check-host` with the transfer task of
`benchmarks/tiny_accuracy.py` (ImageNet MobileNetV2-1.0, 64x64, its sparse scheme, lr 0.001,
stochastic rounding, QAS): generates the C, links it for QEMU's mps2-an500 with RAM = 256 KB,
trains on the training images in QEMU, evaluates, checks the native build of the same program
ends with identical parameters, and counts instructions per step. Writes the whole transcript to
benchmarks/results/tiny_firmware.md.

    python benchmarks/tiny_firmware.py [--train-samples 300] [--val-samples 300]

QEMU runs about 300-400 million guest instructions a second here, so a step of the 64x64 model
takes seconds: the default subset keeps a run near half an hour.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

from edgewise import cli
from edgewise.files import write_text_atomic

RESULTS = Path(__file__).parent / "results"
SCHEME = {"bias_depth": 9, "weights": {"features.18.0": 0.125, "features.17.conv.0.0": 0.125}}  # benchmarks/tiny_accuracy.py


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-samples", type=int, default=300)
    parser.add_argument("--val-samples", type=int, default=300)
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="edgewise-fw-"))
    work.mkdir(parents=True, exist_ok=True)
    scheme = work / "scheme.json"
    scheme.write_text(json.dumps(SCHEME))
    argv = ["tiny", "firmware", "--scheme", str(scheme), "--resolution", "64", "--lr", "0.001", "--sram", "256KB", "--run", "--check-host",
            "--train-samples", str(args.train_samples), "--val-samples", str(args.val_samples), "--out", str(work / "fw")]
    log = io.StringIO()
    with contextlib.redirect_stdout(Tee(sys.stdout, log)):
        rc = cli.main(argv)
    if rc:
        return rc
    md = ["# Tiny training on an emulated Cortex-M7 (QEMU mps2-an500), 256 KB of SRAM", "",
          f"Command: `python benchmarks/tiny_firmware.py --train-samples {args.train_samples} --val-samples {args.val_samples}`, i.e. "
          f"`edgewise {' '.join(a if not a.startswith(str(work)) else a.replace(str(work), 'WORK') for a in argv)}` with scheme `{json.dumps(SCHEME)}`.", "",
          "```", log.getvalue().rstrip(), "```", ""]
    write_text_atomic(RESULTS / "tiny_firmware.md", "\n".join(md))
    print(f"wrote {RESULTS / 'tiny_firmware.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
