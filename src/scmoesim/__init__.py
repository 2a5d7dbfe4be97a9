"""scmoesim: MoE-Sim-VAE for single-cell data in the scverse.

A latent space shaped by a similarity you choose (labels, marker-gene signatures or the
neighbourhood graph), a clustering by a gating network, and one generator per cluster.
"""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, metrics, pl, pp, similarity
from .model import MoESim

try:
    __version__ = version("scmoesim")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["MoESim", "__version__", "datasets", "metrics", "pl", "pp", "similarity"]
