"""Preprocessing for the unsupervised similarity: neighbour graphs and the paper's UMAP embedding.

The paper builds its unsupervised similarity from a UMAP projection of the data: the kNN graph of
each minibatch is computed in that projection. :func:`umap_embedding` computes the projection the
scanpy way (``sc.pp.neighbors`` then ``sc.tl.umap``) and writes it to ``adata.obsm``, ready for
``MoESim.setup_anndata(adata, embedding_key="X_umap")``.

Both functions build the neighbour graph with an exact scikit-learn search instead of scanpy's
default approximate search (pynndescent), which fails with scanpy 1.11 and scipy >= 1.15 from
about 4,000 cells on (``'csr_array' object has no attribute 'getnnz'``), and which also spends
minutes compiling on first use. The graph is the same as scanpy's apart from approximation error.
"""

from __future__ import annotations

import numpy as np
import scanpy as sc
from anndata import AnnData
from scipy import sparse
from sklearn.neighbors import KNeighborsTransformer

__all__ = ["neighbors", "umap_embedding"]


def _check_common(adata: AnnData, n_neighbors: int, use_rep: str | None) -> None:
    if not isinstance(adata, AnnData):
        raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs < 3:
        raise ValueError(f"A neighbour graph needs at least 3 cells, got {adata.n_obs}.")
    if not isinstance(n_neighbors, int | np.integer) or n_neighbors < 2:
        raise ValueError(f"n_neighbors must be an integer >= 2, got {n_neighbors!r}.")
    if use_rep is not None and use_rep != "X" and use_rep not in adata.obsm:
        raise KeyError(f"use_rep {use_rep!r} not found in adata.obsm (keys: {list(adata.obsm)}).")


