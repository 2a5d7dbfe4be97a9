"""The user-facing :class:`MoESim` model (setup, training, outputs, generation, persistence)."""

from ._moesim import MoESim

__all__ = ["MoESim"]
