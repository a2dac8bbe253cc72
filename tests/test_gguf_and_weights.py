"""GGUF reading (good and bad files) and the exactness of the quantized repacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, quants

from edgewise.errors import EdgewiseError
from edgewise.gguf_io import read_gguf
from edgewise.lm.config import ModelConfig
from edgewise.lm.weights import GROUP, Int4Linear, Int8Linear, _q4_unpack, rope_row_order


def test_reads_default_model_config(gguf):
    cfg = ModelConfig.from_gguf(gguf)
    assert (cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tied_embeddings and cfg.rope_theta == 1e5
    assert gguf.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)


def test_missing_file(tmp_path):
    with pytest.raises(EdgewiseError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(EdgewiseError, match=r"model\.gguf: not a GGUF file"):
        read_gguf(bad)


@pytest.mark.parametrize("keep", [100, 4_000_000, 90_000_000])
def test_truncated_gguf(model_path, tmp_path, keep):
    """Cut inside the metadata, inside the tensor table's data, and near the end."""
    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        cut.write_bytes(src.read(keep))
    with pytest.raises(EdgewiseError, match=r"cut\.gguf: (corrupted or )?truncated"):
        read_gguf(cut)


def test_corrupted_header(model_path, tmp_path):
    bad = tmp_path / "bad.gguf"
    data = bytearray(model_path.read_bytes()[:1_000_000])
    data[8:16] = (2**62).to_bytes(8, "little")  # absurd tensor count
    bad.write_bytes(bytes(data))
    with pytest.raises(EdgewiseError, match=r"bad\.gguf: corrupted or truncated"):
        read_gguf(bad)


def _tiny_gguf(path, arch: str):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_other_architecture_is_named(tmp_path):
    path = tmp_path / "phi.gguf"
    _tiny_gguf(path, "phi3")
    with pytest.raises(EdgewiseError, match=r"phi\.gguf: architecture 'phi3' is not supported; edgewise runs llama, qwen2, qwen3, gemma3"):
        ModelConfig.from_gguf(read_gguf(path))


def test_missing_metadata_key_is_named(tmp_path):
    path = tmp_path / "partial.gguf"
    _tiny_gguf(path, "llama")
    with pytest.raises(EdgewiseError, match=r"partial\.gguf: GGUF metadata lacks required key 'llama\."):
        ModelConfig.from_gguf(read_gguf(path))


def test_q4_1_unpack_equals_gguf_dequantize(gguf):
    t = gguf.tensors["blk.3.ffn_gate.weight"]
    assert t.qtype == QT.Q4_1
    q, d, m = _q4_unpack(np.asarray(t.raw), t.shape[1], with_min=True)
    ours = (q.reshape(q.shape[0], -1, GROUP) * d[..., None] + m[..., None]).reshape(t.shape)
    np.testing.assert_array_equal(ours, quants.dequantize(t.raw, QT.Q4_1))


def test_int4_kernel_computes_the_q4_1_weights(gguf):
    """The packed int4 layer equals x @ W.T with W = Q4_1 values whose d, m are rounded to bf16 (the only loss)."""
    t = gguf.tensors["blk.3.ffn_down.weight"]
    n, k = t.shape
    layer = Int4Linear.from_q4(np.asarray(t.raw), k, with_min=True)
    q, d, m = _q4_unpack(np.asarray(t.raw), k, with_min=True)
    d_bf = torch.from_numpy(d).to(torch.bfloat16).float()
    z_bf = (torch.from_numpy(m) + 8 * torch.from_numpy(d)).to(torch.bfloat16).float()
    w = ((torch.from_numpy(q).float().reshape(n, -1, GROUP) - 8) * d_bf[..., None] + z_bf[..., None]).reshape(n, k)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ref = x.float() @ w.T
    out = layer(x).float()
    # bf16 output rounding (8 bits of mantissa) bounds the difference
    torch.testing.assert_close(out, ref, atol=0.05, rtol=1e-2)
    exact = torch.from_numpy(quants.dequantize(t.raw, QT.Q4_1))
    assert (w - exact).abs().max() < 0.01  # bf16 rounding of d and m only


def test_int8_requantization_of_q8_0(gguf):
    t = gguf.tensors["token_embd.weight"]
    w = torch.from_numpy(np.array(quants.dequantize(t.raw[:1024], QT.Q8_0)))
    layer = Int8Linear.from_float(w)
    err = (layer.rows(torch.arange(1024)) - w).abs()
    bound = layer.scales[:1024].float()[:, None] * 0.5 + w.abs() * 2**-8  # half an int8 step + bf16 scale rounding
    assert (err <= bound + 1e-7).all()


def test_rope_row_order_inverts_the_converter_permutation():
    """convert_hf_to_gguf permutes HF's Q/K rows as reshape(H, 2, hd/2).swapaxes(1, 2); our order undoes it."""
    n_heads, head_dim, dim = 3, 8, 5
    hf = np.random.default_rng(0).standard_normal((n_heads * head_dim, dim))
    gguf_rows = hf.reshape(n_heads, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(gguf_rows[rope_row_order(n_heads, head_dim)], hf)


def test_array_reader_reads_what_gguf_reads(model_path):
    """edgewise's one-pass metadata arrays (gguf_io.ArrayReader) against gguf's own reader."""
    from gguf import GGUFReader

    from edgewise.gguf_io import ArrayReader

    ours, ref = ArrayReader(model_path), GGUFReader(model_path)
    assert list(ours.fields) == list(ref.fields)
    for key in ref.fields:
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [(t.name, t.data_offset, t.n_bytes) for t in ref.tensors]