def neighbors(
    adata: AnnData,
    n_neighbors: int = 15,
    *,
    use_rep: str | None = None,
    n_pcs: int | None = None,
    metric: str = "euclidean",
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """``sc.pp.neighbors`` with an exact search that works at any number of cells.

    A drop-in for :func:`scanpy.pp.neighbors` (UMAP connectivities, same keys) whose graph is
    found by :class:`sklearn.neighbors.KNeighborsTransformer` (a tree for low-dimensional inputs
    and tree-compatible metrics, brute force otherwise). Use it where ``sc.pp.neighbors`` fails
    with ``'csr_array' object has no attribute 'getnnz'`` (scanpy 1.11 + scipy >= 1.15,
    datasets of about 4,000 cells or more).

    Parameters
    ----------
    adata
        Cells x features.
    n_neighbors
        Neighbours per cell, the cell itself included (scanpy's convention).
    use_rep
        obsm key of the representation (or ``"X"``); ``None`` follows scanpy: ``X_pca`` if
        present, ``X`` for fewer than 50 features, else a PCA computed and stored in
        ``obsm["X_pca"]``.
    n_pcs
        Number of principal components to use.
    metric
        Any metric of scikit-learn's nearest-neighbour search, e.g. ``"euclidean"``,
        ``"correlation"``, ``"canberra"``, ``"cosine"``.
    key_added
        As in scanpy: ``None`` writes ``uns["neighbors"]``, ``obsp["distances"]`` and
        ``obsp["connectivities"]``; otherwise ``uns[key_added]``,
        ``obsp[key_added + "_distances"]`` and ``obsp[key_added + "_connectivities"]``.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    The annotated copy if ``copy=True``, else ``None``.
    """
    _check_common(adata, n_neighbors, use_rep)
    n_neighbors = int(min(n_neighbors, adata.n_obs - 1))
    transformer = KNeighborsTransformer(n_neighbors=n_neighbors, metric=metric, algorithm="auto")
    target = adata.copy() if copy else adata
    sc.pp.neighbors(
        target,
        n_neighbors=n_neighbors,
        n_pcs=n_pcs,
        use_rep=use_rep,
        transformer=transformer,
        key_added=key_added,
    )
    params = target.uns["neighbors" if key_added is None else key_added]
    # scanpy records "euclidean" for a transformer instance; sc.tl.umap reads the metric here
    if isinstance(metric, str):
        params["params"]["metric"] = metric
    dist_key = params["distances_key"]
    target.obsp[dist_key] = _drop_self_and_extra(target.obsp[dist_key], n_neighbors - 1)
    return target if copy else None


def _drop_self_and_extra(d: sparse.csr_matrix, k: int) -> sparse.csr_matrix:
    """Keep the ``k`` nearest other cells per row, as ``sc.pp.neighbors`` stores distances.

    scikit-learn's transformer also returns each cell itself and one extra neighbour.
    """
    d = sparse.csr_matrix(d)
    n = d.shape[0]
    rows = np.repeat(np.arange(n), np.diff(d.indptr))
    dist = np.where(d.indices == rows, np.inf, d.data)
    order = np.lexsort((dist, rows))
    rank = np.arange(len(order)) - d.indptr[rows[order]]
    keep = order[(rank < k) & np.isfinite(dist[order])]
    out = sparse.csr_matrix((d.data[keep], (rows[keep], d.indices[keep])), shape=d.shape)
    out.sort_indices()
    return out


def umap_embedding(
    adata: AnnData,
    *,
    n_components: int = 2,
    n_neighbors: int = 15,
    metric: str = "euclidean",
    use_rep: str | None = None,
    n_pcs: int | None = None,
    min_dist: float = 0.5,
    n_epochs: int | None = None,
    random_state: int = 0,
    key_added: str = "X_umap",
    neighbors_key: str = "neighbors",
    copy: bool = False,
) -> AnnData | None:
    """The paper's UMAP projection of the data, written to ``adata.obsm[key_added]``.

    Runs :func:`neighbors` (exact search, works at 10k+ cells) and :func:`scanpy.tl.umap`. Use
    the result as the embedding of the unsupervised kNN similarity::

        scmoesim.pp.umap_embedding(adata, use_rep="X_pca")
        scmoesim.MoESim.setup_anndata(adata, layer="counts", embedding_key="X_umap")

    Parameters
    ----------
    adata
        Cells x features. For count data give a log-normalised representation (``use_rep``,
        e.g. ``"X_pca"`` from ``sc.pp.pca``); raw counts in ``X`` make a poor graph.
    n_components
        Dimension of the projection. 2 (scanpy's default) suits cytometry; for images or data
        with many classes, ``n_components=10`` with ``min_dist=0.1`` gives cleaner minibatch
        neighbourhoods (MNIST: NMI 0.79 against 0.69; docs, "Choosing the embedding"). Plot
        with a separate 2-D UMAP then.
    n_neighbors
        Neighbours of the UMAP graph (not the ``k`` of the minibatch similarity, which is
        ``MoESim(knn_neighbors=...)``).
    metric
        Metric of the UMAP graph (the paper: canberra or correlation on cytometry); any metric
        of scikit-learn's nearest-neighbour search.
    use_rep, n_pcs
        Representation the graph is computed on, as in :func:`scanpy.pp.neighbors`.
    min_dist
        UMAP's ``min_dist`` (scanpy's default 0.5).
    n_epochs
        Optimisation epochs of the layout; ``None``: UMAP's default (500 below 10,000 cells,
        200 above).
    random_state
        Seed of the layout.
    key_added
        obsm key of the projection.
    neighbors_key
        Where the graph goes: ``uns[neighbors_key]`` and ``obsp[neighbors_key + "_distances"]``,
        ``obsp[neighbors_key + "_connectivities"]``; the default ``"neighbors"`` writes scanpy's
        usual ``uns["neighbors"]``, ``obsp["distances"]``, ``obsp["connectivities"]``.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    The annotated copy if ``copy=True``, else ``None``. Writes ``obsm[key_added]``
    (``n_cells x n_components`` float32), the graph keys above and the settings in
    ``uns["umap"]["params"]`` (``uns[key_added]["params"]`` for another ``key_added``). With
    ``use_rep=None`` and 50 or more features, scanpy also stores the PCA it computes in
    ``obsm["X_pca"]``.
    """
    _check_common(adata, n_neighbors, use_rep)
    if not isinstance(n_components, int | np.integer) or n_components < 1:
        raise ValueError(f"n_components must be a positive integer, got {n_components!r}.")
    if isinstance(min_dist, bool) or not isinstance(min_dist, int | float | np.number):
        raise TypeError(f"min_dist must be a number, got {min_dist!r}.")
    if not (np.isfinite(min_dist) and min_dist >= 0):
        raise ValueError(f"min_dist must be a finite number >= 0, got {min_dist!r}.")
    if n_epochs is not None and (not isinstance(n_epochs, int | np.integer) or n_epochs < 1):
        raise ValueError(f"n_epochs must be a positive integer or None, got {n_epochs!r}.")
    if not key_added:
        raise ValueError("key_added must be a non-empty string.")
    target = adata.copy() if copy else adata
    graph_key = None if neighbors_key == "neighbors" else neighbors_key
    neighbors(
        target,
        n_neighbors=n_neighbors,
        use_rep=use_rep,
        n_pcs=n_pcs,
        metric=metric,
        key_added=graph_key,
    )
    sc.tl.umap(
        target,
        n_components=int(n_components),
        min_dist=min_dist,
        maxiter=n_epochs,
        random_state=random_state,
        neighbors_key=neighbors_key,
        key_added=None if key_added == "X_umap" else key_added,
    )
    target.obsm[key_added] = np.asarray(target.obsm[key_added], dtype=np.float32)
    uns_key = "umap" if key_added == "X_umap" else key_added
    target.uns[uns_key]["params"].update(
        {
            "n_components": int(n_components),
            "n_neighbors": int(n_neighbors),
            "metric": metric,
            "use_rep": "auto" if use_rep is None else use_rep,
            "min_dist": float(min_dist),
            "neighbors_key": neighbors_key,
        }
    )
    return target if copy else None
