"""Unstructured and 2:4 sparsity on this CPU: do they save time or memory? Measured, against the dense matmul.

For the FFN matrices of SmolLM2-135M (gate|up 3072x576, down 576x1536) and Qwen2.5-Coder-1.5B (gate|up
17920x1536, down 1536x8960), random fp32 weights with half their entries zeroed:
- unstructured: the smallest half by magnitude anywhere (Wanda/SparseGPT's pattern) in torch's CSR format;
- 2:4: the two smallest of every 4 consecutive inputs (NVIDIA's pattern). torch's semi-structured kernels
  (`to_sparse_semi_structured`) run on CUDA only, so on a CPU a 2:4 matrix is just another CSR matrix;
- dense: the same matrix, zeros stored (what a runtime does without a sparse kernel).
Each is timed as decode (one token) and prefill (128 tokens): the median of --reps calls, on a quiet machine and
with a competing process spinning on one core. Bytes are the stored weights (CSR: values, column indices, row
pointers).

    python benchmarks/sparsity_cpu.py          # about a minute

Writes benchmarks/results/sparsity_cpu.md; its last line: `ratio time sparse/dense at 50% [decode, SHAPE] = X`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from edgewise.files import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"SmolLM2 gate|up": (3072, 576), "SmolLM2 down": (576, 1536), "Qwen-1.5B gate|up": (17920, 1536), "Qwen-1.5B down": (1536, 8960)}


def unstructured(w: torch.Tensor) -> torch.Tensor:
    cut = w.abs().flatten().kthvalue(w.numel() // 2).values
    return torch.where(w.abs() > cut, w, torch.zeros(()))


def two_of_four(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, 4)
    keep = groups.abs().argsort(-1)[..., 2:]  # the two largest of every four
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(w.shape)


def csr_bytes(m: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (m.values(), m.col_indices(), m.crow_indices()))


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def measure(reps: int) -> list[tuple]:
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        for pattern, sparse in (("unstructured 50%", unstructured(w)), ("2:4", two_of_four(w))):
            csr = sparse.to_sparse_csr()
            for phase, t in (("decode", 1), ("prefill", 128)):
                x = torch.randn(k, t)
                dense_s = median_seconds(lambda: sparse @ x, reps)
                sparse_s = median_seconds(lambda: csr @ x, reps)
                rows.append((name, f"{n}x{k}", pattern, phase, dense_s, sparse_s, sparse.numel() * 4, csr_bytes(csr)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    quiet = measure(args.reps)
    stop = mp.Event()
    busy = mp.Process(target=spin, args=(stop,), daemon=True)
    busy.start()
    try:
        loaded = measure(args.reps)
    finally:
        stop.set()
        busy.join()
    lines = [
        "# Unstructured and 2:4 sparsity on this CPU",
        "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, 2 threads. Random fp32 weights, half of them zero; "
        f"median of {args.reps} calls. `dense`: the same zeros stored and multiplied (torch's matmul); `CSR`: torch's "
        "sparse CSR matmul (the only sparse kernel torch has on a CPU: its 2:4 semi-structured kernels are CUDA-only). "
        "`busy`: the same with another process spinning on one of the 2 cores.",
        "",
        "| matrix | shape | pattern | phase | dense ms | CSR ms | CSR/dense | busy: dense ms | busy: CSR ms | busy: CSR/dense | dense MB | CSR MB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for q, b in zip(quiet, loaded):
        name, shape, pattern, phase, d, s, dbytes, sbytes = q
        lines.append(f"| {name} | {shape} | {pattern} | {phase} | {d * 1e3:.3f} | {s * 1e3:.3f} | {s / d:.2f} | {b[4] * 1e3:.3f} | {b[5] * 1e3:.3f} | {b[5] / b[4]:.2f} | {dbytes / 1e6:.1f} | {sbytes / 1e6:.1f} |")
    lines += ["", "At 50% the CSR format stores 4 bytes of value and 8 of column index per kept weight: 1.5x the dense bytes.",
              "A quantized model is worse off still: its dense weights are 4-5 bits, and no GGUF block format has a sparse layout.", ""]
    tail = []
    for q in quiet:
        if q[3] == "decode" and q[2] == "unstructured 50%":
            tail.append(f"ratio time sparse/dense at 50% [decode, {q[0]} {q[1]}] = {q[5] / q[4]:.2f}")
    lines += ["```", *tail, "```", ""]
    write_text_atomic(ROOT / "benchmarks" / "results" / "sparsity_cpu.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
