"""Plain-PyTorch references of every op (the oracles the fused kernels are tested against)."""
from .token_region_similarity import token_region_similarity_reference

__all__ = ["token_region_similarity_reference"]
