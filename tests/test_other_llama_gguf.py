"""Small GGUFs of each decoder-only architecture, written here with gguf's own writer: llama (other head
counts, an untied Q8_0 output layer, Q4_0 and F16 weights), qwen2 (QKV biases, NeoX RoPE) and qwen3
(per-head q/k norms, a head size other than dim / heads). Loaded by edgewise and by transformers alike."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES

from edgewise.errors import EdgewiseError
from edgewise.kernels import quant_matmul_ops
from edgewise.lm.runtime import LanguageModel
from edgewise.lm.weights import KQuantLinear

DIM, FFN, HEADS, KV_HEADS, LAYERS = 128, 256, 8, 2, 2
QWEN3_HEAD_DIM = 128  # != DIM // HEADS: Qwen3 states its head size (transformers assumes 128, as every Qwen3 has)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order for Q and K, as convert_hf_to_gguf does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(gguf, path, arch: str, down_type: QT = QT.Q4_0):
    """`down_type`: the ffn_down tensors' type (random bytes for types gguf cannot quantize)."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    hd = QWEN3_HEAD_DIM if arch == "qwen3" else DIM // HEADS
    w.add_rope_dimension_count(hd)
    if arch == "qwen3":
        w.add_key_length(hd)
        w.add_value_length(hd)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        w.add_string(key, gguf.metadata[key])
    w.add_token_list(gguf.metadata["tokenizer.ggml.tokens"])
    w.add_token_merges(gguf.metadata["tokenizer.ggml.merges"])
    w.add_token_types(gguf.metadata["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    vocab = len(gguf.metadata["tokenizer.ggml.tokens"])

    def rand(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def add_q(name, arr, qtype):
        w.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)

    w.add_tensor("token_embd.weight", rand(vocab, DIM, scale=0.5).astype(np.float16))
    add_q("output.weight", rand(vocab, DIM), QT.Q8_0)
    w.add_tensor("output_norm.weight", 1 + rand(DIM, scale=0.1))
    permute = _permute if arch == "llama" else (lambda w, n: w)  # only llama's Q/K rows are stored interleaved
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", 1 + rand(DIM, scale=0.1))
        w.add_tensor(p + "ffn_norm.weight", 1 + rand(DIM, scale=0.1))
        add_q(p + "attn_q.weight", permute(rand(HEADS * hd, DIM), HEADS), QT.Q4_0)
        add_q(p + "attn_k.weight", permute(rand(KV_HEADS * hd, DIM), KV_HEADS), QT.Q4_0)
        w.add_tensor(p + "attn_v.weight", rand(KV_HEADS * hd, DIM).astype(np.float16))
        add_q(p + "attn_output.weight", rand(DIM, HEADS * hd), QT.Q8_0)
        if arch == "qwen2":
            for name, rows in (("attn_q", HEADS * hd), ("attn_k", KV_HEADS * hd), ("attn_v", KV_HEADS * hd)):
                w.add_tensor(p + name + ".bias", rand(rows, scale=0.5))
        if arch == "qwen3":
            w.add_tensor(p + "attn_q_norm.weight", 1 + rand(hd, scale=0.2))
            w.add_tensor(p + "attn_k_norm.weight", 1 + rand(hd, scale=0.2))
        add_q(p + "ffn_gate.weight", rand(FFN, DIM), QT.Q4_0)
        add_q(p + "ffn_up.weight", rand(FFN, DIM), QT.Q4_1)
        if down_type in (QT.Q4_0, QT.Q5_1):
            add_q(p + "ffn_down.weight", rand(DIM, FFN), down_type)
        else:
            block, size = GGML_QUANT_SIZES[down_type]
            raw = rng.integers(0, 256, (DIM, FFN // block, size), dtype=np.uint8)
            supers = {QT.Q3_K: 1, QT.Q2_K: 2}.get(down_type, 0)  # fp16 super-scales ending the block: Q3_K d; Q2_K d, dmin
            if supers:  # random codes and scales under small finite super-scales
                raw[..., size - 2 * supers :] = np.full(raw.shape[:2] + (supers,), 0.002, dtype=np.float16).view(np.uint8)
            w.add_tensor(p + "ffn_down.weight", raw.reshape(DIM, -1), raw_dtype=down_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def other_gguf(gguf, tmp_path_factory, request):
    return write_tiny(gguf, tmp_path_factory.mktemp("other") / f"tiny-{request.param}.gguf", request.param)


def test_fp32_logits_match_transformers(other_gguf):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(other_gguf.parent), gguf_file=other_gguf.name, dtype=torch.float32).eval()
    lm = LanguageModel.load(other_gguf, precision="fp32", compile=False)
    assert (lm.cfg.n_heads, lm.cfg.n_kv_heads, lm.cfg.tied_embeddings) == (HEADS, KV_HEADS, False)
    assert lm.cfg.head_dim == (QWEN3_HEAD_DIM if lm.cfg.arch == "qwen3" else DIM // HEADS)
    ids = lm.tokenizer.encode("A second model, with another shape, reads the same way.")
    ours = lm.prefill(ids, lm.new_cache(len(ids)), last_only=False)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_quantized_path_matches_fp32(other_gguf):
    fp32 = LanguageModel.load(other_gguf, precision="fp32", compile=False)
    quant = LanguageModel.load(other_gguf, precision="quant", compile=False)
    ids = fp32.tokenizer.encode("A second model, with another shape, reads the same way.")
    a = fp32.prefill(ids, fp32.new_cache(len(ids)), last_only=False)
    b = quant.prefill(ids, quant.new_cache(len(ids)), last_only=False)
    # Q4_0/Q4_1/Q8_0 stay exact; the F16 attn_v is held as bf16 in "quant" (3 mantissa bits fewer) and
    # gate|up and the attention output see int8-rounded activations: measured 1.1% of the largest logit
    # on this random-weight model (0.36% with all-int16 activations)
    assert (a - b).abs().max() < 0.03 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_unsupported_tensor_type_is_named(gguf, tmp_path):
    path = write_tiny(gguf, tmp_path / "iq.gguf", "llama", down_type=QT.IQ4_NL)
    with pytest.raises(EdgewiseError, match=r"iq\.gguf: tensor 'blk\.\d\.ffn_down\.weight' has type IQ4_NL, which edgewise does not run.*llama-quantize --allow-requantize"):
        LanguageModel.load(path, precision="quant", compile=False)


def test_q5_1_is_dequantized_with_a_warning(gguf, tmp_path):
    path = write_tiny(gguf, tmp_path / "q51.gguf", "llama", down_type=QT.Q5_1)
    with pytest.warns(UserWarning, match=r"2 Q5_1 tensors are dequantized to bf16"):
        lm = LanguageModel.load(path, precision="quant", compile=False)
    assert lm.model.blocks[0].ffn.down.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K], ids=["Q2_K", "Q3_K"])
def test_low_bit_k_quants_run_on_the_k_quant_kernel(gguf, tmp_path, qtype):
    """Q2_K and Q3_K stay in their GGUF blocks (KQuantLinear) and agree with the fp32 dequantization (the kernel
    itself is tested against gguf and a numpy model in test_kquant_kernels.py)."""
    if quant_matmul_ops() is None:
        pytest.skip("native kernels not built on this CPU")
    path = write_tiny(gguf, tmp_path / "lowbit.gguf", "llama", down_type=qtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dequantized
        quant = LanguageModel.load(path, precision="quant", compile=False)
    assert isinstance(quant.model.blocks[0].ffn.down, KQuantLinear) and quant.model.blocks[0].ffn.down.qtype == qtype
    fp32 = LanguageModel.load(path, precision="fp32", compile=False)
    ids = fp32.tokenizer.encode("Two or three bits a weight, and the answer is the same.")
    a = fp32.prefill(ids, fp32.new_cache(len(ids)), last_only=False)
    b = quant.prefill(ids, quant.new_cache(len(ids)), last_only=False)
    assert (a - b).abs().max() < 0.03 * a.abs().max()  # as test_quantized_path_matches_fp32: activation rounding
