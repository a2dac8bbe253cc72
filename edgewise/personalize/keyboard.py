"""The keyboard: next-word suggestions from a language model, and what they save a user.

`suggest(lm, text)` returns the most likely words to come next, as a phone keyboard's suggestion bar shows them. If
`text` ends inside a word ("I am goi"), they complete that word; after a space, they are the next word. Words span
several tokens, so the suggestions come from a small beam search over tokens:
- the text before the word is run once (the word's first token carries its leading space, as BPE vocabularies
  have it);
- a beam keeps the `beams` most likely token sequences that spell a word consistent with what is typed;
- each beam, extended by up to `depth` tokens, ends its word with the probability that the next token starts with
  a non-letter (a space, punctuation): a word's score is P(its tokens) x P(a word end after them).

`keystroke_savings` replays a text as a user typing it word by word: before each word and after each typed letter the
bar shows 3 suggestions; when the word is among them, one tap accepts it (with its space). It reports the next-word
top-3 accuracy (the word in the bar before its first letter) and the keystroke savings, the share of keystrokes the
user did not type: (characters - keystrokes) / characters, over the words' letters and their spaces. Approximation,
stated: the bar after typed letters is the list computed at the word's start (`pool` words, `pool_beams` beams)
filtered by the typed prefix, where a keyboard would recompute; it can only understate what a recomputing
keyboard suggests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from edgewise.errors import EdgewiseError

WORD = re.compile(r"[A-Za-z][A-Za-z']*")
CONTEXT_CHARS = 600  # the text before a word that the model sees (the rest is cut at a word boundary)


@lru_cache(maxsize=4)
def _pieces(tokenizer) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Each token's text; masks of the tokens that are letters only, and of those that start a new word (a non-letter)."""
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    letters = torch.tensor([p.isalpha() or (p.replace("'", "").isalpha() and not p.startswith("'")) for p in pieces])
    ends = torch.tensor([bool(p) and not p[0].isalpha() and p[0] != "'" for p in pieces])
    return pieces, letters, ends


def _split(text: str) -> tuple[str, str]:
    """(text before the word being typed, its typed letters)."""
    m = re.search(r"[A-Za-z']*$", text)
    return text[: m.start()], m.group(0)


def suggest(lm, text: str, k: int = 3, beams: int = 8, depth: int = 3) -> list[tuple[str, float]]:
    """The `k` most likely next words (or completions of the word being typed) after `text`, with probabilities."""
    if k < 1 or beams < 1 or depth < 1:
        raise EdgewiseError(f"k, beams and depth must be at least 1, got {k}, {beams}, {depth}")
    head, typed = _split(text[-CONTEXT_CHARS:])
    lead = " " if head.endswith(" ") else ""
    head = head[:-1] if lead else head
    pieces, letters, ends = _pieces(lm.tokenizer)
    ids = lm.tokenizer.encode(head) if head else []
    if not ids and lm.tokenizer.bos_id is not None:
        ids = [lm.tokenizer.bos_id]
    if not ids:
        raise EdgewiseError("give some text before the word to suggest")
    cache = lm.new_cache(len(ids) + depth + 2)
    logp = torch.log_softmax(lm.prefill(ids, cache)[-1].float(), -1)
    start = len(ids)
    target = lead + typed

    def fits(spelled: str) -> bool:  # consistent with the typed letters
        return spelled.startswith(target) or target.startswith(spelled)

    # first tokens: the lead (a space or nothing) then letters
    firsts = [(float(logp[i]), [i], pieces[i]) for i in torch.topk(logp, min(4096, logp.numel())).indices.tolist()
              if pieces[i].startswith(lead) and pieces[i][len(lead):].replace("'", "").isalpha() and fits(pieces[i])]
    beam = sorted(firsts, reverse=True)[:beams]
    words: dict[str, float] = {}
    for step in range(depth):
        grown = []
        for score, toks, spelled in beam:
            nxt = torch.log_softmax(lm.prefill(toks, cache, start=start)[-1].float(), -1)
            word = spelled[len(lead):]
            if word.startswith(typed) and len(word) > 0:
                end = float(torch.logsumexp(nxt[ends], 0))
                words[word] = max(words.get(word, -math.inf), score + end)  # the likelier spelling of a word counts
            if step + 1 < depth:
                top = torch.topk(torch.where(letters, nxt, -math.inf), beams)
                grown += [(score + float(v), toks + [int(i)], spelled + pieces[int(i)]) for v, i in zip(top.values, top.indices)
                          if math.isfinite(float(v)) and fits(spelled + pieces[int(i)])]
        beam = sorted(grown, reverse=True)[:beams]
        if not beam:
            break
    ranked = sorted(words.items(), key=lambda kv: -kv[1])[:k]
    return [(w, math.exp(s)) for w, s in ranked]


@dataclass(frozen=True)
class KeystrokeResult:
    words: int
    top3_hits: int  # words in the bar before their first letter
    characters: int  # letters and one space per word
    keystrokes: int  # typed letters, spaces and accepting taps

    @property
    def top3_accuracy(self) -> float:
        return self.top3_hits / self.words if self.words else 0.0

    @property
    def savings(self) -> float:
        return (self.characters - self.keystrokes) / self.characters if self.characters else 0.0


def keystroke_savings(lm, text: str, max_words: int | None = None, pool: int = 20, pool_beams: int = 16,
                      progress=None) -> KeystrokeResult:
    """Replay `text` as a user typing it with 3 suggestions shown (see the module); the first `max_words` words."""
    matches = list(WORD.finditer(text))[:max_words]
    if not matches:
        raise EdgewiseError("the text has no words to type")
    hits = chars = strokes = 0
    for n, m in enumerate(matches):
        word = m.group(0)
        before = text[max(0, m.start() - CONTEXT_CHARS) : m.start()]
        if not before.strip():
            chars += len(word) + 1
            strokes += len(word) + 1
            continue
        listed = [w for w, _ in suggest(lm, before, k=pool, beams=pool_beams)]
        chars += len(word) + 1
        accepted = None
        for typed in range(len(word)):
            bar = [w for w in listed if w.startswith(word[:typed]) and w != word[:typed]][:3]
            if typed == 0 and word in bar:
                hits += 1
            if word in bar:
                accepted = typed
                break
        strokes += len(word) + 1 if accepted is None else accepted + 1  # typed letters and one tap (with its space)
        if progress is not None:
            progress(n + 1, len(matches))
    return KeystrokeResult(len(matches), hits, chars, strokes)
