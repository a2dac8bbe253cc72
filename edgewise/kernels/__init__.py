"""Native kernels, built on first use with the system C++ compiler and cached.

`quant_matmul_ops()` returns `torch.ops.edgewise` once `quant_matmul.cpp` and `flash_ffn.cpp` are built and loaded, or
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

SOURCES = (Path(__file__).with_name("quant_matmul.cpp"), Path(__file__).with_name("flash_ffn.cpp"))
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")


def cpu_supports_kernels() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return all(f in flags for f in REQUIRED_CPU_FLAGS)


def source_hash() -> str:
    return hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES)).hexdigest()[:12]


@functools.cache
def quant_matmul_ops():
    """torch.ops.edgewise with q4_1_linear, q8_0_linear and flash_ffn, or None where they cannot be built here."""
    if os.environ.get("EDGEWISE_NO_NATIVE") == "1":
        return None
    if not cpu_supports_kernels():
        return None
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=f"edgewise_quant_matmul_{source_hash()}",
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a build error
        warnings.warn(f"native quantized kernels unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); using torch's int4/int8 kernels", stacklevel=2)
        return None
    return torch.ops.edgewise
