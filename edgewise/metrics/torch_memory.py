"""PyTorch's own memory for full fine-tuning on CPU, measured (never estimated) two ways.

The reference point for a microcontroller training engine: what eager PyTorch needs to train every
parameter of a model with SGD, batch as given (1 by default), cross-entropy, the model in train mode,
the step a user writes::

    optimizer.zero_grad(set_to_none=True)          # PyTorch's default: last step's gradients are freed
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()

1. Allocator. `torch.profiler.profile(profile_memory=True)` makes c10's CPU allocator report every
   allocation and free (its `[memory]` events: signed byte counts, nanosecond timestamps). Their running
   sum, in time order, is the tensor bytes live at each instant; each step runs inside a
   `record_function` window, so the peak during a step and the level at its start are read off that
   curve. The profiler is started *before* the model is built, so the curve counts everything the
   training needs: parameters, buffers, input, label, gradients, saved activations, temporaries,
   optimizer state. (c10 only knows the size of blocks it handed out while a profiler was on; a block
   freed during profiling that was allocated before is not in the curve, which is why the model is
   built inside the profile.) Memory that does not come from c10's allocator -- oneDNN's own scratch,
   the Python objects, the libraries' code -- is not tensor memory and not counted here; RSS sees it.

2. Process. The same steps in a fresh Python process (no profiler), `torch.set_num_threads(1)` so that
   thread pools and per-thread buffers neither add noise nor vary between runs. RSS is read from
   `/proc/self/status`: VmRSS just before the first step, VmHWM (the high-water mark) after each step,
   with the high-water mark reset to the current RSS before each step (`echo 5 > /proc/self/clear_refs`).
   `ru_maxrss` is not used: a child started by `subprocess` (vfork + exec) inherits its parent's peak
   RSS there, so from inside a big parent (pytest, a notebook) it reports the parent's size.

Both run `steps` steps (default 2: the first pays lazy initialisation -- e.g. oneDNN primitives -- and
allocates the gradients; the second is the steady state, which starts by freeing the previous
gradients) and report the maximum over steps. `measure_full_finetune` runs each measurement in its own
fresh subprocess; the model is rebuilt there from an importable "module:function" and JSON keyword
arguments, and the result comes back as JSON: nothing is pickled.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from edgewise.errors import EdgewiseError
from edgewise.metrics.memory import current_rss_mb, reset_peak_rss, rss_high_water_mb

MEMORY_EVENT = "[memory]"  # the profiler's name for an allocator event (torch.autograd.profiler_util.MEMORY_EVENT_NAME)
CPU_DEVICES = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)  # what torch's profiler counts as CPU memory
STEP_LABEL = "edgewise::train_step_"
RESULT_TAG = "EDGEWISE_TORCH_MEMORY "  # the worker's one line of JSON on stdout


@dataclass(frozen=True)
class TrainStepMemory:
    """Memory of full fine-tuning steps in eager PyTorch on CPU, in bytes; each peak the maximum over `steps` steps."""

    step_peak_bytes: int  # allocator: peak live tensor bytes during a step minus the bytes live when it began
    total_peak_bytes: int  # allocator: peak of all live tensor bytes during a step (params, buffers, input, grads, activations)
    rss_step_peak_bytes: int  # process: peak RSS during a step minus RSS just before the first step (fresh subprocess)
    rss_peak_bytes: int  # process: the subprocess's lifetime peak RSS (VmHWM; imports and model build included)
    steps: int
    param_bytes: int  # the parameters (= the gradients' bytes)
    buffer_bytes: int  # BatchNorm running statistics etc.
    step_peaks: tuple[int, ...]  # allocator, per step
    total_peaks: tuple[int, ...]
    rss_before_bytes: int  # RSS after imports, model build, input and optimizer, just before step 1
    rss_step_peaks: tuple[int, ...]  # per step, each against rss_before_bytes
    rss_anon_growth_bytes: int  # RssAnon after the last step minus before the first: heap (tensors, malloc's retained memory)
    rss_file_growth_bytes: int  # RssFile likewise: library code paged in by the first forward/backward
    rss_hwm_reset: bool  # False: /proc/self/clear_refs was not writable, so rss peaks are upper bounds
    num_threads: int = 1


@dataclass(frozen=True)
class AllocatorPeak:
    """Tensor bytes from c10's CPU allocator while a callable ran, relative to the bytes live when it started."""

    peak_bytes: int  # highest level reached
    end_bytes: int  # level at the end (what the callable left allocated)
    allocated_bytes: int  # sum of all allocations
    events: int  # allocations and frees seen


@dataclass(frozen=True)
class AllocatorSteps:
    step_peaks: tuple[int, ...]
    total_peaks: tuple[int, ...]
    param_bytes: int
    buffer_bytes: int


# ---------------------------------------------------------------- profiler trace -> live-bytes curve


