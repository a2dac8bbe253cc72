"""The model's own tokenizer, built with the `tokenizers` library from GGUF metadata.

Two kinds, by `tokenizer.ggml.model`:
- "gpt2": a byte-level BPE as `tokenizer.ggml.tokens` (already in GPT-2's byte alphabet) and
  `tokenizer.ggml.merges`, with its pre-tokenizer named in `tokenizer.ggml.pre`; the table below
  follows llama.cpp's reading of those names (SmolLM2, Llama 3, Qwen2).
- "llama": a SentencePiece BPE vocabulary, pieces with scores and no merges (Gemma, Llama 2).
  SentencePiece merges, at each step, the adjacent pair whose concatenation is the piece with the
  highest score, starting from characters, with byte fallback; that is a `tokenizers` BPE whose
  merge list is every split (left, right) of every piece into two pieces, ordered by the piece's
  score (`_sentencepiece_merges`). Spaces are written "▁". Control pieces stay whole as special
  tokens; user-defined pieces (Gemma: runs of newlines, spaces and tabs, HTML tags) are matched
  whole before BPE, as SentencePiece and llama.cpp do.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.decoders import DecodeStream

from edgewise.errors import EdgewiseError
from edgewise.gguf_io import GGUFFile

_PIECE_END = re.compile(r"(?<=\S)\n(?=\S)")  # where encode_long may end a piece: a lone line break between non-space characters

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2: every digit its own piece


def _byte_level(split: str | None, digits: bool) -> pre_tokenizers.PreTokenizer:
    steps: list = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


# tokenizer.ggml.pre -> the pre-tokenizer its merges were learned with.
PRE_TOKENIZERS = {
    "default": lambda: _byte_level(None, digits=False),
    "gpt-2": lambda: _byte_level(None, digits=False),
    # SmolLM/StarCoder: every digit is its own word, then GPT-2's byte-level split.
    "smollm": lambda: _byte_level(None, digits=True),
    "starcoder": lambda: _byte_level(None, digits=True),
    "refact": lambda: _byte_level(None, digits=True),
    "llama3": lambda: _byte_level(_LLAMA3_SPLIT, digits=False),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT, digits=False),
    "smaug-bpe": lambda: _byte_level(_LLAMA3_SPLIT, digits=False),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT, digits=False),
}
# tokenizer.ggml.pre -> the Unicode normalization its text gets first (none where absent).
NORMALIZERS = {"qwen2": normalizers.NFC}

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
SPIECE_SPACE = "\u2581"
# Tokens that end a turn or a text: generation stops at any of them (besides the GGUF's EOS).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>")


def _sentencepiece_merges(tokens: list[str], vocab: dict[str, int], scores, types) -> list[tuple[str, str]]:
    """Every split (left, right) of every mergeable piece into two pieces: best-scoring piece first,
    then by position in the file, then the longer left part first."""
    keyed = []
    for index, token in enumerate(tokens):
        if len(token) < 2 or types[index] not in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED) or vocab.get(token) != index:
            continue
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                keyed.append((-float(scores[index]), index, -cut, left, right))
    keyed.sort()
    return [(left, right) for *_, left, right in keyed]


def _sentencepiece_tokenizer(gguf: GGUFFile, tokens: list[str], vocab: dict[str, int], types: list[int]) -> Tokenizer:
    scores = gguf.metadata.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        scores = [-float(i) for i in range(len(tokens))]  # no scores: file order is merge order
    unk = gguf.metadata.get("tokenizer.ggml.unknown_token_id")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(tokens, vocab, scores, types), unk_token=tokens[int(unk)] if unk is not None else None, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gguf.metadata.get("tokenizer.ggml.add_space_prefix", True):  # Llama 2: "▁" before the text, stripped again on decode
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:  # Gemma
        tk.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    tk.decoder = decoders.Sequence(steps)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL])
    # a user-defined piece spelled with "▁" matches the normalized text; one spelled with real spaces, the raw text
    tk.add_tokens([AddedToken(t, special=False, normalized=SPIECE_SPACE in t) for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED])
    return tk


class TextTokenizer:
    """Encode and decode text exactly as the GGUF's model expects; special tokens stay whole."""

    def __init__(self, tokenizer: Tokenizer, bos_id: int | None, eos_id: int | None, add_bos: bool, eot_ids: set[int]):
        self.backend = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.eot_ids = eot_ids  # tokens that end a turn or a text: generation stops at any of them

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "TextTokenizer":
        kind = gguf.require("tokenizer.ggml.model")
        if not isinstance(kind, str) or kind not in ("gpt2", "llama"):
            raise EdgewiseError(
                f"{gguf.path}: tokenizer type '{kind}' is not supported yet; edgewise reads byte-level BPE ('gpt2') and SentencePiece ('llama') tokenizers"
            )
        tokens: list[str] = gguf.require("tokenizer.ggml.tokens", list)
        types = gguf.metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or not isinstance(types, list) or len(types) != len(tokens):
            raise EdgewiseError(f"{gguf.path}: metadata 'tokenizer.ggml.tokens' and 'tokenizer.ggml.token_type' must be lists of equal length (token strings, type ids)")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        try:
            tk = cls._build(gguf, kind, tokens, vocab, types)
        except EdgewiseError:
            raise
        except Exception as exc:  # the tokenizers library rejects an inconsistent vocabulary (a corrupted file)
            fields = "tokenizer.ggml.tokens/scores" if kind == "llama" else "tokenizer.ggml.tokens/merges"
            raise EdgewiseError(
                f"{gguf.path}: the tokenizer in {fields} is inconsistent ({str(exc).splitlines()[0][:200]}); the file is probably"
                " corrupted: download or assemble it again"
            ) from None
        if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise EdgewiseError(f"{gguf.path}: tokenizer vocabulary has duplicate tokens")

        bos = gguf.metadata.get("tokenizer.ggml.bos_token_id")
        eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
        for key, value in (("bos", bos), ("eos", eos)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tokens)):
                raise EdgewiseError(f"{gguf.path}: metadata 'tokenizer.ggml.{key}_token_id' is {value!r}, not a token id 0..{len(tokens) - 1}")
        eot = {int(eos)} if eos is not None else set()
        for name in END_OF_TURN:
            if name in vocab and types[vocab[name]] == TOKEN_TYPE_CONTROL:
                eot.add(vocab[name])
        add_bos = bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", False))
        return cls(tk, int(bos) if bos is not None else None, int(eos) if eos is not None else None, add_bos, eot)

    @staticmethod
    def _build(gguf: GGUFFile, kind: str, tokens: list[str], vocab: dict[str, int], types: list[int]) -> Tokenizer:
        if kind == "llama":
            tk = _sentencepiece_tokenizer(gguf, tokens, vocab, types)
        else:
            pre = gguf.metadata.get("tokenizer.ggml.pre", "default")
            if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
                raise EdgewiseError(
                    f"{gguf.path}: pre-tokenizer '{pre}' is unknown to edgewise; known: {', '.join(sorted(PRE_TOKENIZERS))}"
                )
            merges = [tuple(m.split(" ", 1)) for m in gguf.require("tokenizer.ggml.merges", list)]
            tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
            tk.pre_tokenizer = PRE_TOKENIZERS[pre]()
            if pre in NORMALIZERS:
                tk.normalizer = NORMALIZERS[pre]()
            tk.decoder = decoders.ByteLevel()
            tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL])
            tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED])
        return tk

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_long(self, text: str, piece_chars: int = 1 << 16) -> array:
        """The ids of a long text (a user's files, a corpus) as an int32 array, encoded a piece at a time. One call
        on megabytes of text leaves the tokenizer's freed buffers resident (3.6 MB of Austen: +264 MB RSS that
        training would then count as inference footprint), and a list costs 36 bytes a token against 4 here.
        Pieces end after a lone line break between non-space characters: both byte-level pre-tokenizers (GPT-2's,
        Qwen2's) end a piece there anyway, while a run of whitespace at a piece's end would split otherwise than in the
        whole text. So the ids equal one call's (tests/test_tokenizer.py, test_embedded_models.py). A SentencePiece
        tokenizer sees the text whole: it may prefix each call with "▁" and does not split at line breaks."""
        if not isinstance(self.backend.decoder, decoders.ByteLevel):
            return array("i", self.encode(text))
        ids = array("i", self.encode(text[:0]))  # the BOS, if the model adds one
        start = 0
        while start < len(text):
            cut = _PIECE_END.search(text, start + piece_chars)
            end = cut.end() if cut else len(text)
            ids.extend(self.backend.encode(text[start:end], add_special_tokens=False).ids)
            start = end
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self, ids: Iterable[int], skip_special: bool = True) -> Iterator[str]:
        """Text pieces as tokens arrive; a piece is held back until its UTF-8 bytes are complete."""
        state = DecodeStream(skip_special_tokens=skip_special)
        for i in ids:
            piece = state.step(self.backend, i)
            if piece:
                yield piece
