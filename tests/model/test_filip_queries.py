"""FILIP with word queries only (``LoupeConfig.filip_queries="words"``, [ours]): the loss against its
definition, where its gradient goes, and the errors for a bad setting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loupe.config import LoupeConfig
from loupe.losses import filip_loss


def word_scores(p, w, pm, wm, center=False):
    """float64 loops: ``S[b, a]`` = mean over caption b's valid words of the max over image a's valid
    patches (centred over the patches of a when ``center``); 0 for a caption without words."""
    S = torch.zeros(w.shape[0], p.shape[0], dtype=torch.float64)
    for b in range(w.shape[0]):
        for a in range(p.shape[0]):
            wi, pi = wm[b].nonzero().flatten(), pm[a].nonzero().flatten()
            if len(wi) == 0 or len(pi) == 0:
                continue
            s = w[b, wi].double() @ p[a, pi].double().T
            if center:
                s = s - s.mean(1, keepdim=True)
            S[b, a] = s.max(1).values.mean()
    return S


def _batch(seed, B=5, Lp=7, Lw=6, D=8):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, Lp, D, generator=g, dtype=torch.float64)
    w = torch.randn(B, Lw, D, generator=g, dtype=torch.float64)
    pm, wm = torch.rand(B, Lp, generator=g) > 0.3, torch.rand(B, Lw, generator=g) > 0.3
    pm[:, 0] = True
    wm[1] = False  # a caption without words scores 0 against every image
    return p, w, pm, wm


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("center", [False, True])
def test_word_queries_match_the_definition(seed, center):
    p, w, pm, wm = _batch(seed)
    scale = torch.tensor(3.0, dtype=torch.float64)
    got = filip_loss(p, pm, w, wm, scale, center=center, queries="words")
    S = scale * word_scores(p, w, pm, wm, center=center)  # [captions, images]
    lab = torch.arange(p.shape[0])
    want = 0.5 * (F.cross_entropy(S.T, lab) + F.cross_entropy(S, lab))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, filip_loss(p, pm, w, wm, scale, center=center, queries="both"))


def test_a_patch_no_word_picks_gets_no_gradient():
    """With word queries a patch that is no word's arg-max (against any caption) gets zero gradient;
    FILIP's patch-query side gives it one (it must match some word of every caption)."""
    p, w, pm, wm = _batch(3)
    pm[:] = True
    scale = torch.tensor(3.0, dtype=torch.float64)
    picked = torch.zeros(p.shape[:2], dtype=torch.bool)
    for b in range(w.shape[0]):
        for a in range(p.shape[0]):
            wi = wm[b].nonzero().flatten()
            if len(wi):
                picked[a, (w[b, wi] @ p[a].T).argmax(1)] = True
    assert (~picked).any() and picked.any()
    grads = {}
    for queries in ("words", "both"):
        leaf = p.clone().requires_grad_(True)
        filip_loss(leaf, pm, w, wm, scale, queries=queries).backward()
        grads[queries] = leaf.grad.abs().sum(-1)
    assert torch.all(grads["words"][~picked] == 0)
    assert torch.all(grads["words"][picked] > 0)
    assert torch.all(grads["both"][~picked] > 0)


def test_bad_setting_raises():
    p, w, pm, wm = _batch(0)
    with pytest.raises(ValueError, match="queries must be one of"):
        filip_loss(p, pm, w, wm, torch.tensor(1.0, dtype=torch.float64), queries="patches")
    with pytest.raises(ValueError, match="filip_queries"):
        LoupeConfig(filip_queries="patch")


def test_the_objective_default_and_old_checkpoints():
    """LOUPE scores L_FILIP by word queries by default, FILIP keeps its own two directions; a given
    setting wins; a config saved before the field existed (its runs trained with FILIP's two
    directions) loads with "both", and a saved setting is kept."""
    assert LoupeConfig().filip_queries == "words"
    assert LoupeConfig(objective="filip").filip_queries == "both"
    assert LoupeConfig(objective="loupe", filip_queries="both").filip_queries == "both"
    saved = LoupeConfig().to_dict()
    assert saved["filip_queries"] == "words"
    assert LoupeConfig.from_dict(saved).filip_queries == "words"
    del saved["filip_queries"]
    assert LoupeConfig.from_dict(saved).filip_queries == "both"


def test_the_model_term_reads_the_setting():
    """``LoupeConfig.filip_queries`` reaches the model's L_FILIP: same weights, same batch, the term
    equals ``filip_loss`` on the model's tokens with that setting."""
    from loupe.model import LoupeModel

    tiny = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, vocab_size=50,
                context_length=16, text_width=32, text_layers=2, text_heads=2, embed_dim=32, region_hidden=16,
                num_regions=4, objective="filip")
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(4, 7, dtype=torch.long)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for b, n in enumerate((3, 4, 5, 3)):  # [BOS]=2 words... [EOS]=3, padded with 0
        ids[b, 0], ids[b, 1:1 + n], ids[b, 1 + n] = 2, torch.randint(4, 50, (n,), generator=g), 3
        mask[b, :n + 2] = True
    batch = {"images": torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), "input_ids": ids,
             "attention_mask": mask}
    values = {}
    for queries in ("both", "words"):
        torch.manual_seed(0)
        model = LoupeModel(LoupeConfig(filip_queries=queries, **tiny)).double().eval()
        out = model(batch)
        _, patches = model.encode_image_tokens(batch["images"])
        _, words, wmask = model.encode_text_tokens(ids, mask)
        want = filip_loss(patches, None, words, wmask, model.scale("filip"), queries=queries)
        torch.testing.assert_close(out["loss_filip"], want, rtol=1e-10, atol=1e-12)
        values[queries] = float(out["loss_filip"].detach())
    assert values["both"] != pytest.approx(values["words"], abs=1e-6)