def _memory_curve(prof: profile) -> tuple[list[int], list[int]]:
    """(timestamps ns, live bytes after each event): the running sum of the CPU allocator's events in time order."""
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == MEMORY_EVENT and e.device_type() in CPU_DEVICES
    ]
    events.sort(key=lambda ev: ev[0])  # stable: events of one thread are recorded in order
    times, levels, live = [], [], 0
    for t, delta in events:
        live += delta
        times.append(t)
        levels.append(live)
    return times, levels


def _windows(prof: profile, prefix: str) -> list[tuple[int, int]]:
    """(start ns, end ns) of the record_function windows whose label starts with `prefix`, in label order."""
    found = {e.name(): (e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events() if e.name().startswith(prefix)}
    return [found[name] for name in sorted(found, key=lambda n: int(n[len(prefix):]))]


def _level_and_peak(times: list[int], levels: list[int], start: int, end: int) -> tuple[int, int]:
    """Live bytes when the window opens, and the highest live bytes inside it."""
    before = [lv for t, lv in zip(times, levels) if t < start]
    base = before[-1] if before else 0
    inside = [lv for t, lv in zip(times, levels) if start <= t <= end]
    return base, max([base, *inside])


def _profiler() -> profile:
    return profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False, with_stack=False)


def allocator_peak(fn: Callable[[], Any]) -> AllocatorPeak:
    """Run `fn` under the memory profiler; the peak of c10 CPU-allocator bytes it held above the start level."""
    with _profiler() as prof:
        with record_function(STEP_LABEL + "0"):
            fn()
    times, levels = _memory_curve(prof)
    (start, end), = _windows(prof, STEP_LABEL)
    base, peak = _level_and_peak(times, levels, start, end)
    inside = [lv for t, lv in zip(times, levels) if start <= t <= end]
    deltas = [b - a for a, b in zip([base, *inside], inside)]
    return AllocatorPeak(
        peak_bytes=peak - base,
        end_bytes=(inside[-1] if inside else base) - base,
        allocated_bytes=sum(d for d in deltas if d > 0),
        events=len(inside),
    )


