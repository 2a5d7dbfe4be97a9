"""Checkpoints of a running training, and resuming from them, with Lightning's own format.

A checkpoint is a Lightning ``.ckpt`` file written by ``trainer.save_checkpoint``: the training
plan's state (the module's weights and buffers, so the EM sums that define the cluster centres
too), the optimizer and scheduler states, the loop counters and the callbacks' states. This
callback adds what makes a resumed training equal an uninterrupted one on the CPU: the random
number generator states (torch, CUDA, numpy, python) and the loss history so far.
"""

import os
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

#: File name of the most recent checkpoint inside ``checkpoint_dir``.
LAST_CHECKPOINT = "last.ckpt"


def resolve_checkpoint(ckpt_path: str | os.PathLike) -> Path:
    """A ``.ckpt`` file, or ``checkpoint_dir/last.ckpt`` when given a directory."""
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {os.fspath(ckpt_path)!r}: give a .ckpt file or the "
            f"checkpoint_dir of an earlier training (which holds {LAST_CHECKPOINT})."
        )
    return path


def check_checkpoint_fits(path: Path, module: torch.nn.Module) -> dict:
    """Load a checkpoint (CPU) and check its weights fit ``module``; name every mismatch."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in ckpt:
        raise ValueError(f"{os.fspath(path)!r} is not a Lightning training checkpoint.")
    saved = {k.removeprefix("module."): tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    here = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(here) - set(saved))
    extra = sorted(set(saved) - set(here))
    shapes = [f"{k}: {saved[k]} vs {v}" for k, v in here.items() if k in saved and saved[k] != v]
    if missing or extra or shapes:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {extra[:5]}" if extra else "",
                f"shapes differ: {shapes[:5]}" if shapes else "",
            )
            if part
        )
        raise ValueError(
            f"The checkpoint {os.fspath(path)!r} was written by a model with other settings "
            f"(n_experts, n_latent, genes, likelihood, ...): {details}. Create the model with "
            "the same AnnData and parameters as the interrupted training."
        )
    return ckpt


def epochs_done(ckpt: dict) -> int | None:
    """Epochs a Lightning checkpoint has trained (``None`` if it does not say)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return None


# Lightning reads checkpoints with ``torch.load(weights_only=True)``: everything stored here is
# made of tensors, lists, dicts, strings and numbers only.
def _rng_states() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (global state)
    version, mt_state, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(mt_state), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    if "cuda" in states and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(states["cuda"])
        except (RuntimeError, IndexError):  # other number of GPUs than when saved
            warnings.warn(
                "Could not restore the GPU random states (different devices); the resumed "
                "training will not repeat the uninterrupted one exactly.",
                UserWarning,
                stacklevel=2,
            )


class PeriodicCheckpoint(Callback):
    """Write ``dirpath/last.ckpt`` every ``every_n_epochs`` epochs and at the end of training.

    The file is written to a temporary name and then renamed, so an interruption while writing
    never leaves a broken ``last.ckpt``. Besides Lightning's content the checkpoint holds the
    random number generator states and the loss history, restored when training resumes from it
    (``ckpt_path=``).

    Parameters
    ----------
    dirpath
        Directory of the checkpoints (created if needed); ``None`` only restores (resuming
        without writing new checkpoints).
    every_n_epochs
        Write after every ``every_n_epochs``-th epoch.
    """

    def __init__(self, dirpath: str | os.PathLike | None, every_n_epochs: int = 1):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"checkpoint_every_n_epochs must be >= 1, got {every_n_epochs!r}.")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self._history: dict[str, pd.DataFrame] | None = None
        self._pending_history: dict[str, pd.DataFrame] | None = None

    @property
    def state_key(self) -> str:  # noqa: D102
        return "scmoesim_checkpoint"

    # ------------------------------------------------------------------ saving
    def _history_with_current_epoch(self, trainer) -> dict[str, pd.DataFrame]:
        """Logger history plus this epoch's metrics (the logger receives them after the hooks)."""
        history = _logger_history(trainer)
        out = {k: v.copy() for k, v in (history or {}).items()}
        epoch = trainer.current_epoch
        for key, value in trainer.callback_metrics.items():
            if key.endswith("_step"):
                continue
            frame = out.setdefault(key, pd.DataFrame(columns=[key]))
            frame.index.name = "epoch"
            frame.loc[epoch, key] = float(value)
        return out

    def state_dict(self) -> dict:  # noqa: D102
        from scmoesim.model._io import package_versions

        history = None
        if self._history is not None:
            history = {
                key: {
                    "index": [int(i) for i in frame.index],
                    "index_name": frame.index.name,
                    "values": [float(v) for v in frame[key].to_numpy(dtype=float)],
                }
                for key, frame in self._history.items()
            }
        return {"rng": _rng_states(), "history": history, "versions": package_versions()}

    def _save(self, trainer) -> None:
        if self.dirpath is None:
            return
        self._history = self._history_with_current_epoch(trainer)
        final = self.dirpath / LAST_CHECKPOINT
        tmp = self.dirpath / (LAST_CHECKPOINT + ".tmp")
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, final)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        done = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and done >= trainer.max_epochs
        if done % self.every_n_epochs == 0 or last or trainer.should_stop:
            self._save(trainer)

    # ------------------------------------------------------------------ resuming
    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        _set_rng_states(state_dict["rng"])
        history = state_dict.get("history") or {}
        frames = {}
        for key, rec in history.items():
            frame = pd.DataFrame({key: rec["values"]}, index=pd.Index(rec["index"], dtype=object))
            frame.index.name = rec["index_name"]
            frames[key] = frame.astype(object)
        self._pending_history = frames or None

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        if self._pending_history:
            experiment = getattr(trainer.logger, "experiment", None)
            data = getattr(experiment, "data", None)
            if isinstance(data, dict):
                for key, frame in self._pending_history.items():
                    data[key] = frame.copy()
            self._pending_history = None


def _logger_history(trainer) -> dict | None:
    history = getattr(trainer.logger, "history", None)
    return history if isinstance(history, dict) else None
