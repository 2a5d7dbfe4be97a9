"""Shared helpers of :mod:`scmoesim.pl`: finishing figures, checks and categorical scatter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def finish(fig: Figure, ax: Axes | None, show: bool | None, save: str | Path | None):
    """Save and/or show a figure; return the Axes when one was given, else the Figure.

    ``show=None`` (the default) does not call :func:`matplotlib.pyplot.show`: the figure is
    returned for further editing (notebooks display it anyway).
    """
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight", dpi=150)
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return ax if ax is not None else fig


def new_figure(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The Figure of ``ax``, or a new pyplot figure with one Axes."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, new_ax = plt.subplots(figsize=figsize)
    return fig, new_ax


def check_trained(model: Any, what: str) -> None:
    """Raise a clear error for objects that are not trained :class:`~scmoesim.MoESim` models."""
    if not hasattr(model, "module") or not hasattr(model, "cluster_names_"):
        raise TypeError(
            f"pl.{what} expects a trained scmoesim.MoESim model, got {type(model).__name__}."
        )
    if not getattr(model, "is_trained_", False):
        raise RuntimeError(f"The model is not trained; call model.train() before pl.{what}().")


def category_colors(categories: Sequence[str]) -> dict[str, Any]:
    """One distinct colour per category (tab10 / tab20, then a continuous colormap)."""
    import matplotlib as mpl

    n = len(categories)
    if n <= 10:
        colors = mpl.colormaps["tab10"].colors[:n]
    elif n <= 20:
        colors = mpl.colormaps["tab20"].colors[:n]
    else:
        cmap = mpl.colormaps["gist_ncar"]
        colors = [cmap(x) for x in np.linspace(0.05, 0.95, n)]
    return dict(zip(categories, colors, strict=True))


def point_size(n: int) -> float:
    """Marker size that keeps a scatter of ``n`` cells readable."""
    return float(np.clip(12_000 / max(n, 1), 1.0, 30.0))


def scatter_categories(
    ax: Axes,
    xy: np.ndarray,
    labels: Sequence[Any],
    *,
    categories: Sequence[str] | None = None,
    colors: dict[str, Any] | None = None,
    title: str | None = None,
    size: float | None = None,
    alpha: float = 0.8,
    legend: bool = True,
) -> None:
    """Scatter 2-D points coloured by a categorical label, one legend entry per category.

    Missing labels (NaN / None) are drawn in light grey under the others.
    """
    labels = np.asarray([None if _isna(v) else str(v) for v in labels], dtype=object)
    if categories is None:
        categories = list(dict.fromkeys(v for v in labels if v is not None))
    categories = [str(c) for c in categories]
    colors = colors if colors is not None else category_colors(categories)
    size = point_size(len(xy)) if size is None else size
    missing = np.array([v is None for v in labels], dtype=bool)
    if missing.any():
        ax.scatter(*xy[missing].T, s=size, c="lightgrey", alpha=alpha, label="NA", lw=0)
    for cat in categories:
        sel = labels == cat
        if sel.any():
            ax.scatter(*xy[sel].T, s=size, color=colors[cat], alpha=alpha, label=cat, lw=0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    if legend:
        ax.legend(
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
            fontsize="small",
            markerscale=max(1.0, 30.0 / size) ** 0.5,
        )


def _isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # array-likes are not missing values
        return False
