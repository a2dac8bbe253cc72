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
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
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

MIN_LIVE = 2


def default_cache_dir() -> Path:
    root = os.environ.get("EDGEWISE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgewise")
    return Path(root) / "aoti"


class DecodeStep(nn.Module):
    """The exported function: (token [1], position [1], mask [1, L], caches) -> logits [1, vocab]."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, token, position, mask, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]):
        torch._check(mask.shape[-1] <= k_caches[0].shape[1])
        return self.model(token, position, mask, k_caches, v_caches)


def package_key(model: Llama) -> str:
    source = inspect.getsource(model_module) + inspect.getsource(weights_module) + inspect.getsource(DecodeStep) + kernels.source_hash()
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


def load_or_compile(model: Llama, cache_dir: Path | None = None, log=print) -> tuple[CompiledDecoder | None, float]:
    """A compiled decoder (compiling once if no cached package fits), and the seconds spent compiling.

    Returns (None, 0.0) with a warning where compiling is impossible; the caller then decodes eagerly.
    """
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / f"decode-{package_key(model)}.pt2"
    compile_s = 0.0
    try:
        if not path.exists():
            log(f"compiling the decode step with AOTInductor (once, about a minute; cached in {path.parent}) ...")
            compile_s = compile_decode_step(model, path)
            log(f"compiled in {compile_s:.1f} s")
        return CompiledDecoder(model, path), compile_s
    except Exception as exc:  # no C++ compiler, unsupported op, a torch bug: decoding still works eagerly
        warnings.warn(f"AOTInductor compile/load failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); decoding eagerly", stacklevel=2)
        return None, compile_s
