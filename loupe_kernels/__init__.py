"""loupe_kernels: fused kernels of LOUPE (token-region similarity, Shapley sampling, interaction loss,
dense box objectness).

A standalone library: it never imports ``loupe``. Each op lives in one module with its contract,
autograd function, backend dispatch and PyTorch reference. ``available_backends()`` and
``python -m loupe_kernels.env`` report which backends work here and why not.
"""
from ._backends import BACKENDS, available_backends, backend_status
from ._common import debug_enabled, set_debug
from .token_region_similarity import TokenRegionSimilarity, token_region_similarity, token_region_similarity_dual
from .shapley import sample_coalitions, shapley_interaction
from .interaction_loss import UncertaintyInteractionLoss, uncertainty_interaction_loss
from .box_objectness import box_objectness
from . import uansil
from . import reference
from . import testing

__version__ = "0.1.0"

__all__ = ["__version__", "BACKENDS", "available_backends", "backend_status", "set_debug", "debug_enabled",
           "token_region_similarity", "token_region_similarity_dual", "TokenRegionSimilarity", "shapley_interaction",
           "sample_coalitions", "reference", "testing", "uncertainty_interaction_loss", "UncertaintyInteractionLoss", "uansil",
           "box_objectness"]
