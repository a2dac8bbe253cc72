"""Structure-aware mutators: each takes a well-formed file's bytes (or object) and a random generator
and returns a damaged variant with a one-line description of the damage.

GGUF: the file is walked into its fields (header counts, each key's length and bytes, value types,
string lengths, array types and counts, tensor infos: name, dims, type, data offset), and a
mutation hits one field with a value chosen to hurt (0, 1, the maximum, a sign flip, +-1, x2, a
random one), or corrupts a string's bytes, or truncates the file at a field boundary, or flips bits.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# GGUF value types (gguf.GGUFValueType): size in bytes of the scalar ones
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class Field:
    kind: str  # "version", "tensor_count", "key_len", "value_type", "str_len", "array_count", "dim", "tensor_type", ...
    offset: int
    size: int  # bytes: 4 or 8 for integers, the length of a string's bytes for "str_bytes"


def gguf_fields(data: bytes) -> list[Field]:
    """The structural fields of a well-formed GGUF (v3, little endian), in file order."""
    fields = [Field("magic", 0, 4), Field("version", 4, 4), Field("tensor_count", 8, 8), Field("kv_count", 16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    offs = 24

    def string(kind: str) -> None:
        nonlocal offs
        (n,) = struct.unpack_from("<Q", data, offs)
        fields.append(Field(f"{kind}_len", offs, 8))
        fields.append(Field(f"{kind}_bytes", offs + 8, n))
        offs += 8 + n

    def value(vtype: int, top: bool) -> None:
        nonlocal offs
        if vtype == STRING:
            string("str")
        elif vtype == ARRAY:
            (itype,) = struct.unpack_from("<I", data, offs)
            (count,) = struct.unpack_from("<Q", data, offs + 4)
            fields.append(Field("array_type", offs, 4))
            fields.append(Field("array_count", offs + 4, 8))
            offs += 12
            for _ in range(count):
                value(itype, False)
        else:
            if top:
                fields.append(Field("scalar", offs, SCALAR_BYTES[vtype]))
            offs += SCALAR_BYTES[vtype]

    for _ in range(n_kv):
        string("key")
        (vtype,) = struct.unpack_from("<I", data, offs)
        fields.append(Field("value_type", offs, 4))
        offs += 4
        value(vtype, True)
    for _ in range(n_tensors):
        string("tensor_name")
        (n_dims,) = struct.unpack_from("<I", data, offs)
        fields.append(Field("n_dims", offs, 4))
        offs += 4
        for _ in range(n_dims):
            fields.append(Field("dim", offs, 8))
            offs += 8
        fields.append(Field("tensor_type", offs, 4))
        fields.append(Field("tensor_offset", offs + 4, 8))
        offs += 12
    fields.append(Field("data_start", offs, 0))
    return fields


def _hurtful(old: int, size: int, rng: random.Random) -> int:
    top = (1 << (8 * size)) - 1
    choices = [0, 1, 2, top, top >> 1, (top >> 1) + 1, old + 1, old - 1, old * 2, old // 2, old * 1000, rng.randrange(top + 1), 1 << 31, 1 << 32, 1 << 40]
    return rng.choice(choices) & top


def mutate_gguf(data: bytes, fields: list[Field], rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    strategy = rng.choices(["field", "string", "truncate", "bitflip", "splice"], weights=[50, 15, 15, 15, 5])[0]
    # weigh field kinds equally, not by how many there are (the vocabulary has thousands of strings)
    kinds = sorted({f.kind for f in fields if f.size})
    if strategy == "field":
        kind = rng.choice([k for k in kinds if not k.endswith("_bytes")])
        f = rng.choice([f for f in fields if f.kind == kind])
        old = int.from_bytes(buf[f.offset : f.offset + f.size], "little")
        new = _hurtful(old, f.size, rng)
        buf[f.offset : f.offset + f.size] = new.to_bytes(f.size, "little")
        return bytes(buf), f"{kind} at byte {f.offset}: {old} -> {new}"
    if strategy == "string":
        kind = rng.choice([k for k in kinds if k.endswith("_bytes")])
        f = rng.choice([f for f in fields if f.kind == kind and f.size])
        i = f.offset + rng.randrange(f.size)
        new = rng.choice([0x00, 0xFF, 0xC3, 0x80, 0x20, rng.randrange(256)])
        buf[i] = new
        return bytes(buf), f"{kind} at byte {f.offset}: byte {i} -> {new:#x}"
    if strategy == "truncate":
        f = rng.choice(fields)
        cut = max(0, f.offset + rng.choice([0, 1, f.size // 2, f.size - 1]))
        return bytes(buf[:cut]), f"truncated at byte {cut} (in {f.kind})"
    if strategy == "bitflip":
        end = next(f.offset for f in fields if f.kind == "data_start")
        flips = [rng.randrange(end) for _ in range(rng.randint(1, 4))]
        for i in flips:
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), f"bits flipped at bytes {flips}"
    a, b = sorted(rng.randrange(len(buf)) for _ in range(2))  # splice: drop or repeat a span
    if rng.random() < 0.5:
        return bytes(buf[:a] + buf[b:]), f"bytes {a}..{b} removed"
    return bytes(buf[:b] + buf[a:b] + buf[b:]), f"bytes {a}..{b} repeated"


def mutate_npz(x: np.ndarray, y: np.ndarray, rng: random.Random) -> tuple[bytes, str]:
    """An .npz archive with damaged arrays, or damaged archive bytes."""
    arrays: dict[str, object] = {"x": x.copy(), "y": y.copy()}
    kind = rng.choice(["x dtype", "y dtype", "x shape", "y shape", "lengths", "labels", "missing", "extra", "empty", "object", "bytes", "not npz", "nan"])
    if kind == "x dtype":
        arrays["x"] = x.astype(rng.choice([np.float32, np.int64, np.int8, np.bool_, np.float16]))
    elif kind == "y dtype":
        arrays["y"] = y.astype(rng.choice([np.float32, np.uint8, np.int8, np.bool_, np.complex64]))
    elif kind == "x shape":
        arrays["x"] = rng.choice([x[0], x[:, :, :, None].repeat(rng.choice([2, 3, 4]), 3), x[:, :0], x.reshape(len(x), -1), x[..., None, None], x.reshape(-1)])
    elif kind == "y shape":
        arrays["y"] = rng.choice([y[:, None], y.reshape(1, -1), y[:0], np.array(3)])
    elif kind == "lengths":
        arrays["y"] = y[: rng.randrange(len(y))]
    elif kind == "labels":
        bad = y.copy()
        bad[rng.randrange(len(bad))] = rng.choice([-1, 10**12, 2**63 - 1, -(2**63), 1000, len(bad) + 5])
        arrays["y"] = bad
    elif kind == "missing":
        del arrays[rng.choice(["x", "y"])]
    elif kind == "extra":
        arrays[rng.choice(["z", "labels", "X"])] = y
    elif kind == "empty":
        arrays = {"x": x[:0], "y": y[:0]}
    elif kind == "nan":
        arrays["y"] = y.astype(np.float64)
        arrays["y"][0] = np.nan
    buf = io.BytesIO()
    if kind == "object":  # a pickled payload: must be refused, never run
        arrays["y"] = np.array([{"evil": 1}] * len(y), dtype=object)
        np.savez(buf, **arrays)  # numpy pickles object arrays when saving
    else:
        np.savez(buf, **arrays)
    data = bytearray(buf.getvalue())
    if kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
    if kind == "not npz":
        data = rng.choice([b"", b"PK\x03\x04", b"\x93NUMPY\x01\x00", b"hello", bytes(rng.randrange(256) for _ in range(64))])
    return bytes(data), kind


def _mutate_json_value(value, rng: random.Random):
    return rng.choice([None, True, -1, 0, 2**70, -(2**70), 1e308, -0.0, 0.3, "1/8", "", [], {}, [1, 2], {"a": 1}, "x" * 1000, float("nan"), float("inf")])


def mutate_scheme(scheme: dict, rng: random.Random) -> tuple[bytes, str]:
    doc = json.loads(json.dumps(scheme))
    kind = rng.choice(["value", "layer name", "ratio", "extra key", "drop key", "top level", "deep", "syntax", "bytes"])
    if kind == "value":
        key = rng.choice(list(doc))
        doc[key] = _mutate_json_value(doc[key], rng)
    elif kind == "layer name":
        doc["weights"] = {rng.choice(["", "features.99.conv.0.0", "classifier", "features.16", "../../etc/passwd", "\x00", "features.16.conv.0.0.weight"]): 1}
    elif kind == "ratio":
        doc["weights"]["features.16.conv.0.0"] = _mutate_json_value(None, rng)
    elif kind == "extra key":
        doc[rng.choice(["bias", "weight", "__proto__", "classifier "])] = 1
    elif kind == "drop key":
        doc.pop(rng.choice(list(doc)))
    elif kind == "top level":
        doc = rng.choice([[], "scheme", 3, None, [doc]])
    elif kind == "deep":
        deep: object = 1
        for _ in range(rng.choice([10, 1000, 100000])):
            deep = [deep]
        doc["weights"] = deep
    text = json.dumps(doc, allow_nan=True) if kind != "deep" else _dump_deep(doc)
    data = bytearray(text.encode())
    if kind == "syntax":
        data = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data.replace(b":", b"", 1)
    elif kind == "bytes":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.choice([0x00, 0xFF, 0x22, 0x7B, 0x5C, rng.randrange(256)])
    return bytes(data), kind


def _dump_deep(doc) -> str:  # json.dumps recurses; a deep list is written by hand
    depth, inner = 0, doc["weights"]
    while isinstance(inner, list):
        depth, inner = depth + 1, inner[0]
    rest = {k: v for k, v in doc.items() if k != "weights"}
    head = json.dumps(rest)[:-1] + (", " if rest else "")
    return head + '"weights": ' + "[" * depth + "1" + "]" * depth + "}"



def mutate_image_folder(seed: Path, out: Path, rng: random.Random) -> str:
    """A copy of an image folder (ROOT/<class>/*.png) with damaged files or structure."""
    shutil.copytree(seed, out)
    files = sorted(out.rglob("*.png"))
    victim = rng.choice(files)
    kind = rng.choice(["bytes", "truncate", "empty file", "not an image", "bomb", "mode", "empty class", "one class", "nested", "no classes",
                       "file as class", "symlink loop", "odd name", "huge file count"])
    if kind == "bytes":
        data = bytearray(victim.read_bytes())
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
    elif kind == "truncate":
        victim.write_bytes(victim.read_bytes()[: rng.randrange(victim.stat().st_size)])
    elif kind == "empty file":
        victim.write_bytes(b"")
    elif kind == "not an image":
        victim.write_bytes(rng.choice([b"hello", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", bytes(range(256))]))
    elif kind == "bomb":  # a PNG header that claims 60000 x 60000 pixels
        ihdr = b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
        chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
        victim.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    elif kind == "mode":
        from PIL import Image

        mode = rng.choice(["RGBA", "I;16", "1", "CMYK", "F", "LA", "I"])
        try:
            Image.new(mode, rng.choice([(8, 8), (1, 1), (300, 2), (2, 300)])).save(victim.with_suffix(rng.choice([".png", ".bmp", ".jpg"])))
        except (OSError, ValueError):  # a mode the format cannot hold: leave a file of the wrong kind instead
            victim.write_bytes(b"\x00" * 64)
    elif kind == "empty class":
        for f in (out / victim.parent.name).iterdir():
            f.unlink()
    elif kind == "one class":
        for d in sorted(out.iterdir())[1:]:
            shutil.rmtree(d)
    elif kind == "nested":
        (victim.parent / "inner").mkdir()
        victim.rename(victim.parent / "inner" / victim.name)
    elif kind == "no classes":
        for d in sorted(out.iterdir()):
            shutil.rmtree(d)
    elif kind == "file as class":
        (out / "notes.png").write_bytes(victim.read_bytes())
    elif kind == "symlink loop":
        (victim.parent / "loop").symlink_to(victim.parent, target_is_directory=True)
    elif kind == "odd name":
        victim.rename(victim.parent / rng.choice(["..png", " .png", "\u00e9\u00e8.png", "a\nb.png", ".hidden.png", "x.PNG"]))
    elif kind == "huge file count":
        for i in range(200):
            shutil.copy(victim, victim.parent / f"copy{i}.png")
    return f"{kind} ({victim.relative_to(out)})"


def mutate_flash_store(seed: Path, out: Path, rng: random.Random) -> str:
    """A copy of a flash store with a damaged manifest, FFN file, resident tensors or metadata."""
    shutil.copytree(seed, out)
    target = rng.choice(["manifest.json", "manifest.json", "ffn.bin", "resident.safetensors", "metadata.json", "missing"])
    if target == "missing":
        name = rng.choice(["manifest.json", "ffn.bin", "resident.safetensors", "metadata.json"])
        (out / name).unlink()
        return f"{name} missing"
    path = out / target
    if target.endswith(".json") and rng.random() < 0.7:
        return f"{target}: {_mutate_json_file(path, rng)}"
    return f"{target}: {_mutate_bytes(path, rng)}"


def mutate_plan_store(seed: Path, gguf: Path, out: Path, rng: random.Random) -> str:
    """A copy of a streaming plan store over its own copy of the GGUF, with the manifest or that GGUF damaged."""
    shutil.copytree(seed, out)
    model = out / "model.gguf"
    shutil.copy(gguf, model)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"].update(name=str(model), file=str(model))
    (out / "manifest.json").write_text(json.dumps(manifest))
    target = rng.choice(["manifest.json", "manifest.json", "manifest.json", "model.gguf", "missing"])
    if target == "missing":
        name = rng.choice(["manifest.json", "model.gguf"])
        (out / name).unlink()
        return f"{name} missing"
    if target == "manifest.json" and rng.random() < 0.8:
        return f"{target}: {_mutate_json_file(out / target, rng)}"
    return f"{target}: {_mutate_bytes(out / target, rng)}"


def _mutate_json_file(path: Path, rng: random.Random) -> str:
    """One field of a JSON file changed, deleted or replaced (or the whole document); says which."""
    doc = json.loads(path.read_text())
    trail, node = [], doc
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:  # walk down to a random field
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        trail.append(key)
        parent, node = node, node[key]
    if not trail:
        doc = _mutate_json_value(doc, rng)
    elif rng.random() < 0.2:
        del parent[trail[-1]]
    else:
        parent[trail[-1]] = _mutate_json_value(node, rng) if rng.random() < 0.6 else _nudge(node, rng)
    path.write_text(json.dumps(doc, allow_nan=True))
    return f"{'.'.join(map(str, trail)) or 'document'} changed"


def _mutate_bytes(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    how = rng.choice(["bitflip", "truncate", "extend", "header"])
    if how == "bitflip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        data = data[: rng.randrange(len(data))]
    elif how == "extend":
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 4096, 65536])))
    else:  # the first 8 bytes: safetensors' header length, GGUF's magic and version, the start of JSON elsewhere
        data[:8] = _hurtful(int.from_bytes(data[:8], "little"), 8, rng).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return how


def _nudge(value, rng: random.Random):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, value * 2, -value, value + 4096])
    if isinstance(value, float):
        return rng.choice([value * 2, -value, value + 1e-3, 0.0])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], value.upper(), "../" + value])
    return value
