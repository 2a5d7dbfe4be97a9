"""Confusion matrix of known labels versus MoESim clusters."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from scmoesim import _constants as K
from scmoesim import metrics

from ._utils import finish, new_figure


def confusion(
    adata_or_truth: Any,
    clusters: Any = None,
    *,
    truth_key: str | None = None,
    cluster_key: str = K.CLUSTER_KEY,
    normalize: bool = True,
    ignore: Collection[Any] | None = None,
    annotate: bool = True,
    cmap: str = "Blues",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure | Axes:
    """Heatmap of known labels (rows) versus clusters (columns).

    Parameters
    ----------
    adata_or_truth
        An AnnData (with ``truth_key`` and ``cluster_key`` in ``obs``), or a 1-D array-like of
        true labels (then pass ``clusters``).
    clusters
        With an array of true labels: the cluster of every cell, same length.
    truth_key
        With an AnnData: obs column of the known labels (required).
    cluster_key
        With an AnnData: obs column of the clusters (written by ``model.annotate``).
    normalize
        Colour by the fraction of each label's cells in each cluster (rows sum to 1); with
        ``False`` colour by the counts.
    ignore
        True-label values to leave out (e.g. ``["unknown", "unannotated"]``). Cells with a
        missing label or cluster are always left out.
    annotate
        Write the number of cells in every non-empty cell of the matrix.
    cmap
        Colormap.
    ax
        Draw into this Axes instead of a new figure.
    show
        Call :func:`matplotlib.pyplot.show` after drawing (default: no).
    save
        Write the figure to this path (format from the suffix, e.g. ``.png``).

    Returns
    -------
    The Figure, or ``ax`` when it was given. The image (``ax.images[0]``) holds the row
    fractions (or counts); the tick labels name the labels (y) and clusters (x). Labels and
    clusters keep their categorical order when they are categorical, else sorted order (see
    :func:`scmoesim.metrics.contingency`).

    Raises
    ------
    KeyError
        If ``truth_key`` or ``cluster_key`` is not in ``adata.obs``.
    ValueError
        If ``truth_key`` / ``clusters`` is missing, the lengths differ or no cell is left.

    Examples
    --------
    >>> scmoesim.pl.confusion(adata, truth_key="cell_type")
    """
    truth, pred = _labels(adata_or_truth, clusters, truth_key, cluster_key)
    table = confusion_table(truth, pred, ignore=ignore)
    counts = table.to_numpy()
    values = counts / counts.sum(1, keepdims=True) if normalize else counts.astype(float)

    n_rows, n_cols = table.shape
    fig, ax_ = new_figure(ax, (max(4.0, 0.55 * n_cols + 2.5), max(3.0, 0.4 * n_rows + 1.5)))
    image = ax_.imshow(values, cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
    ax_.set_xticks(np.arange(n_cols), [str(c) for c in table.columns], rotation=45, ha="right")
    ax_.set_yticks(np.arange(n_rows), [str(r) for r in table.index])
    ax_.set_xlabel(f"cluster ({cluster_key})" if truth_key is not None else "cluster")
    ax_.set_ylabel(truth_key if truth_key is not None else "label")
    if annotate:
        cut = values.max() / 2 if values.size else 0.0
        for i in range(n_rows):
            for j in range(n_cols):
                if counts[i, j] > 0:
                    ax_.text(
                        j,
                        i,
                        str(int(counts[i, j])),
                        ha="center",
                        va="center",
                        fontsize="x-small",
                        color="white" if values[i, j] > cut else "black",
                    )
    fig.colorbar(image, ax=ax_, label="fraction of label's cells" if normalize else "cells")
    if ax is None:
        fig.tight_layout()
    return finish(fig, ax, show, save)


def confusion_table(
    truth: pd.Series, pred: pd.Series, *, ignore: Collection[Any] | None = None
) -> pd.DataFrame:
    """Counts of labels (rows) x clusters (columns), categorical order kept where there is one."""
    keep = truth.notna().to_numpy() & pred.notna().to_numpy()
    if ignore is not None:
        if isinstance(ignore, str | bytes):
            ignore = [ignore]
        keep &= ~truth.isin(list(ignore)).to_numpy()
    if not keep.any():
        raise ValueError("No cell left with both a label and a cluster.")
    t, p = truth[keep], pred[keep]
    table = metrics.contingency(t.astype(str).to_numpy(), p.astype(str).to_numpy())
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    rows = _category_order(t, table.index)
    cols = _category_order(p, table.columns)
    return table.loc[rows, cols]


def _category_order(values: pd.Series, present: pd.Index) -> list[str]:
    if isinstance(values.dtype, pd.CategoricalDtype):
        order = [str(c) for c in values.cat.categories if str(c) in set(present)]
        return order + [c for c in present if c not in set(order)]
    return list(present)


def _labels(
    adata_or_truth: Any, clusters: Any, truth_key: str | None, cluster_key: str
) -> tuple[pd.Series, pd.Series]:
    if isinstance(adata_or_truth, AnnData):
        adata = adata_or_truth
        if truth_key is None:
            raise ValueError("Pass truth_key= naming the obs column of the known labels.")
        for key, what in ((truth_key, "truth_key"), (cluster_key, "cluster_key")):
            if key not in adata.obs:
                hint = " (run model.annotate(adata) first)" if what == "cluster_key" else ""
                raise KeyError(
                    f"{what} {key!r} not found in adata.obs{hint}; columns: {list(adata.obs)}."
                )
        truth = adata.obs[truth_key].reset_index(drop=True)
        pred = adata.obs[cluster_key].reset_index(drop=True)
        if clusters is not None:
            raise ValueError("With an AnnData, give cluster_key=, not clusters.")
        return truth, pred
    if clusters is None:
        raise ValueError(
            "Pass an AnnData with truth_key=, or the true labels and the clusters as two arrays."
        )
    truth, pred = _as_series(adata_or_truth, "labels"), _as_series(clusters, "clusters")
    if len(truth) != len(pred):
        raise ValueError(f"labels and clusters differ in length ({len(truth)} != {len(pred)}).")
    return truth, pred


def _as_series(values: Any, name: str) -> pd.Series:
    if isinstance(values, pd.Series | pd.Index | pd.Categorical):
        return pd.Series(values).reset_index(drop=True)
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}.")
    return pd.Series(arr)
