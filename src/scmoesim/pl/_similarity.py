"""The minibatch similarity S that trains the gate, next to the gate's P P^T."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from matplotlib.figure import Figure

from scmoesim import _constants as K

from ._utils import check_trained, finish


def similarity(
    model: Any,
    adata: AnnData | None = None,
    n_cells: int = 128,
    seed: int | None = 0,
    *,
    indices: Sequence[int] | None = None,
    cmap: str = "viridis",
    masked_color: str = "lightgrey",
    panel_size: float = 3.6,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Draw the similarity matrix S of one minibatch next to the gate's ``P P^T``.

    The similarity loss is a binary cross-entropy between ``P P^T`` (``P``: the gate's
    cluster probabilities, so ``(P P^T)_ij`` is the probability that cells ``i`` and ``j`` fall
    in the same cluster) and the minibatch similarity ``S`` over the pairs the similarity
    source knows. The left panel shows ``S`` with unknown (masked) pairs in grey -- including
    the diagonal, which the loss never uses; the right panel shows ``P P^T``. Cells are ordered
    by their argmax cluster so that clusters appear as diagonal blocks; the y axis names the
    clusters at their blocks.

    Parameters
    ----------
    model
        A trained :class:`~scmoesim.MoESim` with at least one similarity source (labels,
        signatures or an embedding).
    adata
        AnnData with the model's genes, set up like the training data (``None``: the training
        data).
    n_cells
        Size of the random minibatch (at most the number of cells).
    seed
        Seed of the random choice of cells.
    indices
        Draw exactly these cells (positions in ``adata``) instead of a random minibatch.
    cmap
        Colormap of both panels (values in [0, 1]).
    masked_color
        Colour of the pairs that the similarity source does not know.
    panel_size
        Size of one (square) panel in inches.
    show
        Call :func:`matplotlib.pyplot.show` after drawing (default: no).
    save
        Write the figure to this path (format from the suffix, e.g. ``.png``).

    Returns
    -------
    The Figure with three Axes: ``S`` (its image a masked array, masked where the pair is
    unknown), ``P P^T`` and the shared colorbar. Rows and columns of both images are the chosen
    cells, ordered by argmax cluster (a merged cluster's experts in one block; stable, so ties
    keep the order of the minibatch).

    Raises
    ------
    RuntimeError
        If the model is not trained.
    ValueError
        If the model has no similarity source, or ``n_cells`` / ``indices`` are invalid.

    Examples
    --------
    >>> scmoesim.pl.similarity(model, n_cells=200)
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    check_trained(model, "similarity")
    data = model.adata if adata is None else model._validate_anndata(adata)
    idx = _choose_cells(data.n_obs, n_cells, seed, indices)
    s, mask, p = minibatch_matrices(model, data, idx)
    # by cluster (merged clusters: one block of their experts), then expert, then minibatch
    names = np.asarray(model.cluster_names_, dtype=object)
    experts = p.argmax(1)
    blocks = model._first_expert_of_cluster()[experts]
    order = np.lexsort((experts, blocks))
    s, mask = s[np.ix_(order, order)], mask[np.ix_(order, order)]
    p, blocks = p[order], blocks[order]
    ppt = p @ p.T
    s_img = np.ma.masked_array(s, mask=~mask)

    colormap = mpl.colormaps[cmap].with_extremes(bad=masked_color)
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel_size + 1.2, panel_size), layout="constrained")
    known = mask.sum() / max(mask.size - len(mask), 1)
    titles = (f"similarity S ({known:.0%} of pairs known)", "gate P P\u1d40")
    image = None
    for ax, matrix, title in zip(axes, (s_img, ppt), titles, strict=True):
        image = ax.imshow(
            matrix, cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal"
        )
        ax.set_title(title, fontsize="medium")
        ax.set_xticks([])
        _label_blocks(ax, blocks, names)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="same cluster")
    return finish(fig, None, show, save)


def minibatch_matrices(
    model: Any, adata: AnnData, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``S``, its known-pair mask and the gate probabilities ``P`` for the given cells.

    The cells are run as one minibatch, in the given order, through the model's inference
    (posterior mean of z) and similarity builders, exactly as in training.
    """
    module = model.module
    tensors = _one_minibatch(model, adata, indices)
    module.eval()
    with torch.inference_mode():
        device = model.device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        inf = module.inference(
            x=tensors[K.X_KEY], batch_index=tensors.get(K.BATCH_KEY), use_mean=True
        )
        out = module.minibatch_similarity(tensors, inf["library"])
        if out is None:
            raise ValueError(
                "The model has no similarity source (labels_key, signatures or embedding_key "
                "in setup_anndata), so there is no similarity matrix S to draw."
            )
        s, mask = out
        return (
            s.detach().cpu().numpy().astype(float),
            mask.detach().cpu().numpy().astype(bool),
            inf["p"].detach().cpu().numpy().astype(float),
        )


def _one_minibatch(model: Any, adata: AnnData, indices: np.ndarray) -> dict[str, torch.Tensor]:
    loader = model._make_data_loader(adata=adata, indices=indices, batch_size=len(indices))
    parts: dict[str, list[torch.Tensor]] = {}
    for tensors in loader:
        for key, value in tensors.items():
            parts.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in parts.items()}


def _choose_cells(
    n_obs: int, n_cells: int, seed: int | None, indices: Sequence[int] | None
) -> np.ndarray:
    if indices is not None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size < 2 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError("indices must be a 1-D sequence of at least 2 integer positions.")
        if idx.min() < -n_obs or idx.max() >= n_obs:
            raise ValueError(f"indices out of range for {n_obs} cells.")
        return idx % n_obs
    if isinstance(n_cells, bool) or not isinstance(n_cells, int | np.integer) or n_cells < 2:
        raise ValueError(f"n_cells must be an integer >= 2, got {n_cells!r}.")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_obs, size=min(int(n_cells), n_obs), replace=False))


def _label_blocks(ax, experts: np.ndarray, names: Sequence[str]) -> None:
    """Name each cluster's block on the y axis and separate blocks by thin lines."""
    ticks, labels = [], []
    start = 0
    for k in dict.fromkeys(experts.tolist()):
        size = int((experts == k).sum())
        ticks.append(start + (size - 1) / 2)
        labels.append(str(names[k]))
        if start > 0:
            ax.axhline(start - 0.5, color="white", lw=0.6)
            ax.axvline(start - 0.5, color="white", lw=0.6)
        start += size
    ax.set_yticks(ticks, labels, fontsize="small")
