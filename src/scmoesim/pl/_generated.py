"""Real and generated cells on one shared UMAP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from anndata import AnnData
from matplotlib.figure import Figure
from scipy import sparse

from scmoesim import _constants as K

from ._utils import category_colors, finish, point_size, scatter_categories

ORIGIN_KEY = "origin"


def generated_vs_real(
    real: AnnData,
    generated: AnnData,
    cluster_key: str = K.CLUSTER_KEY,
    *,
    layer: str | None = None,
    generated_layer: str | None = None,
    n_pcs: int = 30,
    n_neighbors: int = 15,
    seed: int = 0,
    panel_size: float = 4.0,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Real and generated cells on a shared UMAP, coloured by origin and by cluster.

    Both sets are stacked; each is log-normalised if it holds counts (non-negative integers:
    :func:`scanpy.pp.normalize_total` then :func:`scanpy.pp.log1p`) and used as it is
    otherwise (log data, arcsinh cytometry, Gaussian or Bernoulli samples); then PCA,
    :func:`scanpy.pp.neighbors` and :func:`scanpy.tl.umap` on the union. Generated cells that
    mix well with the real cells of their cluster are what a good expert produces.

    Parameters
    ----------
    real
        Real cells with the clusters in ``obs[cluster_key]`` (e.g. after ``model.annotate``).
    generated
        Output of :meth:`~scmoesim.MoESim.generate` (``obs["moesim_cluster"]``), with the same
        genes as ``real``.
    cluster_key
        obs column with the clusters in both AnnData objects.
    layer
        Layer of ``real`` with the data (``None``: ``X``); use the same kind of data the model
        was trained on (e.g. ``"counts"``).
    generated_layer
        Layer of ``generated`` (``None``: ``X``, the sampled values; ``"mean"``: the expected
        values).
    n_pcs, n_neighbors
        PCA components and neighbours of the kNN graph (capped for small data).
    seed
        Random state of PCA, neighbours and UMAP.
    panel_size
        Size of one panel in inches.
    show
        Call :func:`matplotlib.pyplot.show` after drawing (default: no).
    save
        Write the figure to this path (format from the suffix, e.g. ``.png``).

    Returns
    -------
    The Figure with two Axes: colour by origin (legend entries ``"real"`` and
    ``"generated"``), and colour by cluster with real cells as dots and generated cells as
    crosses.

    Raises
    ------
    KeyError
        If ``cluster_key`` or a layer is missing.
    ValueError
        If the genes differ or one of the sets has fewer than 2 cells.

    Examples
    --------
    >>> new = model.generate(500)
    >>> scmoesim.pl.generated_vs_real(adata, new, layer="counts")
    """
    import matplotlib.pyplot as plt

    xy, origin, clusters = shared_umap(
        real,
        generated,
        cluster_key,
        layer=layer,
        generated_layer=generated_layer,
        n_pcs=n_pcs,
        n_neighbors=n_neighbors,
        seed=seed,
    )
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel_size + 3.5, panel_size), layout="constrained")
    size = point_size(len(xy))
    is_gen = origin == "generated"
    order = np.random.default_rng(seed).permutation(len(xy))  # no set drawn on top
    scatter_categories(
        axes[0],
        xy[order],
        origin[order],
        categories=["real", "generated"],
        colors={"real": "tab:blue", "generated": "tab:orange"},
        title="origin",
        size=size,
    )
    cats = _cluster_categories(real.obs[cluster_key], generated.obs[cluster_key], clusters)
    colors = category_colors(cats)
    ax = axes[1]
    for cat in cats:
        for gen, marker in ((False, "o"), (True, "x")):
            sel = (clusters == cat) & (is_gen == gen)
            if sel.any():
                ax.scatter(
                    *xy[sel].T,
                    s=size if not gen else size * 1.2,
                    color=colors[cat],
                    marker=marker,
                    alpha=0.8,
                    lw=0 if not gen else 0.8,
                    label=cat if not gen else None,
                )
    ax.scatter([], [], marker="o", color="grey", label="real (dot)")
    ax.scatter([], [], marker="x", color="grey", label="generated (cross)")
    ax.set_title(cluster_key)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small")
    for a in axes:
        a.set_xlabel("UMAP1")
        a.set_ylabel("UMAP2")
    return finish(fig, None, show, save)


