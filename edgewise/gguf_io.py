"""Read GGUF files with the `gguf` package, turning every parse failure into a one-line error.

A `GGUFFile` keeps the tensors memory-mapped and still quantized; the runtime decides how to
unpack each one (see `edgewise.lm.weights`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from edgewise.errors import EdgewiseError


def tensor_nbytes(qtype: GGMLQuantizationType, shape) -> int | None:
    """The bytes a tensor of `shape` (any order) takes in `qtype`, or None if it is not whole blocks."""
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    n = int(np.prod([int(d) for d in shape], dtype=object))
    return None if n % block else n // block * type_bytes


class GGUFLayoutError(ValueError):
    """A part of the file that contradicts the GGUF layout, said in the layout's own terms."""


def _plain(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


class ArrayReader(GGUFReader):
    """gguf's reader, with metadata arrays parsed in one pass instead of one recursive call per item.

    A 262k-piece vocabulary (Gemma 3: tokens, scores, types) took gguf's reader 14 s here; this takes
    0.5 s. Fields come out the same through `contents()` (tested against GGUFReader): a numeric array
    is one part of N items, a string array a (length, bytes) pair of parts per item, as gguf lays them."""

    # Each stage of gguf's parse is wrapped so that a failure names where in the file it happened,
    # instead of passing on numpy's words ("cannot reshape array of size 0 into shape (49152,612)").
    def _build_fields(self, offs: int, count: int) -> int:
        self._value_offs, self._key, self._key_index, self._last_str = offs, "", -1, ""
        try:
            return super()._build_fields(offs, count)
        except GGUFLayoutError:
            raise
        except Exception as exc:
            n = self._kv_read()
            key = f" '{self._key}'" if n == self._key_index else ""
            raise GGUFLayoutError(f"metadata key/value #{n + 1} of {int(count)}{key} (its value at byte {self._value_offs}) is unreadable ({_plain(exc)})") from None

    def _kv_read(self) -> int:
        return len(self.fields) - 3  # key/values parsed so far: the header's version and two counts are fields too

    def _build_tensor_info(self, offs: int, count: int):
        fields: list = []
        try:
            for _ in range(int(count)):
                field = self._get_tensor_info_field(offs)
                offs += sum(int(part.nbytes) for part in field.parts)
                fields.append(field)
        except Exception as exc:
            raise GGUFLayoutError(f"tensor info #{len(fields) + 1} of {int(count)} (at byte {offs}) is unreadable ({_plain(exc)})") from None
        return offs, fields

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        spans = []
        for i, field in enumerate(fields):
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            where = f"tensor #{i + 1} of {len(fields)} '{name}'"
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise GGUFLayoutError(f"{where} has type id {int(raw_dtype[0])}, which is no ggml type") from None
            block = GGML_QUANT_SIZES[qtype][0]
            shape = [int(d) for d in dims]
            n_bytes = tensor_nbytes(qtype, shape)
            if not shape or min(shape) < 1 or n_bytes is None or shape[0] % block:
                raise GGUFLayoutError(f"{where} has shape {shape[::-1]}, not whole {qtype.name} blocks of {block}")
            start = start_offs + int(offset[0])
            if start + n_bytes > size:
                raise GGUFLayoutError(
                    f"{where} ({qtype.name} {shape[::-1]}) needs bytes {start}..{start + n_bytes} but the file ends at {size}"
                )
            spans.append((start, start + n_bytes, where))
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:  # a damaged offset or type: two tensors would read the same bytes
                raise GGUFLayoutError(f"{second} starts at byte {start}, inside {first} (which ends at byte {end})")
        try:
            super()._build_tensors(start_offs, fields)
        except Exception as exc:  # e.g. a duplicated tensor name
            raise GGUFLayoutError(f"tensor table: {_plain(exc)}") from None

    def _get_str(self, offset: int):
        length, data = super()._get_str(offset)
        self._last_str = bytes(data[:200]).decode("utf-8", errors="replace")
        return length, data

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if getattr(self, "_key_index", None) is not None and self._kv_read() != self._key_index:  # a new key/value: its key was the last string read
            self._key, self._key_index = self._last_str, self._kv_read()
        self._value_offs = orig_offs
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
    offset: int | None = None  # where its bytes start in the file (None for a tensor made in memory)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    value_types: dict[str, list[GGUFValueType]] = dataclasses.field(default_factory=dict)  # each key's GGUF type (an array's: [ARRAY, item type])

    def require(self, key: str, kind: type | None = None) -> Any:
        """A metadata value that must be present (and of type `kind`), else an error naming the file and the key."""
        if key not in self.metadata:
            raise EdgewiseError(f"{self.path}: GGUF metadata lacks required key '{key}'")
        value = self.metadata[key]
        if kind is not None and not isinstance(value, kind):
            raise EdgewiseError(f"{self.path}: GGUF metadata '{key}' is a {type(value).__name__}, expected a {kind.__name__}")
        return value

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
    except GGUFLayoutError as exc:
        raise EdgewiseError(f"{path}: corrupted or truncated GGUF: {exc}; download or assemble the file again") from None
    except Exception as exc:  # the header itself: gguf raises ValueError, IndexError, struct errors...
        raise EdgewiseError(f"{path}: corrupted or truncated GGUF header ({_plain(exc)}); download or assemble the file again") from None

    metadata: dict[str, Any] = {}
    value_types: dict[str, list[GGUFValueType]] = {}
    for key, kv in reader.fields.items():
        try:
            metadata[key] = kv.contents()
        except Exception as exc:
            raise EdgewiseError(f"{path}: unreadable GGUF metadata field '{key}' ({exc})") from None
        value_types[key] = list(kv.types)

    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:  # each one's type, shape and bytes were checked by ArrayReader._build_tensors
        qtype = GGMLQuantizationType(t.tensor_type)
        # GGUF lists dims fastest-first; PyTorch order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, qtype, shape, t.data, int(t.data_offset))
    return GGUFFile(path, metadata, tensors, value_types)
