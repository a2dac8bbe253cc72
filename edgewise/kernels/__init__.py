"""Native kernels, built on first use with the system C++ compiler and cached.

`quant_matmul_ops()` returns `torch.ops.edgewise` once `quant_matmul.cpp`, `kquant_matmul.cpp` and `flash_ffn.cpp` are built and loaded, or
None (with a warning) where it cannot be: no AVX2/FMA/F16C, no compiler. Callers then use
torch's own int4/int8 kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "quant_matmul.cpp", HERE / "kquant_matmul.cpp", HERE / "flash_ffn.cpp")
HEADERS = (HERE / "blocks.h",)  # the block formats every kernel includes
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")


@functools.cache
def exact_rows() -> int:
    """Batches of up to this many rows are computed row by row, each bit for bit as decode's one row (batch
    invariance): blocks.h's EXACT_ROWS, read from there so that the number has one definition."""
    import re

    return int(re.search(r"constexpr int64_t EXACT_ROWS = (\d+);", (HERE / "blocks.h").read_text()).group(1))


def cpu_flags() -> set[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def cpu_supports_kernels() -> bool:
    return all(f in cpu_flags() for f in REQUIRED_CPU_FLAGS)


BASE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # AVX2 + FMA + F16C: the kernels' one instruction set


def build_flags() -> list[str]:
    """Compiler flags: BASE_FLAGS (a wider instruction set would need kernels tested on a CPU that has it); plus
    AVX-VNNI where this CPU has it, for one fused instruction that gives the same bits as the two it replaces
    (blocks.h, add_madd), so every test holds on both builds."""
    return BASE_FLAGS + (["-mavxvnni"] if "avx_vnni" in cpu_flags() else [])


def source_hash(flags: list[str] | None = None) -> str:
    """The cached build's name: the sources and the flags they are built with (default `build_flags()`)."""
    blob = b"".join(path.read_bytes() for path in SOURCES + HEADERS) + " ".join(build_flags() if flags is None else flags).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@functools.cache
def quant_matmul_ops():
    """torch.ops.edgewise with q4_1_linear, q8_0_linear, kquant_linear, kquant_rows and flash_ffn, or None where they cannot be built here."""
    if os.environ.get("EDGEWISE_NO_NATIVE") == "1":
        return None
    if not cpu_supports_kernels():
        return None
    from torch.utils import cpp_extension

    flags = build_flags()
    attempts = [flags] if flags == BASE_FLAGS else [flags, BASE_FLAGS]  # BASE_FLAGS again: a compiler too old for AVX-VNNI
    for k, attempt in enumerate(attempts):
        try:
            cpp_extension.load(
                name=f"edgewise_quant_matmul_{source_hash(attempt)}",
                sources=[str(source) for source in SOURCES],
                extra_cflags=attempt,
                extra_include_paths=[str(HERE)],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            return torch.ops.edgewise
        except Exception as exc:  # no compiler, no ninja, a build error
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if k + 1 < len(attempts):
                warnings.warn(f"the AVX-VNNI build of the native kernels failed ({why}); building them for AVX2 alone", stacklevel=2)
            else:
                warnings.warn(f"native quantized kernels unavailable ({why}); using torch's int4/int8 kernels", stacklevel=2)
    return None
