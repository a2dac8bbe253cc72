"""The flash store: a model split into a resident part (DRAM) and an FFN file (flash).

    STORE/
      manifest.json        format, version, model identity, dimensions, the FFN file's layout,
                           a sha256 per layer region, the predictors' operating point; written last
      metadata.json        the GGUF's metadata (tokenizer, chat template, hyper-parameters)
      resident.safetensors every non-FFN tensor in its GGUF bytes (uint8 [rows, row bytes]; type and
                           shape in the manifest), and per layer: the down matrix's block scales,
                           the predictor's two factors, the neuron order
      ffn.bin              per layer, `n_units` units of `unit_bytes` (a multiple of 4 KiB)

A unit is what one aligned read brings: `bundles_per_unit` bundles, then their int32 neuron ids
(-1: empty). The bundle of neuron i (the paper's row-column bundling) holds, in the GGUF's Q4_1:
gate row i and up row i (their own blocks, byte for byte), and down column i's 4-bit codes in
GGUF nibble order along the output dimension. The down column's fp16 scales belong to blocks of
32 neurons, so they stay resident ([F/32, D], a few % of the FFN bytes) and count against the
DRAM budget. Neurons are grouped into units by co-activation and units ordered so that units
used together sit together (`edgewise.flash.predictor.order_neurons`); `order` records it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgewise.errors import EdgewiseError
from edgewise.files import recover_dir
from edgewise.gguf_io import GGUFFile, GGUFTensor, tensor_nbytes

FORMAT = "edgewise-flash-store"
VERSION = 1
PAGE = 4096
QK = 32
Q4_1_BLOCK = 20
ID_BYTES = 4
FFN_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")
FLASH_LAYER_TENSORS = ("down_d", "down_m", "pred_a", "pred_b", "pred_c", "order")  # per layer, beside the GGUF's resident tensors
PROBE_FILE = "probe.json"  # `edgewise flash probe STORE`: this store's disk, measured (not part of the format)
# What the runtime reads from a manifest, and its type: checked once, so that a damaged manifest is
# one error naming the field instead of a KeyError wherever the field happens to be used.
MANIFEST_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "model.file": str, "model.sha256": str, "model.bytes": int,
    "dims.n_layers": int, "dims.d_model": int, "dims.d_ff": int,
    "ffn_file.unit_bytes": int, "ffn_file.bundles_per_unit": int, "ffn_file.gguf_ffn_bytes": int, "ffn_file.layers": list,
    "resident_tensors": dict, "predictor.k_units": list, "predictor.active_fraction": (int, float),
}  # fmt: skip


@dataclass(frozen=True)
class BundleLayout:
    d_model: int
    d_ff: int
    bundles_per_unit: int
    unit_bytes: int

    @classmethod
    def for_dims(cls, d_model: int, d_ff: int) -> "BundleLayout":
        if d_model % QK or d_ff % QK:
            raise EdgewiseError(f"flash store needs d_model and d_ff multiples of {QK} (got {d_model}, {d_ff})")
        bundle = 2 * (d_model // QK) * Q4_1_BLOCK + d_model // 2
        per_unit = max(1, (PAGE - ID_BYTES) // (bundle + ID_BYTES))
        unit = -(-(per_unit * (bundle + ID_BYTES)) // PAGE) * PAGE
        return cls(d_model, d_ff, per_unit, unit)

    @property
    def row_bytes(self) -> int:
        return (self.d_model // QK) * Q4_1_BLOCK

    @property
    def bundle_bytes(self) -> int:
        return 2 * self.row_bytes + self.d_model // 2

    @property
    def n_units(self) -> int:
        return -(-self.d_ff // self.bundles_per_unit)

    @property
    def layer_bytes(self) -> int:
        return self.n_units * self.unit_bytes

    @property
    def n_slots(self) -> int:
        """Bundle positions per layer (n_units * bundles_per_unit, padding included)."""
        return self.n_units * self.bundles_per_unit


# -- packing: GGUF tensors <-> units ---------------------------------------------------------------
def nibbles_to_codes(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes of one Q4 block -> [..., 32] codes, GGUF order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _codes_to_nibbles(codes: np.ndarray) -> np.ndarray:
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def split_down(down_raw: np.ndarray, d_model: int, d_ff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 down [D, F] -> (column codes packed [F, D/2] in GGUF nibble order along D, d [F/32, D], m [F/32, D] fp16)."""
    blocks = down_raw.reshape(d_model, d_ff // QK, Q4_1_BLOCK)
    dm = np.ascontiguousarray(blocks[..., :4]).view(np.float16)  # [D, F/32, 2]
    codes = nibbles_to_codes(blocks[..., 4:]).reshape(d_model, d_ff)  # [D, F]: codes[j, i]
    columns = _codes_to_nibbles(codes.T.reshape(d_ff, d_model // QK, QK)).reshape(d_ff, d_model // 2)
    return columns, np.ascontiguousarray(dm[..., 0].T), np.ascontiguousarray(dm[..., 1].T)


def join_down(columns: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The inverse of `split_down`: the down matrix's GGUF bytes [D, F/32 * 20]."""
    d_ff, d_model = columns.shape[0], columns.shape[1] * 2
    codes = nibbles_to_codes(columns.reshape(d_ff, d_model // QK, 16)).reshape(d_ff, d_model).T  # [D, F]
    qs = _codes_to_nibbles(codes.reshape(d_model, d_ff // QK, QK))
    dm = np.stack([d.T, m.T], axis=-1).astype(np.float16).view(np.uint8)  # [D, F/32, 4]
    return np.concatenate([dm, qs], axis=-1).reshape(d_model, -1)


def pack_layer(layout: BundleLayout, gate_raw: np.ndarray, up_raw: np.ndarray, down_columns: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Units [n_units, unit_bytes] for one layer; `order[s]` is the neuron at bundle position s (-1: empty)."""
    units = np.zeros((layout.n_units, layout.unit_bytes), dtype=np.uint8)
    bpu, bb, rb = layout.bundles_per_unit, layout.bundle_bytes, layout.row_bytes
    bundles = units[:, : bpu * bb].reshape(layout.n_units, bpu, bb)
    ids = order.reshape(layout.n_units, bpu)
    real = ids >= 0
    rows = ids[real]
    bundles[real, :rb] = gate_raw[rows]
    bundles[real, rb : 2 * rb] = up_raw[rows]
    bundles[real, 2 * rb :] = down_columns[rows]
    units[:, bpu * bb : bpu * (bb + ID_BYTES)] = ids.astype("<i4").view(np.uint8).reshape(layout.n_units, -1)
    return units


def unpack_layer(layout: BundleLayout, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Units -> (gate [F, row_bytes], up [F, row_bytes], down columns [F, D/2], order), rows by neuron id."""
    bpu, bb, rb = layout.bundles_per_unit, layout.bundle_bytes, layout.row_bytes
    ids = np.ascontiguousarray(units[:, bpu * bb : bpu * (bb + ID_BYTES)]).view("<i4").reshape(-1)
    bundles = units[:, : bpu * bb].reshape(-1, bb)
    real = ids >= 0
    gate = np.zeros((layout.d_ff, rb), np.uint8)
    up = np.zeros_like(gate)
    down = np.zeros((layout.d_ff, layout.d_model // 2), np.uint8)
    gate[ids[real]] = bundles[real, :rb]
    up[ids[real]] = bundles[real, rb : 2 * rb]
    down[ids[real]] = bundles[real, 2 * rb :]
    return gate, up, down, ids


def check_ffn_tensors(gguf: GGUFFile, n_layers: int) -> None:
    for i in range(n_layers):
        for name in FFN_TENSORS:
            t = gguf.tensor(f"blk.{i}.{name}.weight")
            if t.qtype != QT.Q4_1:
                raise EdgewiseError(
                    f"{gguf.path}: tensor blk.{i}.{name}.weight is {t.qtype.name}; the bundled flash store keeps FFN weights in their GGUF form and supports Q4_1 only; "
                    f"for other types write a streaming plan: `edgewise flash convert STORE --model {gguf.path} --budget 50%`"
                )


def sha256_file(path: Path, progress: Callable[[int, int], None] | None = None, chunk: int = 8 << 20) -> str:
    """sha256 of a file, reading it once; its pages are dropped from the page cache as they are hashed (a model
    being opened under a memory cap should not fill the cache with a file it is about to stream)."""
    h = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            os.posix_fadvise(f.fileno(), done, len(block), os.POSIX_FADV_DONTNEED)
            done += len(block)
            if progress:
                progress(done, total)
    return h.hexdigest()


# -- reading a store -------------------------------------------------------------------------------
@dataclass
class FlashStore:
    """An opened store: manifest checked, FFN file size checked (and, with `verify`, every layer's sha256)."""

    path: Path
    manifest: dict[str, Any]
    layout: BundleLayout

    @property
    def ffn_path(self) -> Path:
        return self.path / "ffn.bin"

    @property
    def n_layers(self) -> int:
        return int(self.manifest["dims"]["n_layers"])

    def layer_offset(self, layer: int) -> int:
        return int(self.manifest["ffn_file"]["layers"][layer]["offset"])

    @property
    def ffn_gguf_bytes(self) -> int:
        """The FFN weights' size in the GGUF (gate + up + down, all layers): what a `--dram-budget X%` is a share of."""
        return int(self.manifest["ffn_file"]["gguf_ffn_bytes"])


    @staticmethod
    def check_manifest(manifest: dict, where: Path) -> None:
        def positive_ints(values) -> bool:
            return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)

        for dotted, kind in MANIFEST_SCHEMA.items():
            node: Any = manifest
            for key in dotted.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, kind) or isinstance(node, bool) or (kind is int and node < 0):
                raise EdgewiseError(f"{where}: field '{dotted}' is {node!r}, expected {'a non-negative integer' if kind is int else getattr(kind, '__name__', 'a number')}")
        for i, layer in enumerate(manifest["ffn_file"]["layers"]):
            if not (isinstance(layer, dict) and isinstance(layer.get("offset"), int) and layer["offset"] >= 0 and isinstance(layer.get("sha256"), str)):
                raise EdgewiseError(f"{where}: field 'ffn_file.layers[{i}]' is {layer!r}, expected {{offset, bytes, sha256}}")
        for name, spec in manifest["resident_tensors"].items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if not (isinstance(spec, dict) and isinstance(spec.get("qtype"), str) and spec["qtype"] in QT.__members__ and isinstance(shape, list) and shape and positive_ints(shape)):
                raise EdgewiseError(f"{where}: field 'resident_tensors.{name}' is {spec!r}, expected {{qtype: a ggml type name, shape: [positive ints]}}")
        if not positive_ints(manifest["predictor"]["k_units"]):
            raise EdgewiseError(f"{where}: field 'predictor.k_units' must list positive integers, got {manifest['predictor']['k_units']!r}")

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True, model: str | os.PathLike | None = None) -> "FlashStore":
        path = Path(path)
        if not path.exists():
            recover_dir(path)  # a convert killed between its two renames leaves the previous store beside it
        if not path.exists():
            raise EdgewiseError(f"{path}: no such flash store directory; create it with `edgewise flash convert {path}`")
        if not path.is_dir():
            raise EdgewiseError(f"{path}: not a directory (a flash store is a directory made by `edgewise flash convert`)")
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise EdgewiseError(f"{path}: no manifest.json, so not a complete flash store (an interrupted convert?); re-run `edgewise flash convert {path}`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise EdgewiseError(f"{manifest_path}: unreadable manifest ({exc}); re-run `edgewise flash convert {path}`") from None
        if not isinstance(manifest, dict):
            raise EdgewiseError(f"{manifest_path}: a manifest is a JSON object, got {type(manifest).__name__}; re-run `edgewise flash convert {path}`")
        if manifest.get("format") != FORMAT:
            raise EdgewiseError(f"{manifest_path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise EdgewiseError(
                f"{manifest_path}: store version {manifest.get('version')!r}, but this edgewise reads version {VERSION}; re-run `edgewise flash convert {path}`"
            )
        cls.check_manifest(manifest, manifest_path)
        try:
            dims, unit = manifest["dims"], manifest["ffn_file"]
            layout = BundleLayout(int(dims["d_model"]), int(dims["d_ff"]), int(unit["bundles_per_unit"]), int(unit["unit_bytes"]))
            if layout != BundleLayout.for_dims(layout.d_model, layout.d_ff):
                raise EdgewiseError(f"{manifest_path}: field 'ffn_file' has a unit layout this version does not write ({unit['bundles_per_unit']} x {unit['unit_bytes']})")
            layers = unit["layers"]
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgewiseError(f"{manifest_path}: missing or malformed field {exc}; re-run `edgewise flash convert {path}`") from None
        store = cls(path, manifest, layout)
        if len(layers) != store.n_layers or len(manifest["predictor"]["k_units"]) != store.n_layers:
            raise EdgewiseError(f"{manifest_path}: fields 'ffn_file.layers' and 'predictor.k_units' list {len(layers)} and {len(manifest['predictor']['k_units'])} layers, expected {store.n_layers}")
        if model is not None:
            store.check_model(model)
        expected = store.layer_offset(store.n_layers - 1) + layout.layer_bytes
        size = store.ffn_path.stat().st_size if store.ffn_path.is_file() else -1
        if size != expected:
            what = "missing" if size < 0 else f"{size} bytes"
            raise EdgewiseError(f"{store.ffn_path}: {what}, expected {expected} bytes (truncated or from another store); re-run `edgewise flash convert {path}`")
        if verify:
            store.verify()
        return store

    def check_model(self, model: str | os.PathLike) -> None:
        """Raise unless `model` is the GGUF this store was made from (same sha256)."""
        want = self.manifest["model"]["sha256"]
        got = sha256_file(Path(model))
        if got != want:
            raise EdgewiseError(
                f"{self.path}: this store was made from {self.manifest['model']['file']} (sha256 {want[:12]}…), not from {model} (sha256 {got[:12]}…); "
                f"convert {model} into its own store"
            )

    def verify(self) -> None:
        """Check every layer region's sha256; the pages read are dropped from the page cache afterwards."""
        with open(self.ffn_path, "rb") as f:
            fd = f.fileno()
            for i, entry in enumerate(self.manifest["ffn_file"]["layers"]):
                f.seek(entry["offset"])
                digest = hashlib.sha256(f.read(self.layout.layer_bytes)).hexdigest()
                if digest != entry["sha256"]:
                    raise EdgewiseError(f"{self.ffn_path}: layer {i} checksum mismatch (region at offset {entry['offset']}); the file is corrupt: re-run `edgewise flash convert {self.path}`")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def resident(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        path = self.path / "resident.safetensors"
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise EdgewiseError(f"{path}: unreadable resident weights ({type(exc).__name__}: {exc}); re-run `edgewise flash convert {self.path}`") from None
        for i in range(self.n_layers):
            for part in FLASH_LAYER_TENSORS:
                if f"flash.blk.{i}.{part}" not in tensors:
                    raise EdgewiseError(f"{path}: tensor flash.blk.{i}.{part} is missing; re-run `edgewise flash convert {self.path}`")
        return tensors

    def gguf_view(self, resident: dict[str, np.ndarray]) -> GGUFFile:
        """The resident part as a GGUFFile without FFN tensors, for `Llama.from_gguf(..., ffn_of_layer=...)`."""
        meta_path = self.path / "metadata.json"
        try:
            metadata = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise EdgewiseError(f"{meta_path}: unreadable GGUF metadata ({exc}); re-run `edgewise flash convert {self.path}`") from None
        if not isinstance(metadata, dict):
            raise EdgewiseError(f"{meta_path}: GGUF metadata is a JSON object, got {type(metadata).__name__}; re-run `edgewise flash convert {self.path}`")
        tensors = {}
        for name, spec in self.manifest["resident_tensors"].items():
            if name not in resident:
                raise EdgewiseError(f"{self.path / 'resident.safetensors'}: tensor {name} listed in the manifest is missing")
            qtype, shape = QT[spec["qtype"]], tuple(spec["shape"])
            if resident[name].nbytes != tensor_nbytes(qtype, shape):
                raise EdgewiseError(f"{self.path / 'resident.safetensors'}: tensor {name} holds {resident[name].nbytes} bytes, but the manifest says {qtype.name} {list(shape)}")
            tensors[name] = GGUFTensor(name, qtype, shape, resident[name])
        return GGUFFile(self.path, metadata, tensors)


def resident_tensor_entries(gguf: GGUFFile) -> dict[str, GGUFTensor]:
    """Every tensor but the FFN weights."""
    return {name: t for name, t in gguf.tensors.items() if not any(name.endswith(f"{ffn}.weight") for ffn in FFN_TENSORS)}


def jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
