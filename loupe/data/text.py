"""Tokenizers with character offsets, and a rule-based noun-phrase chunker.

Every tokenizer maps a caption to word-token ids *and* the character span of each token, so a
phrase's character span maps to a token span. Special tokens: ``[PAD]=0``, ``[UNK]=1``,
``[BOS]=2``, ``[EOS]=3``; :class:`loupe.data.Collator` adds BOS/EOS and padding.

- :class:`WordTokenizer`: lower-cased words and punctuation, vocabulary fit on the training
  captions, saved as JSON (enough for the built-in sets).
- :class:`SubwordTokenizer`: a WordPiece model trained offline with the ``tokenizers`` library for
  real captions; unknown words fall back to sub-words, then ``[UNK]``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterable

__all__ = ["WordTokenizer", "SubwordTokenizer", "load_tokenizer", "train_tokenizer", "chunk_noun_phrases",
           "SPECIALS"]

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]", re.IGNORECASE)


class _Base:
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Word-token ids of ``text`` (no special tokens) and each token's ``(start, end)`` characters."""
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Write the tokenizer as JSON (read back by :func:`load_tokenizer`)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    def to_dict(self) -> dict:
        raise NotImplementedError


class WordTokenizer(_Base):
    """Lower-cased word/punctuation tokens; words outside the vocabulary become ``[UNK]``."""

    def __init__(self, vocab: list[str]) -> None:
        if tuple(vocab[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def fit(cls, captions: Iterable[str], min_count: int = 1, max_size: int | None = None) -> "WordTokenizer":
        """Vocabulary of the words in ``captions`` seen at least ``min_count`` times (most frequent
        first, ties alphabetical, so the result is deterministic)."""
        counts = Counter(m.group().lower() for c in captions for m in _WORD.finditer(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max(0, max_size - len(SPECIALS))]
        if not words:
            raise ValueError("WordTokenizer.fit: no words in the captions")
        return cls(list(SPECIALS) + words)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text):
        ids, offs = [], []
        get, unk = self.index.get, self.unk_id
        for m in _WORD.finditer(text):
            ids.append(get(m.group().lower(), unk))
            offs.append(m.span())
        return ids, offs

    def to_dict(self) -> dict:
        return {"type": "word", "vocab": self.vocab}


class SubwordTokenizer(_Base):
    """WordPiece from the ``tokenizers`` library (lower-casing, accents stripped)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        for i, s in enumerate(SPECIALS):
            if tok.token_to_id(s) != i:
                raise ValueError(f"subword tokenizer must map {s} to id {i}")

    @classmethod
    def fit(cls, captions: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2) -> "SubwordTokenizer":
        """Train WordPiece on ``captions`` (offline; deterministic for the same input)."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(),
                                               normalizers.StripAccents()])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(SPECIALS), show_progress=False)
        tok.train_from_iterator(list(captions), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text):
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def to_dict(self) -> dict:
        return {"type": "subword", "tokenizer": json.loads(self.tok.to_str())}


def train_tokenizer(captions: Iterable[str], kind: str = "word", **kwargs) -> WordTokenizer | SubwordTokenizer:
    """Fit a ``"word"`` or ``"subword"`` tokenizer on ``captions``."""
    if kind == "word":
        return WordTokenizer.fit(captions, **kwargs)
    if kind == "subword":
        return SubwordTokenizer.fit(captions, **kwargs)
    raise ValueError(f"unknown tokenizer kind {kind!r} (word, subword)")


def load_tokenizer(path: str) -> WordTokenizer | SubwordTokenizer:
    """Read a tokenizer written by ``save``."""
    with open(path) as f:
        d = json.load(f)
    if d.get("type") == "word":
        return WordTokenizer(d["vocab"])
    if d.get("type") == "subword":
        from tokenizers import Tokenizer
        return SubwordTokenizer(Tokenizer.from_str(json.dumps(d["tokenizer"])))
    raise ValueError(f"{path}: not a loupe tokenizer file (type {d.get('type')!r})")


# ------------------------------------------------------------------------------------------------
# noun-phrase chunker
# ------------------------------------------------------------------------------------------------
_DET = set("a an the this that these those some one two three four five several many few its his her "
           "their our your my each every another no".split())
_BREAK = set(
    # prepositions and relation words
    "of in on at to from with without by for over under above below beneath beside besides near next "
    "behind between among into onto through across along around against inside outside toward towards "
    "while whilst during after before up down off out about upon within top left right front middle "
    "side "
    # conjunctions, pronouns, auxiliaries, common caption verbs and adverbs
    "and or but nor so yet as than then which who whom whose where when what that it they them he she "
    "we you i there here is are was were be been being am has have had do does did can could will "
    "would should may might must sits sit sitting lies lie lying stands stand standing appears appear "
    "shows show showing see seen sees holds hold holding looks look looking plays play playing rides "
    "ride riding walks walk walking runs run running eats eat eating wears wear wearing lays laying "
    "plus with"
    "very also just not too all both".split())
_NOUNISH_AFTER_DET = {"top", "left", "right", "front", "middle", "side"}


def chunk_noun_phrases(text: str) -> list[tuple[int, int]]:
    """Character spans of the noun phrases of ``text`` (rule-based).

    A phrase is an optional determiner followed by a maximal run of content words; prepositions,
    conjunctions, pronouns, auxiliaries, frequent caption verbs and punctuation end it. Words like
    "left"/"top"/"picture" start no phrase on their own; after a determiner they form one
    ("the picture") unless followed by "of" ("to the left of" is a relation). A lone determiner is
    not a phrase.
    """
    toks = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]
    spans, i, n = [], 0, len(toks)
    while i < n:
        w, s, _ = toks[i]
        j = i
        if w in _DET:
            j += 1
        k = j
        while k < n and toks[k][0][0].isalnum() and toks[k][0] not in _BREAK and toks[k][0] not in _DET:
            k += 1
        if k == j and j > i and j < n and toks[j][0] in _NOUNISH_AFTER_DET and not (
                j + 1 < n and toks[j + 1][0] == "of"):
            k = j + 1
        if k > j:
            spans.append((s, toks[k - 1][2]))
            i = k
        else:
            i = max(i + 1, j)
    return spans
