"""A streaming plan saved as a folder: what `edgewise flash convert STORE --model M --budget 900MB` writes, and
`edgewise generate|eval ppl --flash STORE` runs (`StreamingLanguageModel.from_store`).

    STORE/
      plan.md        the residency plan as a table, for people (what stays in RAM, what streams, MB per token)
      probe.json     optional: this disk's read throughput, from `edgewise flash probe STORE` (the bound uses it)
      manifest.json  written last: format, version, the GGUF (name, path, bytes, sha256), the budget, the ring's
                     depth, the resident parts by name, and the plan's figures

The streamed weights are read from the GGUF itself: its FFN tensors lie layer by layer (llama.cpp writes a
block's tensors together), so a layer's streamed bytes are already one or a few long runs, and a copy would
double the disk space for no faster reads. The store pins that GGUF by size and sha256: a store opened over
another file, or over a changed one, is refused. The plan is rebuilt from the names at open and checked
against the budget again.

This is the K-quant models' store (Qwen2.5-Coder-1.5B's Q4_K/Q6_K FFN). The bundled store of
`edgewise.flash.store` (Q4_1 neurons regrouped by co-activation, with predictors) is the first flash engine's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgewise.errors import EdgewiseError
from edgewise.files import atomic_dir, recover_dir
from edgewise.flash.residency import ResidencyPlan, model_parts, plan_from_names, plan_residency
from edgewise.flash.store import sha256_file
from edgewise.gguf_io import GGUFFile, read_gguf

FORMAT = "edgewise-stream-plan"
VERSION = 1
MANIFEST = "manifest.json"
PLAN_TABLE = "plan.md"


def manifest_format(store: str | os.PathLike) -> str | None:
    """The `format` field of STORE/manifest.json, or None where there is none to read (the opener then says why)."""
    try:
        manifest = json.loads((Path(store) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def _model_path(name: str, file: str) -> Path:
    """The GGUF a manifest names: an embedded model is found again by name (its assembled file may have moved with
    the cache), any other by its path."""
    from edgewise.models import EMBEDDED_MODELS, resolve_model

    return resolve_model(name) if name in EMBEDDED_MODELS else Path(file)


@dataclass
class PlanStore:
    path: Path
    manifest: dict
    model_path: Path
    gguf: GGUFFile
    plan: ResidencyPlan

    @classmethod
    def write(cls, store: str | os.PathLike, model: str | os.PathLike | None, budget: str | int, ring_depth: int = 2,
              progress: Callable[[int, int], None] | None = None) -> "PlanStore":
        """Plan `model` (an embedded name or a GGUF path; None: the default) for `budget` (a size or a share of the
        weights) and save the plan; the store appears whole or not at all."""
        from edgewise.models import DEFAULT_MODEL, resolve_model
        from edgewise.sizes import parse_size

        parse_size(budget, of=1, what="--budget")  # the form, before the model is read
        name = DEFAULT_MODEL if model is None else str(model)
        path = resolve_model(name).resolve()
        gguf = read_gguf(path)
        parts = model_parts(gguf)
        weights = sum(p.nbytes for p in parts)
        plan = plan_residency(parts, parse_size(budget, of=weights, what="--budget"), ring_depth)
        if not plan.streamed:
            raise EdgewiseError(f"a budget of {plan.budget_bytes / 1e6:.0f} MB holds all of {path.name}'s weights: nothing to stream; "
                                f"run it in RAM (edgewise generate --model {name}) or give a smaller --budget")
        digest = sha256_file(path, progress)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model": {"name": name, "file": str(path), "bytes": path.stat().st_size, "sha256": digest},
            "budget_bytes": plan.budget_bytes,
            "ring_depth": plan.ring_depth,
            "resident": [p.name for p in plan.resident],
            "figures": {  # for people and tools; the runtime recomputes them from the names
                "weight_bytes": weights, "resident_bytes": plan.resident_bytes, "ring_bytes": plan.ring_bytes,
                "streamed_bytes": sum(p.nbytes for p in plan.streamed), "bytes_per_token": plan.bytes_per_token,
            },
        }
        with atomic_dir(store, keep=("probe.json",)) as tmp:
            (tmp / PLAN_TABLE).write_text(f"# Residency plan: {path.name} in {plan.budget_bytes / 1e6:.0f} MB\n\n{plan.table()}\n")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return cls(Path(store), manifest, path, gguf, plan)

    @classmethod
    def open(cls, store: str | os.PathLike, model: str | os.PathLike | None = None, verify: bool = True,
             progress: Callable[[int, int], None] | None = None) -> "PlanStore":
        """Check the manifest and the GGUF it names (size always; sha256 with `verify`); `model`, when given, must be
        that GGUF."""
        from edgewise.models import resolve_model

        store = Path(store)
        if not store.exists():
            recover_dir(store)
        if not store.is_dir():
            raise EdgewiseError(f"{store}: no such flash store directory; create it with `edgewise flash convert {store} --model M --budget SIZE`")
        where = store / MANIFEST
        try:
            manifest = json.loads(where.read_text())
        except FileNotFoundError:
            raise EdgewiseError(f"{store}: no {MANIFEST}, so not a complete flash store (an interrupted convert?); convert again") from None
        except (OSError, ValueError) as exc:
            raise EdgewiseError(f"{where}: unreadable manifest ({exc}); convert again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else manifest
            raise EdgewiseError(f"{where}: field 'format' is {got!r}, expected {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise EdgewiseError(f"{where}: plan version {manifest.get('version')!r}, but this edgewise reads version {VERSION}; convert again")
        _check_fields(manifest, where)
        recorded = manifest["model"]
        path = _model_path(recorded["name"], recorded["file"])
        if model is not None:
            given = resolve_model(model).resolve()
            if not given.is_file():
                raise EdgewiseError(f"{model}: no such model file (--model, checked against the plan in {store})")
            if given != path.resolve():
                if given.stat().st_size != recorded["bytes"] or sha256_file(given) != recorded["sha256"]:
                    raise EdgewiseError(f"{store}: this plan is for {recorded['name']} (sha256 {recorded['sha256'][:12]}…), not for {model}; "
                                        f"convert {model} into its own store")
                path = given
        if not path.is_file():
            raise EdgewiseError(f"{where}: the model it streams, {path}, is missing; give it with --model or convert again")
        size = path.stat().st_size
        if size != recorded["bytes"]:
            raise EdgewiseError(f"{path}: {size} bytes, but the plan in {store} was made for a file of {recorded['bytes']} bytes "
                                f"(truncated, or another model); convert again")
        if verify and sha256_file(path, progress) != recorded["sha256"]:
            raise EdgewiseError(f"{path}: checksum mismatch against the plan in {store} (the file changed since convert); convert again")
        gguf = read_gguf(path)
        plan = plan_from_names(model_parts(gguf), manifest["budget_bytes"], manifest["resident"], manifest["ring_depth"], str(where))
        return cls(store, manifest, path, gguf, plan)


def _check_fields(manifest: dict, where: Path) -> None:
    """One error naming the field, instead of a KeyError wherever it happens to be read."""
    def is_int(v, low=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    model = manifest.get("model")
    checks = [
        ("model", isinstance(model, dict), "an object {name, file, bytes, sha256}"),
        ("model.name", isinstance(model, dict) and isinstance(model.get("name"), str), "a model name or path"),
        ("model.file", isinstance(model, dict) and isinstance(model.get("file"), str), "a path"),
        ("model.bytes", isinstance(model, dict) and is_int(model.get("bytes"), 1), "a positive integer"),
        ("model.sha256", isinstance(model, dict) and isinstance(model.get("sha256"), str) and len(model["sha256"]) == 64, "64 hex digits"),
        ("budget_bytes", is_int(manifest.get("budget_bytes"), 1), "a positive integer"),
        ("ring_depth", is_int(manifest.get("ring_depth"), 1), "a positive integer"),
        ("resident", isinstance(manifest.get("resident"), list) and all(isinstance(n, str) for n in manifest["resident"]), "a list of tensor names"),
    ]
    for field, ok, expected in checks:
        if not ok:
            node = manifest
            for key in field.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            raise EdgewiseError(f"{where}: field '{field}' is {node!r}, expected {expected}; convert again")
