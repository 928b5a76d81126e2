"""The dense objectness path (box sums, Gram-based box norms, the head's first layer before pooling)
against the direct path: box features from the summed-area table, then the head."""
import pytest
import torch
import torch.nn.functional as F

import importlib

from loupe_kernels import available_backends
from loupe.regions import (RegionGenerator, box_features, box_geometry, box_inverse_scales, box_sums, candidate_boxes,
                           interval_matrix)

box_objectness_mod = importlib.import_module("loupe_kernels.box_objectness")  # the package attribute is the function

GRIDS = [(8, 8), (3, 5), (1, 4), (2, 1)]


def _tokens(B, h, w, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, h * w, D, generator=g, dtype=torch.float64) + 0.3, dim=-1).to(dtype)


def test_interval_matrix_rows_follow_candidate_order():
    r = interval_matrix(4)
    assert r.shape == (10, 4)
    rows = [(a, b) for a in range(4) for b in range(a + 1, 5)]
    for k, (a, b) in enumerate(rows):
        assert r[k].tolist() == [1.0 if a <= i < b else 0.0 for i in range(4)]


@pytest.mark.parametrize("h,w", GRIDS)
def test_box_sums_equal_direct_sums(h, w):
    x = _tokens(2, h, w, 5)
    boxes = candidate_boxes(h, w)
    grid = x.reshape(2, h, w, 5)
    direct = torch.stack([grid[:, y0:y1, x0:x1].sum((1, 2)) for x0, y0, x1, y1 in boxes.tolist()], 1)
    torch.testing.assert_close(box_sums(x, h, w), direct, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="tokens"):
        box_sums(x[:, :-1], h, w)


@pytest.mark.parametrize("h,w", GRIDS)
def test_inverse_scales_give_the_normalised_box_features(h, w):
    x = _tokens(3, h, w, 6)
    boxes = candidate_boxes(h, w)
    inside, outside, _ = box_features(x, h, w, boxes)
    inv_in, inv_out = box_inverse_scales(x, h, w)
    s = box_sums(x, h, w)
    torch.testing.assert_close(s * inv_in[..., None], inside, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((x.sum(1, keepdim=True) - s) * inv_out[..., None], outside, rtol=1e-10, atol=1e-10)
    whole = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) == h * w
    assert bool((inv_out[:, whole] == 0).all()) and bool((inv_out[:, ~whole] > 0).all())
    # zero tokens: zero features, like F.normalize, never inf/NaN
    z_in, z_out = box_inverse_scales(torch.zeros_like(x), h, w)
    assert torch.isfinite(z_in).all() and torch.isfinite(z_out).all()


def _oracle_and_direct(h, w, D, H, dtype):
    x64 = _tokens(4, h, w, D, seed=1)
    boxes = candidate_boxes(h, w)
    geo = box_geometry(boxes, h, w)
    torch.manual_seed(0)
    head = RegionGenerator(D, H).double()
    oracle = head(*box_features(x64, h, w, boxes)[:2], geo.double())
    head_dt = RegionGenerator(D, H).to(dtype)
    head_dt.load_state_dict(head.state_dict())
    x = x64.to(dtype)
    direct = head_dt(*box_features(x, h, w, boxes)[:2], geo)
    return x, geo, head_dt, oracle, direct


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,block", [("reference", 1), ("reference", 1 << 21), ("cpu", None)])
def test_score_all_equals_the_head_on_box_features(h, w, dtype, backend, block, monkeypatch):
    if backend not in available_backends():
        pytest.skip(f"backend {backend} not built")
    x, geo, head, oracle, direct = _oracle_and_direct(h, w, 8, 16, dtype)
    if block is not None:
        monkeypatch.setattr(box_objectness_mod, "REFERENCE_BLOCK_ELEMS", block)  # 1: one image per block
    with torch.no_grad():  # the cpu kernel is forward only
        fast = head.score_all(x, h, w, geo, backend=backend)
    assert fast.shape == oracle.shape and fast.dtype == dtype
    err_direct = (direct.double() - oracle).abs().max().item()
    eps = 1e-13 if dtype == torch.float64 else 1e-7
    assert (fast.double() - oracle).abs().max().item() <= 2 * err_direct + eps


def test_score_all_gradients_equal_the_direct_path():
    h, w, D = 3, 4, 6
    x = _tokens(2, h, w, D).requires_grad_(True)
    boxes = candidate_boxes(h, w)
    geo = box_geometry(boxes, h, w).double()
    torch.manual_seed(0)
    head = RegionGenerator(D, 8).double()
    wts = torch.randn(2, boxes.shape[0], dtype=torch.float64)
    (head(*box_features(x, h, w, boxes)[:2], geo) * wts).sum().backward()
    gx, gw = x.grad.clone(), head.fc1.weight.grad.clone()
    x.grad = None
    head.zero_grad()
    (head.score_all(x, h, w, geo) * wts).sum().backward()
    torch.testing.assert_close(x.grad, gx, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(head.fc1.weight.grad, gw, rtol=1e-9, atol=1e-10)
