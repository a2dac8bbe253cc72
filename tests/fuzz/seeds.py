"""The well-formed inputs the mutators start from, small enough that a case that parses still runs in
well under a second: a tiny llama GGUF with a 1024-token slice of SmolLM2's vocabulary, its flash
store, an npz dataset and an image folder of 8x8 images, a sparse update scheme."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 1024  # SmolLM2's first tokens: its specials, the 256 byte tokens, then merges in rank order
DIM, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2


def write_gguf(path: Path, source: Path) -> Path:
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFWriter, quants

    from edgewise.gguf_io import read_gguf

    meta = read_gguf(source).metadata
    tokens = meta["tokenizer.ggml.tokens"][:VOCAB]
    known = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"] if (lambda a, b: a in known and b in known and a + b in known)(*m.split(" ", 1))]
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_string("tokenizer.ggml.model", meta["tokenizer.ggml.model"])
    w.add_string("tokenizer.ggml.pre", meta["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(meta["tokenizer.ggml.token_type"][:VOCAB])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(meta["tokenizer.chat_template"])

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", quants.quantize(rand(VOCAB, DIM), QT.Q8_0), raw_dtype=QT.Q8_0)
    w.add_tensor("output_norm.weight", 1 + rand(DIM))
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", 1 + rand(DIM))
        w.add_tensor(p + "ffn_norm.weight", 1 + rand(DIM))
        for name, rows, cols in (("attn_q", DIM, DIM), ("attn_k", DIM // 2, DIM), ("attn_v", DIM // 2, DIM), ("attn_output", DIM, DIM),
                                 ("ffn_gate", FFN, DIM), ("ffn_up", FFN, DIM), ("ffn_down", DIM, FFN)):
            w.add_tensor(p + name + ".weight", quants.quantize(rand(rows, cols), QT.Q4_1), raw_dtype=QT.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y=np.arange(12) % 3)
    return path


def scheme() -> dict:
    return {"bias_depth": 2, "weights": {"features.16.conv.0.0": 0.25, "features.15.conv.0.0": 0.125}, "classifier": True}


def write_seeds(folder: Path, source_gguf: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheme.json").write_text(json.dumps(scheme()))
    seeds = {"gguf": write_gguf(folder / "tiny.gguf", source_gguf), "npz": write_npz(folder / "data.npz"), "scheme": folder / "scheme.json"}
    seeds["images"] = write_image_folder(folder / "images")
    seeds["flash"] = write_flash_store(folder / "store", seeds["gguf"])
    seeds["plan"] = write_plan_store(folder / "plan", seeds["gguf"])
    return seeds


def write_image_folder(root: Path) -> Path:
    """Three classes of four 8x8 PNGs (gray, RGB and palette images mixed, as folders in the wild are)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert(["RGB", "L", "P"][(c + i) % 3])
            image.save(root / name / f"{i}.png")
    return root


def write_flash_store(store: Path, gguf: Path) -> Path:
    """`edgewise flash convert` of the tiny GGUF, with as little calibration as it accepts."""
    from edgewise.cli import main

    if main(["flash", "convert", str(store), "--model", str(gguf), "--calibration-tokens", "256", "--eval-tokens", "128", "--rank", "4"]) != 0:
        raise RuntimeError("flash convert of the fuzzing seed failed")
    return store


def write_plan_store(store: Path, gguf: Path) -> Path:
    """`edgewise flash convert --budget` of the tiny GGUF at its one-buffer minimum (two of its two layers' buffers
    would hold every FFN weight: nothing would stream)."""
    from edgewise.flash.plan_store import PlanStore
    from edgewise.flash.residency import _ring_bytes, model_parts
    from edgewise.gguf_io import read_gguf

    parts = model_parts(read_gguf(gguf))
    minimum = sum(p.nbytes for p in parts if p.required) + _ring_bytes([p for p in parts if p.layer >= 0], 1)
    PlanStore.write(store, gguf, minimum)
    return store


if __name__ == "__main__":  # the harness makes its seeds in a child, so that its own process never runs torch
    import sys

    from edgewise.kernels import quant_matmul_ops
    from edgewise.models import default_model_path

    quant_matmul_ops()  # built (once, cached) here: a first build inside a case would run into its time limit
    print(json.dumps({k: str(v) for k, v in write_seeds(Path(sys.argv[1]), default_model_path()).items()}))
