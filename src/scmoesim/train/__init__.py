"""Training plan: the EM update of the cluster centres and the loss weights during training."""

from ._checkpoint import PeriodicCheckpoint, check_checkpoint_fits, resolve_checkpoint
from ._plan import SIMILARITY_WARMUP_FRACTION, InterruptFlag, MoESimTrainingPlan

__all__ = [
    "SIMILARITY_WARMUP_FRACTION",
    "InterruptFlag",
    "MoESimTrainingPlan",
    "PeriodicCheckpoint",
    "check_checkpoint_fits",
    "resolve_checkpoint",
]
