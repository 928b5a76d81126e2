"""SPARC's fine-grained loss (loupe.sparc) against a float64 loop oracle, its edge cases, and the
``sparc`` objective in the model and in a short training run."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from loupe.config import OBJECTIVES, LoupeConfig
from loupe.losses import LOSS_TERMS, resolve_loss_weights
from loupe.model import LoupeModel
from loupe.sparc import RANGE_EPS, SPARC_WEIGHT, sparc_alignment, sparc_fine_loss


# ------------------------------------------------------------------------------------------------
# the oracle: the paper's equations, one caption, one token, one patch at a time
# ------------------------------------------------------------------------------------------------
def _normalise(x: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in x))
    return [a / max(n, 1e-12) for a in x]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def oracle_grouped(t_rows, v_rows, threshold=None):
    """Language-grouped embeddings (eqs. 2-5) of one caption's tokens ``t_rows`` and its image's
    valid patches ``v_rows`` (lists of lists), plus the alignment weights."""
    P = len(v_rows)
    sigma = 1.0 / P if threshold is None else threshold
    weights, grouped = [], []
    for t in t_rows:
        s = [_dot(t, v) for v in v_rows]
        lo, hi = min(s), max(s)
        if hi - lo > RANGE_EPS:
            s_hat = [(x - lo) / (hi - lo) for x in s]
        else:
            s_hat = [1.0] * P  # all patches equally similar: uniform
        s_tilde = [x if x >= sigma else 0.0 for x in s_hat]
        total = sum(s_tilde)
        a = [x / total for x in s_tilde]
        c = [sum(a[p] * v_rows[p][d] for p in range(P)) for d in range(len(t))]
        weights.append(a)
        grouped.append(_normalise(c))
    return weights, grouped


def oracle_loss(word, wmask, patch, pmask, scale, threshold=None) -> float:
    """Eq. 6: mean over captions of the mean over its valid tokens of the two-way InfoNCE."""
    B = word.shape[0]
    total = 0.0
    for b in range(B):
        toks = [word[b, j].tolist() for j in range(word.shape[1]) if wmask[b, j]]
        pats = [patch[b, p].tolist() for p in range(patch.shape[1]) if pmask is None or pmask[b, p]]
        if not toks:
            continue  # contributes 0, still counted in B
        _, c = oracle_grouped(toks, pats, threshold)
        t = [_normalise(x) for x in toks]
        n = len(t)
        acc = 0.0
        for j in range(n):
            row = [scale * _dot(t[j], c[k]) for k in range(n)]       # token j against every grouped c_k
            col = [scale * _dot(c[j], t[k]) for k in range(n)]       # grouped c_j against every token t_k
            lse_r = math.log(sum(math.exp(x) for x in row))
            lse_c = math.log(sum(math.exp(x) for x in col))
            acc += 0.5 * ((lse_r - row[j]) + (lse_c - col[j]))
        total += acc / n
    return total / B


def _inputs(B=3, L=5, P=6, D=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    word = F.normalize(torch.randn(B, L, D, generator=g, dtype=dtype), dim=-1)
    patch = F.normalize(torch.randn(B, P, D, generator=g, dtype=dtype), dim=-1)
    wmask = torch.rand(B, L, generator=g) > 0.3
    wmask[0, :] = True
    wmask[1, :] = False
    wmask[1, 2] = True  # one valid token
    return word, wmask, patch


# ------------------------------------------------------------------------------------------------
# the loss against the oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [None, 0.4])
def test_loss_matches_the_loop_oracle(seed, threshold):
    word, wmask, patch = _inputs(seed=seed)
    pmask = torch.ones(patch.shape[:2], dtype=torch.bool)
    pmask[2, 1] = pmask[2, 4] = False  # an image with two invalid patches (sigma = 1/4 there)
    got = sparc_fine_loss(word, wmask, patch, pmask, 7.5, threshold=threshold)
    want = oracle_loss(word, wmask, patch, pmask, 7.5, threshold)
    assert got.dtype == torch.float64
    assert abs(float(got) - want) < 1e-10, (float(got), want)


def test_alignment_weights_match_the_oracle_and_are_sparse():
    word, wmask, patch = _inputs(B=2, L=4, P=9, D=5, seed=4)
    a, c = sparc_alignment(word, patch)
    for b in range(2):
        wa, wc = oracle_grouped(word[b].tolist(), patch[b].tolist())
        assert torch.allclose(a[b], torch.tensor(wa, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(c[b], torch.tensor(wc, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(a.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    assert (a == 0).any()  # below 1/P: dropped
    assert bool((a.amax(-1) > 0).all())  # the most similar patch is always kept (min-max gives it 1)


def test_padding_tokens_do_not_change_the_loss():
    word, wmask, patch = _inputs(seed=5)
    base = sparc_fine_loss(word, wmask, patch, None, 10.0)
    word2 = word.clone()
    word2[~wmask] = torch.randn(int((~wmask).sum()), word.shape[-1], dtype=word.dtype) * 100
    assert torch.allclose(base, sparc_fine_loss(word2, wmask, patch, None, 10.0), atol=1e-12)


def test_float32_inputs_match_float64_closely():
    word, wmask, patch = _inputs(seed=6)
    l64 = sparc_fine_loss(word, wmask, patch, None, 20.0)
    l32 = sparc_fine_loss(word.float(), wmask, patch.float(), None, 20.0)
    assert l32.dtype == torch.float32 and abs(float(l32) - float(l64)) < 1e-4


# ------------------------------------------------------------------------------------------------
# gradients and edge cases
# ------------------------------------------------------------------------------------------------
def test_gradient_is_finite_and_reaches_both_towers_and_the_scale():
    word, wmask, patch = _inputs(seed=7, dtype=torch.float32)
    word.requires_grad_(True)
    patch.requires_grad_(True)
    scale = torch.tensor(14.0, requires_grad=True)
    loss = sparc_fine_loss(word, wmask, patch, None, scale)
    loss.backward()
    for g in (word.grad, patch.grad, scale.grad):
        assert g is not None and torch.isfinite(g).all()
    assert word.grad[wmask].abs().sum() > 0 and patch.grad.abs().sum() > 0
    assert float(word.grad[~wmask].abs().sum()) == 0.0  # padding tokens get nothing


def test_gradcheck_float64():
    word, wmask, patch = _inputs(B=2, L=3, P=4, D=3, seed=8)
    word.requires_grad_(True)
    patch.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, p: sparc_fine_loss(w, wmask[:2, :3], p, None, 3.0), (word, patch))


def test_captions_with_zero_or_one_token_give_zero():
    word, _, patch = _inputs(B=2, seed=9)
    none = torch.zeros(2, word.shape[1], dtype=torch.bool)
    one = none.clone()
    one[:, 1] = True
    for m in (none, one):
        w = word.clone().requires_grad_(True)
        loss = sparc_fine_loss(w, m, patch, None, 50.0)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.isfinite(w.grad).all()


def test_equal_similarities_fall_back_to_uniform_weights_without_nan():
    """Every patch the same (or a zero token): the min-max range is 0, the weights are uniform."""
    B, L, P, D = 2, 3, 5, 4
    patch = F.normalize(torch.ones(B, P, D, dtype=torch.float64), dim=-1).requires_grad_(True)
    word = F.normalize(torch.randn(B, L, D, dtype=torch.float64), dim=-1)
    word[0, 0] = 0.0
    word.requires_grad_(True)
    a, c = sparc_alignment(word, patch)
    assert torch.allclose(a, torch.full((B, L, P), 1.0 / P, dtype=torch.float64))
    loss = sparc_fine_loss(word, torch.ones(B, L, dtype=torch.bool), patch, None, 10.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(word.grad).all() and torch.isfinite(patch.grad).all()


def test_an_image_without_valid_patches_gives_no_nan():
    word, wmask, patch = _inputs(seed=10)
    pmask = torch.ones(patch.shape[:2], dtype=torch.bool)
    pmask[0] = False
    loss = sparc_fine_loss(word, wmask, patch, pmask, 10.0)
    assert torch.isfinite(loss)


def test_perfect_alignment_has_low_loss():
    """Each token equal to its own patch (orthogonal tokens): c_j = t_j and the loss is near 0 at a
    large scale, while shuffling the patch order does not matter (grouping is by content)."""
    D = 6
    eye = torch.eye(D, dtype=torch.float64)
    word = eye[None, :4]                      # 4 tokens
    patch = eye[None, [3, 0, 5, 1, 2, 4]]     # 6 patches, a permutation
    loss = sparc_fine_loss(word, torch.ones(1, 4, dtype=torch.bool), patch, None, 50.0)
    assert float(loss) < 1e-6


# ------------------------------------------------------------------------------------------------
# the objective
# ------------------------------------------------------------------------------------------------
TINY = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
            text_layers=1, text_heads=2, embed_dim=32, region_hidden=32, vocab_size=50, context_length=12)


def _batch(B=4, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, L), generator=g)
    ids[:, 0] = 2
    attn = torch.ones(B, L, dtype=torch.bool)
    attn[1, 5:] = False
    attn[2, 3:] = False  # [BOS] w [EOS]: a caption of one word token
    for b in range(B):
        n = int(attn[b].sum())
        ids[b, n - 1] = 3
        ids[b, n:] = 0
    return {"images": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": attn}


def test_objective_is_registered_and_the_model_returns_both_terms():
    assert "sparc" in OBJECTIVES and "sparc" in LOSS_TERMS
    assert resolve_loss_weights("sparc") == {"cmc": 1.0, "sparc": SPARC_WEIGHT}
    torch.manual_seed(0)
    model = LoupeModel(LoupeConfig(objective="sparc", **TINY))
    assert not model.needs_regions and model.filip_logit_scale is None
    assert "sparc" in model.loss_modules  # the learned temperature
    out = model(_batch())
    for key in ("loss", "loss_cmc", "loss_sparc", "logit_scale_sparc"):
        assert key in out and torch.isfinite(out[key]).all(), key
    assert torch.allclose(out["loss"], out["loss_cmc"] + SPARC_WEIGHT * out["loss_sparc"])
    want = sparc_fine_loss(out["word_tokens"], out["word_mask"], out["patch_tokens"], out["patch_mask"],
                           out["logit_scale_sparc"])
    assert torch.allclose(out["loss_sparc"], want)
    out["loss"].backward()
    p = model.loss_modules["sparc"].logit_scale
    assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs()) > 0
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)


def test_paper_weights_fixed_scale_and_threshold_through_the_config():
    cfg = LoupeConfig(objective="sparc", loss_weights={"cmc": 0.5, "sparc": 1.0}, sparc_scale=10.0,
                      sparc_threshold=0.25, **TINY)
    model = LoupeModel(cfg)
    assert "sparc" not in model.loss_modules
    assert LoupeConfig.from_dict(cfg.to_dict()) == cfg
    out = model(_batch(seed=1))
    assert float(out["logit_scale_sparc"]) == 10.0
    want = sparc_fine_loss(out["word_tokens"], out["word_mask"], out["patch_tokens"], None, 10.0, threshold=0.25)
    assert torch.allclose(out["loss_sparc"], want)
    assert torch.allclose(out["loss"], 0.5 * out["loss_cmc"] + out["loss_sparc"])


@pytest.mark.parametrize("field,value", [("sparc_threshold", 0.0), ("sparc_threshold", 1.5),
                                         ("sparc_threshold", True), ("sparc_scale", -1.0),
                                         ("sparc_scale", float("inf")), ("sparc_scale", "10")])
def test_bad_sparc_options_raise(field, value):
    with pytest.raises(ValueError, match=field):
        LoupeConfig(objective="sparc", **{field: value})


# ------------------------------------------------------------------------------------------------
# a short training run through the real launcher
# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_deepspeed_trains_sparc(tmp_path):
    """Four steps of the tiny model through `deepspeed` (about 15 s on the 2-core CPU)."""
    import socket

    import loupe
    import loupe.train as train_mod

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tiny = json.dumps({"vision_width": 32, "vision_layers": 1, "vision_heads": 2, "text_width": 32,
                       "text_layers": 1, "text_heads": 2, "embed_dim": 32, "region_hidden": 32})
    out = tmp_path / "sparc"
    cmd = ["deepspeed", "--num_accelerators", "1", "--master_port", str(port), train_mod.__file__,
           "--output", str(out), "--steps", "4", "--zero-stage", "2", "--objective", "sparc",
           "--batch-size", "8", "--train-size", "64", "--lr", "2e-3", "--warmup", "0", "--save-every", "4",
           "--seed", "3", "--no-eval", "--no-progress", "--model-config", tiny]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=580)
    assert p.returncode == 0, p.stderr[-4000:]
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for key in ("loss", "loss_cmc", "loss_sparc", "logit_scale_sparc"):
        assert all(r.get(key) is not None and math.isfinite(r[key]) for r in log), key
    model = loupe.load(str(out))
    assert model.config.objective == "sparc" and "sparc" in model.loss_modules
