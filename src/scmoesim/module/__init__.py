"""The MoE-Sim-VAE torch module: encoder, gating network, expert decoders and loss terms."""

from ._losses import (
    anchor_loss,
    depict_loss,
    depict_target,
    kl_mixture,
    kl_paper,
    similarity_bce,
)
from ._module import MoESimModule

__all__ = [
    "MoESimModule",
    "anchor_loss",
    "depict_loss",
    "depict_target",
    "kl_mixture",
    "kl_paper",
    "similarity_bce",
]