def shared_umap(
    real: AnnData,
    generated: AnnData,
    cluster_key: str = K.CLUSTER_KEY,
    *,
    layer: str | None = None,
    generated_layer: str | None = None,
    n_pcs: int = 30,
    n_neighbors: int = 15,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UMAP coordinates, origin (``"real"``/``"generated"``) and cluster of the stacked cells."""
    import scanpy as sc

    for name, data in (("real", real), ("generated", generated)):
        if not isinstance(data, AnnData):
            raise TypeError(f"{name} must be an AnnData, got {type(data).__name__}.")
        if cluster_key not in data.obs:
            hint = " (run model.annotate(adata) first)" if name == "real" else ""
            raise KeyError(f"{cluster_key!r} not found in {name}.obs{hint}.")
        if data.n_obs < 2:
            raise ValueError(f"{name} needs at least 2 cells, got {data.n_obs}.")
    if not real.var_names.equals(generated.var_names):
        if set(real.var_names) != set(generated.var_names):
            raise ValueError(
                "real and generated cells have different genes; generate with the model "
                "trained on `real` (or subset real to model.adata.var_names)."
            )
        generated = generated[:, real.var_names]
    x_real, x_gen = _prepare(
        _matrix(real, layer, "real"), _matrix(generated, generated_layer, "generated")
    )
    stacked = AnnData(np.vstack([x_real, x_gen]).astype(np.float32))
    n = stacked.n_obs
    n_comps = int(max(1, min(n_pcs, n - 1, stacked.n_vars - 1)))
    if n_comps >= 2:
        sc.pp.pca(stacked, n_comps=n_comps, random_state=seed)
        rep = "X_pca"
    else:
        rep = "X"
    sc.pp.neighbors(
        stacked, n_neighbors=int(min(n_neighbors, n - 1)), use_rep=rep, random_state=seed
    )
    sc.tl.umap(stacked, random_state=seed)
    origin = np.array(["real"] * real.n_obs + ["generated"] * generated.n_obs, dtype=object)
    clusters = np.concatenate(
        [
            real.obs[cluster_key].astype(str).to_numpy(dtype=object),
            generated.obs[cluster_key].astype(str).to_numpy(dtype=object),
        ]
    )
    return np.asarray(stacked.obsm["X_umap"]), origin, clusters


def _matrix(adata: AnnData, layer: str | None, name: str):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found in {name}.layers ({list(adata.layers)}).")
    return adata.layers[layer]


def _prepare(x_real, x_gen) -> tuple[np.ndarray, np.ndarray]:
    """Dense float matrices on one scale: both log-normalised when the real cells hold counts.

    Both sets are scaled to the same depth (the real cells' median total): each set
    normalised to its own median would move generated cells of a deep (or shallow) cluster
    away from their real cells for no reason. The generated values may be samples or
    ``layers["mean"]`` (expected counts, not integers).
    """
    x_real, x_gen = (_dense(x, name) for x, name in ((x_real, "real"), (x_gen, "generated")))
    if (x_real >= 0).all() and np.array_equal(x_real, np.round(x_real)):
        if (x_gen < 0).any():
            raise ValueError(
                "The real cells hold counts but the generated values are negative: they are "
                "on different scales (choose the generated layer that matches the real one)."
            )
        totals = x_real.sum(1)
        target = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
        x_real, x_gen = _log_normalise(x_real, target), _log_normalise(x_gen, target)
    return x_real, x_gen


def _dense(x, name: str) -> np.ndarray:
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"The {name} data contain NaN or infinite values.")
    return x


def _log_normalise(x: np.ndarray, target: float) -> np.ndarray:
    totals = x.sum(1, keepdims=True)
    return np.log1p(np.divide(x * target, totals, out=np.zeros_like(x), where=totals > 0))


def _cluster_categories(real_col, gen_col, values: np.ndarray) -> list[str]:
    cats: list[str] = []
    for col in (real_col, gen_col):
        if hasattr(col, "cat"):
            cats += [str(c) for c in col.cat.categories]
    cats = list(dict.fromkeys(cats))
    present = set(values.tolist())
    return [c for c in cats if c in present] + sorted(present - set(cats))
