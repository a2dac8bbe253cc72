"""The generated C training step, built for this host and driven from Python through ctypes.

    project = generate_c(trainer, "build/tiny-c")
    c = CTrainer(project)                      # compiles ew_*.c into a shared library and loads it
    loss = c.train_step(q_image, label)        # int8 codes [C, H, W] (trainer.quantize_images)
    c.params()                                 # the trained parameters, read back from C

The host build uses the same flags as the firmware's where they decide results (RESULT_CFLAGS:
C99, no FMA contraction, IEEE fp32, no -ffast-math). The sanitized build (ASan, UBSan) is the
firmware's main built natively: `firmware.build_host(..., extra_cflags=[...])`, since a shared
library with ASan cannot be loaded into an uninstrumented Python.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgewise.errors import EdgewiseError

if TYPE_CHECKING:  # the generator pulls in torch; building and loading a project does not need it
    from edgewise.tiny.codegen import CProject

# What a build of a generated project compiles, and the flags its bit-for-bit results depend on
# (C99, no FMA contraction, IEEE fp32; the arena is read through typed pointers): the host build
# here and the firmware build (`firmware.py`) both use them.
PROJECT_SOURCES = ("ew_ops.c", "ew_model.c", "ew_flash.S")
RESULT_CFLAGS = ["-std=c99", "-O2", "-ffp-contract=off", "-fno-strict-aliasing"]
C_FLAGS = [*RESULT_CFLAGS, "-Wall", "-Wno-unused-variable"]
NP_DTYPE = {"int8": np.int8, "int32": np.int32, "float32": np.float32, "int16": np.int16}


def host_cc() -> str:
    for cc in ("cc", "gcc", "clang"):
        if shutil.which(cc):
            return cc
    raise EdgewiseError("no C compiler found: install one (Debian: apt-get install --no-install-recommends gcc)")


def _compile(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise EdgewiseError(f"compiling the generated C in {cwd} failed:\n$ {' '.join(cmd)}\n{done.stderr[-4000:]}")


def build_host_library(project: CProject) -> Path:
    """Compile the project into `libew.so` in its folder (rebuilt when a source changed)."""
    d = project.dir
    digest = hashlib.sha256(b"".join((d / f).read_bytes() for f in ("ew_ops.c", "ew_ops.h", "ew_model.c", "ew_model.h", "ew_flash.bin"))).hexdigest()[:16]
    lib = d / f"libew-{digest}.so"
    if not lib.exists():
        tmp = d / f".tmp-{lib.name}"
        _compile([host_cc(), *C_FLAGS, "-fPIC", "-shared", "-o", tmp.name, *PROJECT_SOURCES, "-lm"], d)
        tmp.rename(lib)
    return lib


class _Param(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("numel", ctypes.c_int)]


class CTrainer:
    """The C step on this host. Each instance loads its own copy of the library (its own arena and
    parameters), so two CTrainers never share state.

    `train_step(x, labels)` and `accuracy(x, labels)` take fp32 model inputs like the Python
    trainers (so `transfer.fit` drives any of them), quantized with `quantize` (the reference
    trainer's input quantization); `train_step_codes` and `infer` take int8 codes."""

    def __init__(self, project: CProject, quantize: Callable | None = None, plan=None):
        self.project, self.quantize, self.plan = project, quantize, plan
        lib = build_host_library(project)
        # a private copy: dlopen of one path twice would share the library's static state
        path = lib.with_name(f".inst-{os.getpid()}-{id(self)}-{lib.name}")
        shutil.copy(lib, path)
        try:
            self.lib = ctypes.CDLL(str(path))
        finally:
            path.unlink()
        self.lib.ew_train_step.restype = ctypes.c_float
        self.lib.ew_train_step.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.lib.ew_infer.restype = ctypes.c_int
        self.lib.ew_infer.argtypes = [ctypes.c_void_p]
        self.lib.ew_logits.restype = ctypes.POINTER(ctypes.c_float)
        self.lib.ew_param_at.restype = ctypes.POINTER(_Param)
        self.lib.ew_arena_data.restype = ctypes.POINTER(ctypes.c_uint8)
        self.lib.ew_step_count.restype = ctypes.c_uint32
        self.lib.ew_init()

    def _codes(self, x) -> np.ndarray:
        if self.quantize is None:
            raise EdgewiseError("this CTrainer has no input quantization: pass int8 codes to train_step_codes / infer")
        return np.asarray(self.quantize(x))

    def train_step(self, x, labels) -> float:
        """One step on a batch of one fp32 model input [1, C, H, W] and its label."""
        return self.train_step_codes(self._codes(x)[0], int(labels[0]))

    def accuracy(self, x, labels) -> float:
        codes = self._codes(x)
        return sum(self.infer(q)[0] == int(y) for q, y in zip(codes, labels)) / len(codes)

    def _image(self, q_image) -> np.ndarray:
        img = np.ascontiguousarray(np.asarray(q_image, dtype=np.int8).reshape(-1))
        if img.size != int(np.prod(self.project.image_shape)):
            raise EdgewiseError(f"the C model takes {self.project.image_shape} int8 images, got {img.size} values")
        return img

    def train_step_codes(self, q_image, label: int) -> float:
        img = self._image(q_image)
        return float(self.lib.ew_train_step(img.ctypes.data, int(label)))

    def infer(self, q_image) -> tuple[int, np.ndarray]:
        img = self._image(q_image)
        k = self.lib.ew_infer(img.ctypes.data)
        return k, np.ctypeslib.as_array(self.lib.ew_logits(), (self.project.n_classes,)).copy()

    def reset(self) -> None:
        self.lib.ew_init()

    @property
    def steps(self) -> int:
        return int(self.lib.ew_step_count())

    def params(self) -> dict[str, np.ndarray]:
        """The trained parameters (and master copies, as 'master:<name>'), copied out of C."""
        out = {}
        for i, p in enumerate(self.project.params):
            entry = self.lib.ew_param_at(i).contents
            buf = (ctypes.c_char * (p.numel * np.dtype(NP_DTYPE[p.dtype]).itemsize)).from_address(entry.data)
            out[p.name] = np.frombuffer(bytes(buf), dtype=NP_DTYPE[p.dtype]).reshape(p.shape)
        return out

    def arena(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.ew_arena_data(), (max(self.project.arena_bytes, 16),)).copy()
