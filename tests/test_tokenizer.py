"""The GGUF-built tokenizer: exact round trips, the SmolLM pre-tokenizer, special tokens, chat template."""

from __future__ import annotations

TEXT = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "  The slings and arrows of outrageous fortune — café, naïve, “quotes”, 日本語, emoji 🙂\n\n\tTabs."
)


def test_round_trip_is_exact(lm_fp32):
    tok = lm_fp32.tokenizer
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_streaming_decode_joins_to_the_full_text(lm_fp32):
    tok = lm_fp32.tokenizer
    assert "".join(tok.stream(tok.encode(TEXT))) == TEXT  # multi-byte characters split across tokens stay whole


def test_digits_are_split_one_per_token(lm_fp32):
    """SmolLM's pre-tokenizer ('smollm' in GGUF) isolates every digit, as llama.cpp and HF's tokenizer.json do."""
    tok = lm_fp32.tokenizer
    pieces = [tok.decode([i]) for i in tok.encode("in 2024")]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_special_tokens_stay_whole(lm_fp32):
    tok = lm_fp32.tokenizer
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.bos_id == 1 and ids[-1] == 2
    assert tok.eos_id in tok.eot_ids and 2 in tok.eot_ids


def test_matches_transformers_on_digit_free_text(lm_fp32, hf_tokenizer):
    """transformers reads 'smollm' with GPT-2's regex (no digit split), so compare on text without digits."""
    assert lm_fp32.tokenizer.encode(TEXT) == hf_tokenizer.encode(TEXT, add_special_tokens=False)


def test_chat_template_matches_transformers(lm_fp32, hf_tokenizer):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    ours = lm_fp32.chat_template.render(messages, add_generation_prompt=True)
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n")


def test_long_text_encodes_piecewise_to_the_same_ids(lm_fp32):
    """encode_long cuts a long text at lone line breaks between non-space characters; the ids equal one call's, BOS
    included, on a stretch of Austen with its blank lines, indented verse and a text with no line break at all."""
    from edgewise.data.text import load_text

    tok = lm_fp32.tokenizer
    austen = load_text("austen")[:300_000]
    for text in (austen, TEXT * 50, "no line break " * 10_000, "", "\n\n  \n"):
        assert list(tok.encode_long(text, piece_chars=997)) == tok.encode(text)
