"""Training plan: the EM update of the cluster centres and the loss weights during training."""

from ._plan import InterruptFlag, MoESimTrainingPlan

__all__ = ["InterruptFlag", "MoESimTrainingPlan"]
