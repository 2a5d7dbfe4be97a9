"""Training plan: the EM update of the cluster centres and the loss weights during training."""

from ._checkpoint import (
    PeriodicCheckpoint,
    check_checkpoint_fits,
    epochs_done,
    resolve_checkpoint,
)
from ._plan import InterruptFlag, MoESimTrainingPlan, check_plan_values
from ._split import split_experts

__all__ = [
    "InterruptFlag",
    "MoESimTrainingPlan",
    "PeriodicCheckpoint",
    "check_checkpoint_fits",
    "check_plan_values",
    "epochs_done",
    "resolve_checkpoint",
    "split_experts",
]
