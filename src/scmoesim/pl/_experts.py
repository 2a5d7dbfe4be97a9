"""Cells per expert: how the gate distributes the cells over the clusters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from scmoesim import _constants as K
from scmoesim.model._outputs import _n_clusters

from ._utils import check_trained, finish, new_figure


def expert_usage(
    model_or_adata: Any,
    *,
    adata: AnnData | None = None,
    uns_key: str = K.UNS_KEY,
    sort: bool = False,
    color: str = "tab:blue",
    empty_color: str = "lightgrey",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure | Axes:
    """Bar chart of the number of cells routed to each expert (cluster).

    The title gives the effective number of clusters: the experts that hold at least one cell,
    out of all experts. Experts without cells are kept (as empty ticks) so that collapsed
    experts stay visible.

    Parameters
    ----------
    model_or_adata
        A trained :class:`~scmoesim.MoESim` (the counts come from
        :meth:`~scmoesim.MoESim.expert_usage`, a pass over ``adata`` or the training data), or
        an AnnData annotated by :meth:`~scmoesim.MoESim.annotate` (the counts come from
        ``adata.uns["moesim"]["expert_usage"]``).
    adata
        With a model: the cells to count (``None``: the training data). Not used with an
        AnnData.
    uns_key
        With an AnnData: the ``uns`` key written by ``annotate``.
    sort
        Order the bars by decreasing number of cells instead of by expert.
    color, empty_color
        Colour of the bars, and of the tick labels of experts that hold no cells.
    ax
        Draw into this Axes instead of a new figure.
    show
        Call :func:`matplotlib.pyplot.show` after drawing (default: no).
    save
        Write the figure to this path (format from the suffix, e.g. ``.png``).

    Returns
    -------
    The Figure, or ``ax`` when it was given. The bars are ``ax.patches`` in the order of the
    x tick labels (cluster names).

    Raises
    ------
    RuntimeError
        If a model is not trained.
    KeyError
        If an AnnData has no ``uns[uns_key]`` (run ``model.annotate(adata)`` first).

    Examples
    --------
    >>> scmoesim.pl.expert_usage(model)
    >>> scmoesim.pl.expert_usage(adata)  # after model.annotate(adata)
    """
    usage = usage_series(model_or_adata, adata=adata, uns_key=uns_key)
    if sort:
        usage = usage.sort_values(ascending=False, kind="stable")
    n_eff = int((usage > 0).sum())
    fig, ax_ = new_figure(ax, (max(4.5, 0.45 * len(usage) + 1.5), 3.4))
    x = np.arange(len(usage))
    bars = ax_.bar(x, usage.to_numpy(), color=color)
    ax_.bar_label(bars, fontsize="small", padding=1)
    ax_.set_xticks(x, [str(n) for n in usage.index], rotation=45, ha="right")
    for label, count in zip(ax_.get_xticklabels(), usage.to_numpy(), strict=True):
        if count == 0:
            label.set_color(empty_color)
    ax_.set_ylabel("cells")
    ax_.set_xlabel("expert (cluster)")
    n_clusters = _n_clusters(usage, 1)  # experts merged by merge_clusters count once
    title = (
        f"effective number of clusters: {n_eff} of {len(usage)}"
        if n_clusters == n_eff
        else f"{n_clusters} clusters (merged) on {n_eff} of {len(usage)} experts"
    )
    ax_.set_title(title, fontsize="medium")
    ax_.margins(y=0.12)
    if ax is None:
        fig.tight_layout()
    return finish(fig, ax, show, save)


def usage_series(
    model_or_adata: Any, *, adata: AnnData | None = None, uns_key: str = K.UNS_KEY
) -> pd.Series:
    """Cells per expert as a Series indexed by cluster name, in expert order."""
    if isinstance(model_or_adata, AnnData):
        uns = model_or_adata.uns.get(uns_key)
        if uns is None or "expert_usage" not in uns:
            raise KeyError(
                f"adata.uns[{uns_key!r}]['expert_usage'] not found; annotate the AnnData with "
                "model.annotate(adata) first, or pass the trained model."
            )
        names = [str(n) for n in np.asarray(uns["cluster_names"], dtype=object)]
        counts = np.asarray(uns["expert_usage"], dtype=np.int64)
        return pd.Series(counts, index=names, name="n_cells")
    check_trained(model_or_adata, "expert_usage")
    return model_or_adata.expert_usage(adata)