# ---------------------------------------------------------------- the training step


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _setup(build_model: Callable[[], nn.Module], input_shape: tuple[int, ...], n_classes: int, lr: float, momentum: float, seed: int):
    torch.manual_seed(seed)
    model = build_model()
    if not isinstance(model, nn.Module):
        raise EdgewiseError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)  # full fine-tuning: every parameter
    x = torch.randn(input_shape)
    y = torch.randint(n_classes, (input_shape[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return model, optimizer, x, y


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One step as a user writes it; returns the loss (a float, so no tensor outlives the step)."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach().item()


def profile_full_finetune(
    build_model: Callable[[], nn.Module], input_shape: tuple[int, ...], n_classes: int,
    *, steps: int = 2, lr: float = 0.01, momentum: float = 0.0, seed: int = 0,
) -> AllocatorSteps:
    """Allocator peaks of `steps` full fine-tuning steps, in this process.

    The profiler starts before `build_model()` runs, so total peaks count every tensor the training
    allocated (tensors that existed before the call are not counted, whatever they are)."""
    with _profiler() as prof:
        model, optimizer, x, y = _setup(build_model, input_shape, n_classes, lr, momentum, seed)
        for k in range(steps):
            with record_function(f"{STEP_LABEL}{k}"):
                train_step(model, optimizer, x, y)
    times, levels = _memory_curve(prof)
    windows = _windows(prof, STEP_LABEL)
    if len(windows) != steps:
        raise RuntimeError(f"the profiler recorded {len(windows)} step windows, expected {steps}")
    step_peaks, total_peaks = [], []
    for start, end in windows:
        base, peak = _level_and_peak(times, levels, start, end)
        step_peaks.append(peak - base)
        total_peaks.append(peak)
    return AllocatorSteps(
        step_peaks=tuple(step_peaks), total_peaks=tuple(total_peaks),
        param_bytes=_unique_bytes(model.parameters()), buffer_bytes=_unique_bytes(model.buffers()),
    )


# ---------------------------------------------------------------- RSS


def _hwm_bytes() -> int:
    """VmHWM: this process's own peak RSS (unlike ru_maxrss, not inherited from the parent at exec)."""
    return round(rss_high_water_mb() * 2**20)


def _rss_bytes() -> int:
    return round(current_rss_mb() * 2**20)


def _rss_parts() -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes: heap and other private memory, and mapped files (the libraries' code)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line.split(":")[0]] = int(line.split()[1]) * 1024
    return parts.get("RssAnon", 0), parts.get("RssFile", 0)


def rss_full_finetune(
    build_model: Callable[[], nn.Module], input_shape: tuple[int, ...], n_classes: int,
    *, steps: int = 2, lr: float = 0.01, momentum: float = 0.0, seed: int = 0,
) -> dict[str, Any]:
    """RSS of `steps` steps in this process -- meaningful in a fresh one (measure_full_finetune's worker)."""
    model, optimizer, x, y = _setup(build_model, input_shape, n_classes, lr, momentum, seed)
    gc.collect()
    lifetime_peak = _hwm_bytes()
    rss_before = _rss_bytes()
    anon_before, file_before = _rss_parts()
    peaks, resets = [], []
    for _ in range(steps):
        resets.append(reset_peak_rss())
        train_step(model, optimizer, x, y)
        peaks.append(_hwm_bytes())
    anon_after, file_after = _rss_parts()
    return {
        "rss_before_bytes": rss_before,
        "rss_anon_growth_bytes": anon_after - anon_before,
        "rss_file_growth_bytes": file_after - file_before,
        "rss_step_peaks": [p - rss_before for p in peaks],
        "rss_peak_bytes": max(lifetime_peak, *peaks),
        "rss_hwm_reset": all(resets),
    }


# ---------------------------------------------------------------- subprocess driver


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """"package.module:function" (the function may be dotted, e.g. "mod:Class.build") -> the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EdgewiseError(f"model factory {spec!r}: expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise EdgewiseError(f"model factory {spec!r}: {exc}") from exc
    if not callable(obj):
        raise EdgewiseError(f"model factory {spec!r} is not callable")
    return obj


def _worker_main() -> None:
    """Entry point of the subprocess: argv[1] is the JSON job; one tagged JSON line goes to stdout."""
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["num_threads"])
    factory = resolve_factory(job["factory"])
    kwargs = job["kwargs"]
    args = (lambda: factory(**kwargs), tuple(job["input_shape"]), job["n_classes"])
    opts = {k: job[k] for k in ("steps", "lr", "momentum", "seed")}
    if job["mode"] == "allocator":
        result = asdict(profile_full_finetune(*args, **opts))
    else:
        result = rss_full_finetune(*args, **opts)
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")


def _run_worker(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ)
    # the parent's import path (the package, the user's factory module), for a child started elsewhere
    env["PYTHONPATH"] = os.pathsep.join([p or os.getcwd() for p in sys.path] + [env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(job["num_threads"])
    code = "from edgewise.metrics.torch_memory import _worker_main; _worker_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        raise EdgewiseError(f"measuring {job['factory']} ({job['mode']}) took over {timeout_s:.0f} s") from exc
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EdgewiseError(f"measuring {job['factory']} ({job['mode']}) failed, exit {proc.returncode}: {tail[:300]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def measure_full_finetune(
    model_factory: str,
    factory_kwargs: Mapping[str, Any] | None = None,
    input_shape: tuple[int, ...] = (1, 3, 128, 128),
    n_classes: int | None = None,
    *,
    steps: int = 2,
    lr: float = 0.01,
    momentum: float = 0.0,
    seed: int = 0,
    num_threads: int = 1,
    timeout_s: float = 600.0,
) -> TrainStepMemory:
    """Measure full fine-tuning of `model_factory(**factory_kwargs)` in two fresh subprocesses.

    model_factory: "package.module:function" returning an nn.Module, e.g. "edgewise.tiny.models:mobilenet_v2";
    factory_kwargs: JSON-serializable keyword arguments, e.g. {"width": 0.35, "n_classes": 10};
    n_classes: the label range (default: factory_kwargs["n_classes"]).
    One subprocess profiles the allocator, the other (no profiler) measures RSS; see the module docstring."""
    kwargs = dict(factory_kwargs or {})
    if n_classes is None:
        if "n_classes" not in kwargs:
            raise EdgewiseError("measure_full_finetune: give n_classes (it is not among the factory's kwargs)")
        n_classes = int(kwargs["n_classes"])
    if steps < 1 or len(input_shape) < 1:
        raise EdgewiseError("measure_full_finetune: steps >= 1 and an input shape with a batch dimension")
    resolve_factory(model_factory)  # fail here, with a clear message, not in the child
    job = {
        "factory": model_factory, "kwargs": kwargs, "input_shape": list(input_shape), "n_classes": n_classes,
        "steps": steps, "lr": lr, "momentum": momentum, "seed": seed, "num_threads": num_threads,
    }
    try:
        json.dumps(job)
    except TypeError as exc:
        raise EdgewiseError(f"measure_full_finetune: factory kwargs must be JSON values ({exc})") from exc
    alloc = _run_worker({**job, "mode": "allocator"}, timeout_s)
    rss = _run_worker({**job, "mode": "rss"}, timeout_s)
    return TrainStepMemory(
        step_peak_bytes=max(alloc["step_peaks"]),
        total_peak_bytes=max(alloc["total_peaks"]),
        rss_step_peak_bytes=max(rss["rss_step_peaks"]),
        rss_peak_bytes=rss["rss_peak_bytes"],
        steps=steps,
        param_bytes=alloc["param_bytes"],
        buffer_bytes=alloc["buffer_bytes"],
        step_peaks=tuple(alloc["step_peaks"]),
        total_peaks=tuple(alloc["total_peaks"]),
        rss_before_bytes=rss["rss_before_bytes"],
        rss_step_peaks=tuple(rss["rss_step_peaks"]),
        rss_anon_growth_bytes=rss["rss_anon_growth_bytes"],
        rss_file_growth_bytes=rss["rss_file_growth_bytes"],
        rss_hwm_reset=rss["rss_hwm_reset"],
        num_threads=num_threads,
    )
