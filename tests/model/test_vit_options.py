"""ViT options: local patch attention (``vision_local_radius``), mean pooling, and the retired switches."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from loupe.config import LoupeConfig, ObjectiveOptions, options_from_config
from loupe.model import LoupeModel

SMALL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
             text_layers=1, text_heads=2, embed_dim=16, vocab_size=50, context_length=8, objective="filip")


@pytest.mark.parametrize("field,off,on,tag", [("vision_registers", 0, 2, "pre-issue-17"),
                                               ("vision_center_patches", False, True, "pre-issue-17"),
                                               ("dense_region_grad", False, True, "pre-retire-switches")])
def test_retired_switches_load_when_off_and_raise_when_on(field, off, on, tag):
    """Switches measured worse everywhere were removed; old configs load when they had them off, and
    any other value raises naming the tag that still has the switch."""
    d = LoupeConfig(**SMALL).to_dict()
    assert field not in d
    assert LoupeConfig.from_dict({**d, field: off}) == LoupeConfig(**SMALL)
    with pytest.raises(ValueError, match=rf"{field}=.*tag {tag}"):
        LoupeConfig.from_dict({**d, field: on})
    with pytest.raises(TypeError):
        LoupeConfig(**{field: on}, **SMALL)


@pytest.mark.parametrize("name,off,on", [("tsa_rule", "redundancy", "redundancy_minus_outside"),
                                         ("tsa_center", True, False), ("fsa_scales", 0, 5)])
def test_retired_objective_options_load_when_off_and_raise_when_on(name, off, on):
    """The Shapley-term options of issue 19 item 6: a saved config holding one at its old default
    still loads (and trains as before: the option is dropped); the other value raises naming the
    tag pre-retire-switches."""
    assert name not in {f.name for f in dataclasses.fields(ObjectiveOptions)}
    d = LoupeConfig(**{**SMALL, "objective": "loupe"}).to_dict()
    old = LoupeConfig.from_dict({**d, "loupe_options": {name: off, "num_samples": 8}})
    assert options_from_config(old) == ObjectiveOptions(num_samples=8)
    LoupeModel(old)  # the Shapley terms build from it
    with pytest.raises(ValueError, match=rf"{name}=.*git checkout 0899940 \(tag pre-retire-switches\)"):
        LoupeConfig.from_dict({**d, "loupe_options": {name: on}})
    with pytest.raises(ValueError, match=name):
        LoupeConfig(loupe_options={name: on}, **SMALL)


def test_retired_objective_backend_option():
    d = LoupeConfig(**SMALL).to_dict()
    assert LoupeConfig.from_dict({**d, "loupe_options": {"backend": None}}).loupe_options == {"backend": None}
    assert options_from_config(LoupeConfig(loupe_options={"backend": None}, **SMALL)) == ObjectiveOptions()
    with pytest.raises(ValueError, match="backend"):
        LoupeConfig(loupe_options={"backend": "cpu"}, **SMALL)
    with pytest.raises(ValueError, match="kernel_backend"):
        LoupeConfig(kernel_backend="gpu", **SMALL)


@pytest.mark.parametrize("radius,layers", [(0, 1), (1, 1), (1, 2)])
def test_local_attention_limits_the_receptive_field(radius, layers):
    """A patch token changes only when a patch within radius*layers (Chebyshev) of it changes;
    [CLS] sees every patch."""
    torch.manual_seed(0)
    cfg = dict(SMALL, vision_layers=layers)
    model = LoupeModel(LoupeConfig(vision_local_radius=radius, **cfg)).eval()
    g = 4  # 32 / 8
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[..., 8:16, 16:24] += torch.randn(3, 8, 8)  # patch (row 1, col 2)
    with torch.no_grad():
        c1, p1 = model.encode_image_tokens(x)
        c2, p2 = model.encode_image_tokens(x2)
    changed = (p1 - p2).abs().amax(-1)[0].view(g, g) > 1e-6
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    reach = torch.maximum((rows - 1).abs(), (cols - 2).abs()) <= radius * layers
    assert torch.equal(changed, reach)
    assert not torch.allclose(c1, c2)


def test_global_attention_is_the_default():
    torch.manual_seed(0)
    model = LoupeModel(LoupeConfig(**SMALL)).eval()
    assert model.visual.attn_mask is None
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[..., :8, :8] += 1.0 + torch.randn(3, 8, 8)
    with torch.no_grad():
        changed = (model.encode_image_tokens(x)[1] - model.encode_image_tokens(x2)[1]).abs().amax(-1) > 1e-6
    assert changed.all()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_local_radius(bad):
    with pytest.raises(ValueError, match="vision_local_radius"):
        LoupeConfig(vision_local_radius=bad, **SMALL)


def test_mean_pooled_image_embedding_is_the_normalised_mean_of_the_patch_tokens():
    torch.manual_seed(0)
    model = LoupeModel(LoupeConfig(vision_pool="mean", **SMALL)).eval()
    seen = {}
    model.visual.proj.register_forward_hook(lambda m, i, o: seen.__setitem__("u", o))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        emb, patches = model.encode_image_tokens(images)
    u = seen["u"]
    torch.testing.assert_close(emb, torch.nn.functional.normalize(u[:, 1:].mean(1), dim=-1))
    torch.testing.assert_close(patches, torch.nn.functional.normalize(u[:, 1:], dim=-1))
    cls_model = LoupeModel(LoupeConfig(**SMALL)).eval()
    cls_model.load_state_dict(model.state_dict())  # same weights, [CLS] pooling (the default)
    with torch.no_grad():
        emb_cls, patches_cls = cls_model.encode_image_tokens(images)
    torch.testing.assert_close(patches_cls, patches)  # pooling changes only the image embedding
    assert not torch.allclose(emb_cls, emb)


@pytest.mark.parametrize("bad", [dict(vision_pool="max")])
def test_bad_vision_pool(bad):
    with pytest.raises(ValueError, match="vision_pool"):
        LoupeConfig(**bad)


def test_loupe_options_reach_the_shapley_terms_and_are_validated():
    cfg = LoupeConfig(loupe_options={"fsa_per_phrase": 3, "num_samples": 8}, **{**SMALL, "objective": "loupe"})
    model = LoupeModel(cfg)
    opts = next(m for m in model.loss_modules.values() if m is not None).options
    assert (opts.fsa_per_phrase, opts.num_samples) == (3, 8)
    assert LoupeConfig.from_dict(cfg.to_dict()).loupe_options == {"fsa_per_phrase": 3, "num_samples": 8}
    assert options_from_config(LoupeConfig(**SMALL)) == ObjectiveOptions()
    with pytest.raises(ValueError, match="unknown keys"):
        LoupeConfig(loupe_options={"fsa_scale": 3})
    with pytest.raises(ValueError, match="num_samples"):
        LoupeConfig(loupe_options={"num_samples": 0})
