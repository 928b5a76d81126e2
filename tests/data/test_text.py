"""Tokenizers (offsets, save/load, unknown words) and the noun-phrase chunker."""
import pytest

import loupe.data as ld


def test_word_tokenizer_offsets_and_roundtrip(tmp_path):
    ds = ld.build_dataset("synthetic", "train", seed=0, size=500)
    tok = ld.fit_tokenizer(ds)
    assert isinstance(tok, ld.WordTokenizer)
    cap = "A large Red circle, left of a zebra"
    ids, offs = tok.encode(cap)
    assert [cap[s:e] for s, e in offs] == ["A", "large", "Red", "circle", ",", "left", "of", "a", "zebra"]
    assert ids[-1] == tok.unk_id and tok.unk_id not in ids[:-1]
    p = tmp_path / "tok.json"
    tok.save(str(p))
    tok2 = ld.load_tokenizer(str(p))
    assert tok2.vocab_size == tok.vocab_size and tok2.encode(cap) == (ids, offs)
    # every word the generator can say in 500 training captions is in the vocabulary
    for c in ds.captions():
        assert tok.unk_id not in tok.encode(c)[0]


def test_subword_tokenizer_unknown_words(tmp_path):
    caps = ["a dog running on the beach", "two cats sleeping on a red sofa", "a man riding a horse"] * 20
    tok = ld.train_tokenizer(caps, "subword", vocab_size=200, min_frequency=1)
    cap = "a doggo running, on the couch"
    ids, offs = tok.encode(cap)
    assert len(ids) == len(offs) > 0
    assert all(0 <= s < e <= len(cap) for s, e in offs)
    assert offs == sorted(offs)
    p = tmp_path / "sub.json"
    tok.save(str(p))
    tok2 = ld.load_tokenizer(str(p))
    assert isinstance(tok2, ld.SubwordTokenizer) and tok2.encode(cap) == (ids, offs)
    (tmp_path / "bad.json").write_text('{"type": "nope"}')
    with pytest.raises(ValueError):
        ld.load_tokenizer(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("text,expected", [
    ("a man riding a horse on the beach", ["a man", "a horse", "the beach"]),
    ("two dogs playing in the snow next to a red car", ["two dogs", "the snow", "a red car"]),
    ("a large red circle to the left of the small blue square.", ["a large red circle", "the small blue square"]),
    ("there is a cat and a dog", ["a cat", "a dog"]),
    ("", []),
])
def test_chunker(text, expected):
    spans = ld.chunk_noun_phrases(text)
    assert [text[s:e] for s, e in spans] == expected


def test_chunker_finds_every_generated_phrase():
    for kind in ("train", "compositional"):
        ds = ld.build_dataset("synthetic", kind, seed=0, size=1000)
        for i in range(1000):
            sc = ds.scene(i, render=False)
            assert set(map(tuple, sc.spans)) <= set(ld.chunk_noun_phrases(sc.caption)), sc.caption
