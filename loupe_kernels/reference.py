"""Plain-PyTorch references of every op (the oracles the fused kernels are tested against).

The exact enumerator and the numpy pinned draw live in :mod:`loupe_kernels.testing`; they are
re-exported here for the code that looks for every oracle in one place.
"""
from .token_region_similarity import token_region_similarity_reference
from .interaction_loss import uncertainty_interaction_loss_reference
from .shapley import shapley_interaction_reference
from .testing import exact_shapley_interaction, sample_coalitions_reference

__all__ = ["token_region_similarity_reference", "exact_shapley_interaction", "sample_coalitions_reference",
           "shapley_interaction_reference", "uncertainty_interaction_loss_reference"]
