"""Training curves: one panel per loss term recorded in ``model.history``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ._utils import check_trained, finish

#: Loss terms drawn by default (those present in ``model.history``), in this order.
DEFAULT_KEYS: tuple[str, ...] = (
    "reconstruction_loss_train",
    "kl_divergence_train",
    "similarity_loss_train",
    "depict_loss_train",
    "clustering_loss_train",
)


def training_curves(
    model: Any,
    keys: str | Sequence[str] | None = None,
    *,
    validation: bool = True,
    ncols: int = 3,
    panel_size: tuple[float, float] = (3.2, 2.4),
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Plot the loss terms recorded during training, each in its own small panel.

    The terms have very different scales (the reconstruction loss is summed over genes, the
    similarity and DEPICT losses are per cell pair / per cell), so every term gets its own
    y axis.

    Parameters
    ----------
    model
        A trained :class:`~scmoesim.MoESim`.
    keys
        Keys of ``model.history`` to draw. ``None``: the loss terms
        ``reconstruction_loss_train``, ``kl_divergence_train``, ``similarity_loss_train``,
        ``depict_loss_train`` and ``clustering_loss_train`` (those present). A key may be given
        without its ``_train`` suffix (``"similarity_loss"``).
    validation
        Also draw the ``*_validation`` curve of a term (dashed) when training recorded one.
    ncols
        Panels per row.
    panel_size
        Width and height of one panel in inches.
    show
        Call :func:`matplotlib.pyplot.show` after drawing (default: no).
    save
        Write the figure to this path (format from the suffix, e.g. ``.png``, ``.pdf``).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`, one Axes per key (row-major; unused grid cells are
    removed). Each Axes is titled with its key without the ``_train`` suffix.

    Raises
    ------
    RuntimeError
        If the model is not trained.
    KeyError
        If a key is not in ``model.history`` (the message lists the available keys).

    Examples
    --------
    >>> scmoesim.pl.training_curves(model, save="curves.png")
    """
    import matplotlib.pyplot as plt

    check_trained(model, "training_curves")
    history = _epoch_history(model.history)
    keys = _resolve_keys(history, keys)
    if ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}.")
    ncols = min(ncols, len(keys))
    nrows = int(np.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    flat = axes.ravel()
    for ax, key in zip(flat, keys, strict=False):
        epochs, values = _series(history[key])
        ax.plot(epochs, values, marker="o" if len(values) < 20 else None, ms=3, label="train")
        val_key = key.removesuffix("_train") + "_validation"
        drew_val = False
        if validation and key.endswith("_train") and val_key in history:
            v_epochs, v_values = _series(history[val_key])
            if np.isfinite(v_values).any():
                ax.plot(v_epochs, v_values, ls="--", label="validation")
                drew_val = True
        ax.set_title(key.removesuffix("_train"), fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drew_val:
            ax.legend(fontsize="small", frameon=False)
    for ax in flat[len(keys) :]:
        ax.remove()
    return finish(fig, None, show, save)


def _epoch_history(history: dict) -> dict:
    """The history under its per-epoch names.

    With ``plan_kwargs={"on_step": True}`` Lightning records each term twice, as
    ``{key}_step`` and ``{key}_epoch``: the epoch series stands in for ``{key}``.
    """
    out = dict(history)
    for key, frame in history.items():
        if key.endswith("_epoch") and key.removesuffix("_epoch") not in out:
            out[key.removesuffix("_epoch")] = frame
    return out


def _resolve_keys(history: dict, keys: str | Sequence[str] | None) -> list[str]:
    if keys is None:
        found = [k for k in DEFAULT_KEYS if k in history]
        if not found:
            raise KeyError(
                f"None of the default loss terms {list(DEFAULT_KEYS)} is in model.history "
                f"(keys: {sorted(history)}); pass keys= explicitly."
            )
        return found
    if isinstance(keys, str):
        keys = [keys]
    out = []
    for key in keys:
        if key in history:
            out.append(key)
        elif f"{key}_train" in history:
            out.append(f"{key}_train")
        else:
            raise KeyError(f"{key!r} is not in model.history; available keys: {sorted(history)}.")
    if not out:
        raise ValueError("keys is empty; give at least one key of model.history.")
    return out


def _series(frame) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and float values of one history entry (a one-column DataFrame)."""
    col = frame.iloc[:, 0] if frame.ndim == 2 else frame
    values = np.asarray(col.to_numpy(dtype=float, na_value=np.nan), dtype=float)
    epochs = np.asarray(col.index, dtype=float)
    return epochs, values
