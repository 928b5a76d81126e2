"""ViT register tokens (``LoupeConfig.vision_registers``)."""
from __future__ import annotations

import pytest
import torch

from loupe.model import LoupeConfig, LoupeModel

SMALL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
             text_layers=1, text_heads=2, embed_dim=16, vocab_size=50, context_length=8, objective="filip")


def test_registers_are_dropped_at_the_output_and_take_part_inside():
    torch.manual_seed(0)
    model = LoupeModel(LoupeConfig(vision_registers=3, **SMALL)).eval()
    images = torch.randn(2, 3, 32, 32)
    cls, patches = model.encode_image_tokens(images)
    assert cls.shape == (2, 16) and patches.shape == (2, 16, 16)
    with torch.no_grad():
        model.visual.registers.add_(torch.randn_like(model.visual.registers))  # attended to: outputs change
    cls2, patches2 = model.encode_image_tokens(images)
    assert not torch.allclose(cls, cls2) and not torch.allclose(patches, patches2)


def test_registers_get_gradients():
    torch.manual_seed(0)
    model = LoupeModel(LoupeConfig(vision_registers=2, **SMALL))
    cls, patches = model.encode_image_tokens(torch.randn(2, 3, 32, 32))
    (cls.sum() + patches.pow(2).sum()).backward()
    g = model.visual.registers.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_register_count(bad):
    with pytest.raises(ValueError, match="vision_registers"):
        LoupeConfig(vision_registers=bad, **SMALL)
