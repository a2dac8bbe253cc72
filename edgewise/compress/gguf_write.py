"""Write a GGUF with gguf's own writer: a source file's metadata, kept key by key with its GGUF type, and a
new set of tensor bytes. The file appears whole or not at all (a temp file beside it, then a rename)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from edgewise.files import atomic_path
from edgewise.gguf_io import GGUFFile

# Keys the writer makes itself: the header's counts and version, and the architecture (its constructor argument).
_WRITER_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture")


def tensor_bytes(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Any tensor's data as gguf's writer takes raw bytes: uint8 [*shape[:-1], bytes per row]."""
    return np.ascontiguousarray(raw).view(np.uint8).reshape(*shape[:-1], -1)


def write_gguf(
    source: GGUFFile,
    out: str | Path,
    tensors: dict[str, tuple[GGMLQuantizationType, np.ndarray]],
    metadata: dict[str, tuple[object, GGUFValueType]] | None = None,
    order: list[str] | None = None,
) -> Path:
    """`source`'s metadata (updated by `metadata`: key -> (value, type)) and `tensors` (name -> (type, bytes
    [*shape[:-1], bytes per row])) into `out`, in the source's tensor order (or `order`: a pruned model's names)."""
    arch = source.require("general.architecture", str)
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = GGUFWriter(str(tmp), arch)
        for key, value in source.metadata.items():
            if key in _WRITER_KEYS or (metadata and key in metadata):
                continue
            types = source.value_types[key]
            writer.add_key_value(key, value, types[0], sub_type=types[-1] if types[0] == GGUFValueType.ARRAY else None)
        for key, (value, vtype) in (metadata or {}).items():
            writer.add_key_value(key, value, vtype)
        for name in order if order is not None else source.tensors:
            qtype, data = tensors[name]
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
