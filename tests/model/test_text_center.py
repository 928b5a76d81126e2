"""``text_center_words``: word tokens minus their caption's mean word token (loupe.model.center_words)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loupe.config import LoupeConfig
from loupe.model import LoupeModel
from loupe.transformer import center_words

SMALL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
             text_layers=1, text_heads=2, embed_dim=16, vocab_size=50, context_length=8, objective="filip")


def test_center_words_against_a_direct_computation():
    torch.manual_seed(0)
    tok = F.normalize(torch.randn(3, 6, 5, dtype=torch.float64), dim=-1)
    wm = torch.tensor([[0, 1, 1, 1, 0, 0],    # three words
                       [0, 1, 0, 0, 0, 0],    # one word: left as it is
                       [0, 0, 0, 0, 0, 0]],   # no words
                      dtype=torch.bool)
    out = center_words(tok, wm)
    mean = tok[0, 1:4].mean(0)
    torch.testing.assert_close(out[0, 1:4], F.normalize(tok[0, 1:4] - mean, dim=-1), rtol=0, atol=1e-12)
    # positions that are not words, one-word captions and captions without words are untouched
    keep = ~wm.clone()
    keep[1] = True
    torch.testing.assert_close(out[keep], tok[keep], rtol=0, atol=0)
    # a phrase map minus the caption's mean map, up to the positive renormalisation of each word
    x = torch.randn(7, 5, dtype=torch.float64)
    raw = tok[0, 1:4] @ x.T
    centred = (tok[0, 1:4] - mean) @ x.T
    torch.testing.assert_close(centred, raw - raw.mean(0, keepdim=True), rtol=0, atol=1e-12)
    assert torch.equal(out[0, 1:4] @ x.T > 0, centred > 0)


def test_center_words_removes_a_component_every_word_shares():
    """Words that share one direction (a caption-wide component) keep only what tells them apart."""
    shared = torch.tensor([1.0, 0, 0, 0])
    a, b = torch.tensor([0, 1.0, 0, 0]), torch.tensor([0, 0, 1.0, 0])
    tok = F.normalize(torch.stack([shared * 3 + a, shared * 3 + b]), dim=-1)[None]
    out = center_words(tok, torch.ones(1, 2, dtype=torch.bool))
    assert out[0, :, 0].abs().max() < 1e-6
    assert out[0, 0] @ a > 0.7 and out[0, 1] @ b > 0.7


def test_model_option_centres_the_word_tokens_and_nothing_else():
    torch.manual_seed(0)
    plain = LoupeModel(LoupeConfig(text_center_words=False, **SMALL)).eval()
    centred = LoupeModel(LoupeConfig(text_center_words=True, **SMALL)).eval()
    centred.load_state_dict(plain.state_dict())
    ids = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0], [2, 20, 3, 0, 0, 0, 0, 0]])
    mask = ids != 0
    p0, t0, w0 = plain.encode_text_tokens(ids, mask)
    p1, t1, w1 = centred.encode_text_tokens(ids, mask)
    assert torch.equal(w0, w1)
    torch.testing.assert_close(p1, p0)                               # the global embedding is unchanged
    torch.testing.assert_close(t1, center_words(t0, w0))
    assert not torch.allclose(t1[0, 1:4], t0[0, 1:4])
    torch.testing.assert_close(t1[1], t0[1])                         # one word: unchanged
    # gradients reach the text tower through the centred tokens
    t1[0, 1:4].sum().backward()
    assert centred.text.proj.weight.grad is not None and centred.text.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_text_center_words(bad):
    with pytest.raises(ValueError, match="text_center_words"):
        LoupeConfig(text_center_words=bad, **SMALL)


def test_default_is_on_and_old_configs_load_without_it():
    assert LoupeConfig(**SMALL).text_center_words is True
    d = LoupeConfig(**SMALL).to_dict()
    assert LoupeConfig.from_dict(d).text_center_words is True
    del d["text_center_words"]  # a checkpoint saved before the field existed
    assert LoupeConfig.from_dict(d).text_center_words is False
