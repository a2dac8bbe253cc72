"""K-quant kernel speed per format: one matrix of each K-quant type on edgewise's kernel
(`KQuantLinear`, int8 and int16 activations) against the same weights dequantized to bf16 on
torch's `F.linear` (the path a type without a kernel takes), for a decode row and an 8-row batch.

The matrix is the 1.5B model's FFN shape (8960 x 1536, the gate/up projection) filled with random
codes and scales under small finite fp16 super-scales: speed does not depend on the values. Each
timing is the median of --repeats calls after a warm-up, all formats interleaved round by round so
that drifts in machine speed hit every format alike.

    python benchmarks/kquant.py                 # writes benchmarks/results/kquant.md

Its last lines: `ratio bf16/edgewise int8 decode row [TYPE] = X` per type (above 1: the kernel is faster).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from edgewise.files import write_text_atomic
from edgewise.kernels import quant_matmul_ops
from edgewise.lm.weights import KQUANT_TYPES, KQuantLinear

ROOT = Path(__file__).resolve().parent.parent
# byte offsets of each type's fp16 super-scales inside its super-block (kernels/blocks.h): d, and dmin where it has one
SUPER_SCALES = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def random_matrix(qtype: QT, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of k // 256 super-blocks: random bytes, then finite super-scales of 0.01 in magnitude."""
    _, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    for at in SUPER_SCALES[qtype]:
        raw[..., at : at + 2] = np.full(raw.shape[:2], 0.01, dtype=np.float16)[..., None].view(np.uint8)
    return raw.reshape(n, -1)


def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--n", type=int, default=8960, help="output rows (default 8960)")
    ap.add_argument("--k", type=int, default=1536, help="inputs, a multiple of 256 (default 1536)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=100, help="timed calls per point and round (default 100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="kquant", help="report stem under benchmarks/results (default kquant)")
    args = ap.parse_args(argv)
    if args.k % 256:
        raise SystemExit(f"--k {args.k}: must be a multiple of 256 (a K-quant super-block)")
    if quant_matmul_ops() is None:
        raise SystemExit("the native kernels are not built on this machine (AVX2, FMA, F16C and a C++ compiler are needed)")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    layers = {}
    for qtype in KQUANT_TYPES:
        raw = random_matrix(qtype, args.n, args.k, rng)
        layers[qtype] = {bits: KQuantLinear.from_raw(raw, qtype, args.k, bits) for bits in (8, 16)}
        layers[qtype]["bf16"] = torch.from_numpy(quants.dequantize(raw, qtype)).to(torch.bfloat16)
    xs = {rows: torch.randn(rows, args.k) for rows in (1, 8)}
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for qtype, paths in layers.items():
            for rows, x in xs.items():
                for path, layer in paths.items():
                    if path == "bf16":
                        fn = lambda x=x, w=layer: F.linear(x.to(torch.bfloat16), w)  # noqa: E731
                    else:
                        fn = lambda x=x, layer=layer: layer(x)  # noqa: E731
                    times.setdefault((qtype, rows, path), []).append(median_ms(fn, args.repeats))
    med = {key: statistics.median(v) for key, v in times.items()}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        f"# K-quant kernel speed per format ({args.n} x {args.k}, {args.threads} threads)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; commit {commit}.",
        f"Command: `python benchmarks/kquant.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        f"Random codes and scales (speed does not depend on them); medians over {args.rounds} interleaved rounds of {args.repeats} calls.",
        "",
        "| type | MB | rows | edgewise int8 ms | edgewise int16 ms | bf16 dequantized ms | bf16 / int8 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for qtype, paths in layers.items():
        mb = paths[8].raw.numel() / 1e6
        for rows in xs:
            i8, i16, bf = med[(qtype, rows, 8)], med[(qtype, rows, 16)], med[(qtype, rows, "bf16")]
            lines.append(f"| {qtype.name} | {mb:.1f} | {rows} | {i8:.3f} | {i16:.3f} | {bf:.3f} | {bf / i8:.2f} |")
    lines += ["", f"bf16 holds {args.n * args.k * 2 / 1e6:.1f} MB for every type.", ""]
    lines += [f"ratio bf16/edgewise int8 decode row [{qtype.name}] = {med[(qtype, 1, 'bf16')] / med[(qtype, 1, 8)]:.2f}" for qtype in layers]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / f"{args.out}.md"
    write_text_atomic(out, text)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
