"""Read GGUF files with the `gguf` package, turning every parse failure into a one-line error.

A `GGUFFile` keeps the tensors memory-mapped and still quantized; the runtime decides how to
unpack each one (see `edgewise.lm.weights`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from edgewise.errors import EdgewiseError


class ArrayReader(GGUFReader):
    """gguf's reader, with metadata arrays parsed in one pass instead of one recursive call per item.

    A 262k-piece vocabulary (Gemma 3: tokens, scores, types) took gguf's reader 14 s here; this takes
    0.5 s. Fields come out the same through `contents()` (tested against GGUFReader): a numeric array
    is one part of N items, a string array a (length, bytes) pair of parts per item, as gguf lays them."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n_items, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        if itype == GGUFValueType.STRING:
            data = np.asarray(self.data).view(np.ndarray)  # plain views: a memmap subclass per item is slow
            view = memoryview(data)
            parts: list[np.ndarray] = [raw_itype, alen]
            for _ in range(n_items):
                n = int.from_bytes(view[offs : offs + 8], "little")
                if offs + 8 + n > len(data):
                    raise ValueError(f"string array item at offset {offs} runs past the end of the file")
                parts += [data[offs : offs + 8].view("<u8"), data[offs + 8 : offs + 8 + n]]
                offs += 8 + n
            return offs - orig_offs, parts, list(range(3, len(parts), 2)), [GGUFValueType.ARRAY, GGUFValueType.STRING]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None or n_items == 0:  # arrays of arrays, empty arrays: gguf's own way
            return super()._get_field_parts(orig_offs, raw_type)
        items = self._get(offs, nptype, n_items)
        return 12 + int(items.nbytes), [raw_itype, alen, items], [2], [GGUFValueType.ARRAY, itype]


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: `shape` is in PyTorch order (rows, cols); `raw` is the memory-mapped bytes."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    def require(self, key: str) -> Any:
        """A metadata value that must be present, else an error naming the file and the key."""
        if key not in self.metadata:
            raise EdgewiseError(f"{self.path}: GGUF metadata lacks required key '{key}'")
        return self.metadata[key]

    def tensor(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise EdgewiseError(f"{self.path}: GGUF has no tensor '{name}' (is it a complete llama model?)")
        return self.tensors[name]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; tensor data stays memory-mapped."""
    path = Path(path)
    if not path.exists():
        raise EdgewiseError(f"{path}: no such file")
    if not path.is_file():
        raise EdgewiseError(f"{path}: not a file (expected a .gguf model file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EdgewiseError(f"{path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
    try:
        reader = ArrayReader(path, "r")
    except Exception as exc:  # the gguf package raises ValueError, IndexError, struct errors... on bad files
        raise EdgewiseError(f"{path}: corrupted or truncated GGUF ({type(exc).__name__}: {exc})") from None

    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception as exc:
            raise EdgewiseError(f"{path}: unreadable GGUF metadata field '{key}' ({exc})") from None

    file_size = path.stat().st_size
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.tensor_type)
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(t.shape))
        expected = n_elements // block * type_bytes
        if t.data_offset + expected > file_size or t.n_bytes != expected:
            raise EdgewiseError(
                f"{path}: truncated GGUF: tensor '{t.name}' needs bytes {t.data_offset}..{t.data_offset + expected}"
                f" but the file has {file_size}"
            )
        # GGUF lists dims fastest-first; PyTorch order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, qtype, shape, t.data)
    return GGUFFile(path, metadata, tensors)
