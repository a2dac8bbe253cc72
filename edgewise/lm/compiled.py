"""The decode step compiled ahead of time with AOTInductor, cached on disk, weights shared.

`torch.export` traces one decode step (T = 1) with the live cache length L as a dynamic
dimension; `aoti_compile_and_package` turns it into a shared library. The package holds code
only: its constants (the quantized weights, the RoPE tables) are handed over at load time as
user-managed tensors, the very ones the eager model holds, so compiled decode and eager
prefill share one copy of the weights (on torch's own int4 kernel inductor adds small constants
of its own; those packages keep theirs, mmapped). The package therefore depends on the model's shapes,
not on its weight values: the cache key hashes the config, precision, torch version and this
runtime's source.

Export accepts a dynamic L only from 2 up, so position 0 runs with L = 2 and slot 1 masked.

First run: compiling takes about a minute, so by default a model without a cached package decodes
eagerly at once while a child process (`BackgroundCompile`: `python -m edgewise.lm.compiled`, at low
priority, detached so it outlives a short run) compiles the package into the cache; the running model
switches to it as soon as it is there, and every later run starts compiled.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from edgewise import __version__, kernels
from edgewise.lm import model as model_module
from edgewise.lm import weights as weights_module
from edgewise.lm.model import Llama
from edgewise.lm.weights import Int4Linear
from edgewise.models import cache_root

MIN_LIVE = 2


def default_cache_dir() -> Path:
    return cache_root() / "aoti"


class DecodeStep(nn.Module):
    """The exported function: (token [1], position [1], mask [1, L], caches) -> logits [1, vocab]."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, token, position, mask, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]):
        torch._check(mask.shape[-1] <= k_caches[0].shape[1])
        return self.model(token, position, mask, k_caches, v_caches)


def package_key(model: Llama) -> str:
    source = inspect.getsource(model_module) + inspect.getsource(weights_module) + inspect.getsource(DecodeStep) + inspect.getsource(compile_decode_step) + kernels.source_hash()
    layout = sorted((name, tuple(b.shape), str(b.dtype)) for name, b in model.named_buffers())
    act_bits = sorted((name, m.act_bits) for name, m in model.named_modules() if hasattr(m, "act_bits"))  # baked into the graph
    blob = json.dumps([__version__, torch.__version__, model.cfg.to_dict(), model.precision, layout, act_bits, source], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _example_args(model: Llama, capacity: int = 16):
    cache = model.new_cache(capacity)
    return (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1, MIN_LIVE), cache.keys, cache.values)


def compile_decode_step(model: Llama, package_path: Path) -> float:
    """Export and AOT-compile the decode step into `package_path` (written atomically); returns seconds."""
    from torch.export import Dim

    t0 = time.perf_counter()
    live = Dim("live", min=MIN_LIVE, max=model.cfg.context_length)
    capacity = Dim("capacity", min=MIN_LIVE, max=model.cfg.context_length)
    n = model.cfg.n_layers
    dynamic_shapes = {"token": None, "position": None, "mask": {1: live}, "k_caches": [{1: capacity}] * n, "v_caches": [{1: capacity}] * n}
    with torch.no_grad():
        exported = torch.export.export(DecodeStep(model), _example_args(model), dynamic_shapes=dynamic_shapes, strict=False)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = package_path.with_name(f".tmp-{os.getpid()}-{package_path.name}")
    try:
        # With edgewise's kernels every constant is a model buffer and the package is code only; torch's
        # int4 kernel makes inductor add constants of its own, so those packages keep theirs (mmapped).
        own_constants = any(isinstance(m, Int4Linear) for m in model.modules())
        config = {"aot_inductor.force_mmap_weights": True} if own_constants else {"aot_inductor.package_constants_in_so": False}
        # threads from omp_get_max_threads() at run time (the governor's count), not baked in at compile time
        config["cpp.dynamic_threads"] = True
        torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp), inductor_configs=config)
        os.replace(tmp, package_path)
    finally:
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - t0


class CompiledDecoder:
    """Calls the AOTInductor package with the eager model's own tensors as its constants."""

    def __init__(self, model: Llama, package_path: Path):
        self.runner = torch._inductor.aoti_load_package(str(package_path))
        # Swap every weight for the eager model's own tensor; the package keeps only the small
        # constants inductor made itself (e.g. the int4 kernel's group-size scalars).
        constants = dict(DecodeStep(model).named_buffers(remove_duplicate=False))
        packaged = set(self.runner.get_constant_fqns())
        shared = {name: t for name, t in constants.items() if name in packaged}
        if len(shared) < len([n for n in packaged if n.startswith("model.")]):
            raise RuntimeError(f"compiled package {package_path} does not match the model's weights")
        self.runner.load_constants(shared, check_full_update=len(shared) == len(packaged), user_managed=True)

    def __call__(self, token, position, mask, k_caches, v_caches) -> torch.Tensor:
        return self.runner(token, position, mask, k_caches, v_caches)


