"""Centred FILIP (``LoupeConfig.filip_center``): the closed form equals the definition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loupe.losses import filip_loss


def centred_scores(q, k, qm, km):
    """float64 loops: mean over valid query tokens of max over valid keys of (s_ji - mean_i' s_ji')."""
    out = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for a in range(q.shape[0]):
        for b in range(k.shape[0]):
            qi, ki = qm[a].nonzero().flatten(), km[b].nonzero().flatten()
            if len(qi) == 0 or len(ki) == 0:
                continue
            s = q[a, qi].double() @ k[b, ki].double().T
            out[a, b] = (s - s.mean(1, keepdim=True)).max(1).values.mean()
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_centred_filip_matches_definition(seed):
    g = torch.Generator().manual_seed(seed)
    B, Lp, Lw, D = 5, 7, 6, 8
    p = torch.randn(B, Lp, D, generator=g, dtype=torch.float64)
    w = torch.randn(B, Lw, D, generator=g, dtype=torch.float64)
    pm, wm = torch.rand(B, Lp, generator=g) > 0.3, torch.rand(B, Lw, generator=g) > 0.3
    wm[1] = False  # a caption without words scores 0 both ways
    scale = torch.tensor(3.0, dtype=torch.float64)
    got = filip_loss(p, pm, w, wm, scale, center=True)
    lab = torch.arange(B)
    want = 0.5 * (F.cross_entropy(scale * centred_scores(p, w, pm, wm), lab)
                  + F.cross_entropy(scale * centred_scores(w, p, wm, pm), lab))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, filip_loss(p, pm, w, wm, scale, center=False))

