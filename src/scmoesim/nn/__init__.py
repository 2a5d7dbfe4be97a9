"""Neural-network building blocks: plain MLPs and the routed mixture of expert decoders."""

from ._experts import RoutedExperts
from ._grouped import grouped_mm
from ._mlp import MLP

__all__ = ["MLP", "RoutedExperts", "grouped_mm"]