def package_path(model: Llama, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / f"decode-{package_key(model)}.pt2"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def load_or_compile(model: Llama, cache_dir: Path | None = None, log=print) -> tuple[CompiledDecoder | None, float]:
    """A compiled decoder (compiling once, here and now, if no cached package fits), and the seconds spent compiling.

    Returns (None, 0.0) with a warning where compiling is impossible; the caller then decodes eagerly.
    """
    path = package_path(model, cache_dir)
    compile_s = 0.0
    try:
        if not path.exists():
            log(f"compiling the decode step with AOTInductor (once, about a minute; cached in {path.parent}) ...")
            compile_s = compile_decode_step(model, path)
            log(f"compiled in {compile_s:.1f} s")
        return CompiledDecoder(model, path), compile_s
    except Exception as exc:  # no C++ compiler, unsupported op, a torch bug: decoding still works eagerly
        warnings.warn(f"AOTInductor compile/load failed ({_one_line(exc)}); decoding eagerly", stacklevel=2)
        return None, compile_s


def load_cached(model: Llama, cache_dir: Path | None = None) -> CompiledDecoder | None:
    """The compiled decoder if its package is cached (None if not); a package that fails to load warns once and is skipped."""
    path = package_path(model, cache_dir)
    if not path.exists():
        return None
    try:
        return CompiledDecoder(model, path)
    except Exception as exc:
        warnings.warn(f"cached decode step {path} failed to load ({_one_line(exc)}); decoding eagerly", stacklevel=2)
        return None


class BackgroundCompile:
    """The decode step compiling in a child process while this one decodes eagerly.

    The child rebuilds the model from the same GGUF and precision, checks that its package key is
    the one asked for, and compiles into the cache (atomically, as `compile_decode_step` writes). A
    lock file beside the package keeps a second run from starting a second compile. `poll()` is cheap
    and called per token; once the package is there it loads in a thread, and `decoder` is set."""

    POLL_S = 0.5

    def __init__(self, model: Llama, path: Path, proc: subprocess.Popen | None, log_path: Path):
        self.model, self.path, self.proc, self.log_path = model, path, proc, log_path
        self.decoder: CompiledDecoder | None = None
        self.failed: str | None = None
        self._loading: threading.Thread | None = None
        self._next_poll = 0.0

    @classmethod
    def start(cls, model: Llama, gguf_path: Path, precision: str, cache_dir: Path | None = None) -> "BackgroundCompile":
        path = package_path(model, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        log_path = path.with_suffix(".log")
        lock = path.with_suffix(".lock")
        proc = None
        if not _compile_running(lock):
            with open(log_path, "w") as log:
                env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1", OMP_NUM_THREADS="1")  # leave the cores to decoding
                proc = subprocess.Popen(
                    [sys.executable, "-m", "edgewise.lm.compiled", str(gguf_path), precision, str(path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,  # outlives this process: the next run starts compiled
                    preexec_fn=lambda: os.nice(10),
                )
        return cls(model, path, proc, log_path)

    def poll(self) -> CompiledDecoder | None:
        """The compiled decoder once it is compiled and loaded, else None (checks at most every POLL_S)."""
        if self.decoder is not None or self.failed is not None:
            return self.decoder
        now = time.monotonic()
        if now < self._next_poll or self._loading is not None:
            return None
        self._next_poll = now + self.POLL_S
        if self.path.exists():
            self._loading = threading.Thread(target=self._load, daemon=True)
            self._loading.start()
            return None
        exit_code = None if self.proc is None else self.proc.poll()
        if exit_code not in (None, 0):
            self.failed = f"the background compile failed (exit {exit_code}; log: {self.log_path})"
        elif (self.proc is None or exit_code == 0) and not _compile_running(self.path.with_suffix(".lock")):
            # our child left it to another process (or found nothing to do), and that one ended without a package
            self.failed = f"the background compile ended without a package (log: {self.log_path})"
        if self.failed:
            warnings.warn(self.failed + "; decoding eagerly", stacklevel=3)
        return None

    def _load(self) -> None:
        try:
            self.decoder = CompiledDecoder(self.model, self.path)
        except Exception as exc:
            self.failed = f"the compiled decode step failed to load ({_one_line(exc)})"
            warnings.warn(self.failed + "; decoding eagerly", stacklevel=2)

    def wait(self, timeout: float | None = None) -> CompiledDecoder | None:
        """Block until the child is done and the package loaded (tests, benchmarks)."""
        deadline = time.monotonic() + (timeout or 1e9)
        while self.decoder is None and self.failed is None and time.monotonic() < deadline:
            self._next_poll = 0.0
            self.poll()
            if self._loading is not None:
                self._loading.join()
            else:
                time.sleep(0.2)
        return self.decoder


def _compile_running(lock: Path) -> bool:
    """Whether a live process holds the compile lock (a stale one, of a dead process, is removed)."""
    try:
        pid = int(lock.read_text())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        lock.unlink(missing_ok=True)
        return False


def _compile_main(argv: list[str]) -> int:
    """The background compile's child: python -m edgewise.lm.compiled GGUF PRECISION PACKAGE."""
    p = argparse.ArgumentParser(prog="python -m edgewise.lm.compiled", description="Compile a model's decode step into the cache.")
    p.add_argument("gguf")
    p.add_argument("precision")
    p.add_argument("package")
    args = p.parse_args(argv)
    package = Path(args.package)
    lock = package.with_suffix(".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print(f"another process is compiling {package}", file=sys.stderr)
        return 0
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        from edgewise.gguf_io import read_gguf

        model = Llama.from_gguf(read_gguf(args.gguf), args.precision)
        if package_path(model, package.parent) != package:
            print(f"model {args.gguf} does not build the package {package.name} here; nothing compiled", file=sys.stderr)
            return 2
        if not package.exists():
            print(f"compiled {package} in {compile_decode_step(model, package):.1f} s", file=sys.stderr)
        return 0
    finally:
        lock.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(_compile_main(sys.argv[1:]))
