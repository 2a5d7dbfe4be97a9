"""Training plan: the EM update of the cluster centres and the loss weights during training."""

from ._plan import MoESimTrainingPlan

__all__ = ["MoESimTrainingPlan"]
