"""Experts merged into clusters: greedy modularity on a kNN graph of the training cells.

With more experts than populations, the unsupervised kNN similarity tends to split large
populations over several experts (its dissimilar pairs are every non-neighbour in the
minibatch, so an expert's share of a minibatch follows ``knn_neighbors`` rather than the data).
:meth:`MergeMixin.merge_clusters` joins experts whose cells are more connected in a kNN graph of
the training data than a random graph with the same degrees would make them (the modularity
gain, Newman 2004, as Louvain's and Leiden's aggregation step uses it). The experts stay as
they are; only the cluster names change, so several experts can share one cluster.
"""

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._outputs import _number_unnamed
from ._validate import check_embedding

#: What :meth:`MergeMixin.merge_clusters` accepts as ``use_rep`` for the model's latent space.
LATENT = "latent"


def modularity_merge(
    codes: np.ndarray,
    graph: sparse.spmatrix,
    n_groups: int,
    resolution: float = 1.0,
    fixed: np.ndarray | None = None,
) -> np.ndarray:
    """Merge groups of graph nodes greedily while the modularity increases.

    Parameters
    ----------
    codes
        Group (``0 .. n_groups - 1``) of every node.
    graph
        ``(n, n)`` symmetric, non-negative adjacency (e.g. kNN connectivities).
    n_groups
        Number of groups (groups without nodes are never merged).
    resolution
        Modularity resolution ``gamma``: merging ``a`` and ``b`` gains
        ``e_ab / m - gamma * d_a * d_b / (2 m^2)`` (``e_ab``: edge weight between them,
        ``d``: summed degrees, ``m``: total edge weight). Larger values merge less.
    fixed
        Boolean per group: two fixed groups are never merged with each other (e.g. experts
        named after different label classes).

    Returns
    -------
    For each group, the index of its merged group (``0 ..``, ordered by the smallest group
    index in each merged group).
    """
    onehot = sparse.csr_matrix(
        (np.ones(len(codes)), (np.arange(len(codes)), codes)), shape=(len(codes), n_groups)
    )
    between = np.asarray((onehot.T @ sparse.csr_matrix(graph) @ onehot).todense(), dtype=float)
    degree = between.sum(1)
    two_m = degree.sum()
    fixed = np.zeros(n_groups, bool) if fixed is None else np.asarray(fixed, bool).copy()
    parent = np.arange(n_groups)
    alive = [g for g in range(n_groups) if degree[g] > 0]
    while two_m > 0 and len(alive) > 1:
        a_idx = np.asarray(alive)
        gain = 2.0 * (
            between[np.ix_(a_idx, a_idx)] / two_m
            - resolution * np.outer(degree[a_idx], degree[a_idx]) / two_m**2
        )
        np.fill_diagonal(gain, -np.inf)
        gain[np.ix_(fixed[a_idx], fixed[a_idx])] = -np.inf
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[i, j] > 0:
            break
        a, b = int(a_idx[i]), int(a_idx[j])
        if fixed[b]:  # b joins a: a fixed group keeps its identity
            a, b = b, a
        between[a, :] += between[b, :]
        between[:, a] += between[:, b]
        between[b, :] = 0.0
        between[:, b] = 0.0
        degree[a] += degree[b]
        degree[b] = 0.0
        parent[parent == b] = a
        alive.remove(b)
    return np.unique(parent, return_inverse=True)[1]


class MergeMixin:
    """``merge_clusters``: several experts per cluster."""

    def merge_clusters(
        self,
        resolution: float | None = 1.0,
        *,
        n_neighbors: int = 15,
        use_rep: str | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Merge experts whose training cells form one community of a kNN graph.

        Greedy modularity merging: the pair of experts whose merge raises the modularity of
        the graph most is merged, until no merge raises it. Afterwards several experts can
        carry one cluster name; :meth:`predict`, :meth:`annotate`, :meth:`effective_n_clusters`
        and :meth:`generate` (which splits a cluster's cells over its experts in proportion to
        their training cells) work with the merged clusters. Experts named after two different
        label classes or signatures are never merged; an unnamed expert merged with a named one
        takes its name. Call it again with another ``resolution`` to redo the merge from the
        experts, or with ``None`` to undo it. Saved and loaded with the model.

        Parameters
        ----------
        resolution
            Modularity resolution (as in Leiden and :func:`scanpy.tl.leiden`): larger values
            keep more clusters. ``None`` restores one cluster per expert.
        n_neighbors
            Neighbours per cell of the kNN graph (scanpy's convention, the cell included).
        use_rep
            Where the graph comes from: ``None`` uses the model's similarity source (the
            registered ``obsp`` graph, else a kNN graph of the registered embedding with the
            model's ``knn_metric``, else the model's latent space); an ``obsm`` key of the
            training data; or ``"latent"`` for the model's latent space.
        batch_size
            Minibatch size for the passes over the training data.

        Returns
        -------
        One row per expert: its cluster before and after the merge and its training cells.

        Examples
        --------
        >>> model.train()
        >>> model.merge_clusters()
        >>> adata.obs["cluster"] = model.predict()
        """
        if resolution is not None and (
            isinstance(resolution, bool)
            or not isinstance(resolution, int | float | np.number)
            or not np.isfinite(resolution)
            or resolution <= 0
        ):
            raise ValueError(f"resolution must be a positive number or None, got {resolution!r}.")
        if not isinstance(n_neighbors, int | np.integer) or isinstance(n_neighbors, bool):
            raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r}.")
        if n_neighbors < 2:
            raise ValueError(
                f"n_neighbors counts the cell itself and must be at least 2, got {n_neighbors}."
            )
        if not self.is_trained_:
            raise RuntimeError("Train the model (model.train()) before merging its clusters.")
        experts = getattr(self, "expert_names_", None) or list(self.cluster_names_)
        before = list(self.cluster_names_)
        if resolution is None:
            self.cluster_names_ = list(experts)
        else:
            out = self._pass(batch_size=batch_size)  # experts and latent in one pass
            graph = self._merge_graph(n_neighbors, use_rep, out["z"])
            codes = out["expert"]
            classes = set(self._class_names())
            named = np.array([n in classes for n in experts])
            groups = modularity_merge(
                codes.astype(np.int64), graph, len(experts), float(resolution), fixed=named
            )
            self.cluster_names_ = _group_names(experts, groups, named, self.expert_usage_)
        self.expert_names_ = list(experts)
        return pd.DataFrame(
            {
                "before": before,
                "cluster": list(self.cluster_names_),
                "n_cells": np.asarray(self.expert_usage_, dtype=np.int64),
            },
            index=pd.RangeIndex(len(experts), name="expert"),
        )

    def _merge_graph(
        self, n_neighbors: int, use_rep: str | None, latent: np.ndarray
    ) -> sparse.spmatrix:
        from ..pp import neighbors

        setup = self.adata_manager.registry["setup_args"]
        if use_rep is None and setup.get("graph_key") is not None:
            graph = sparse.csr_matrix(self.adata.obsp[setup["graph_key"]])
            return graph.maximum(graph.T)
        metric = "euclidean"
        if use_rep is None and setup.get("embedding_key") is not None:
            use_rep = setup["embedding_key"]
            metric = self.module.knn_metric
        if use_rep is None or use_rep == LATENT:
            rep = latent
        elif use_rep in self.adata.obsm:
            check_embedding(self.adata, use_rep)  # 2-D, numeric, finite
            rep = np.asarray(self.adata.obsm[use_rep])
        else:
            raise KeyError(
                f"use_rep={use_rep!r} is neither {LATENT!r} nor a key of the training data's "
                f"obsm ({list(self.adata.obsm)})."
            )
        tmp = AnnData(obs=pd.DataFrame(index=self.adata.obs_names))
        tmp.obsm["rep"] = np.asarray(rep, dtype=np.float32)
        neighbors(tmp, n_neighbors=n_neighbors, use_rep="rep", metric=metric)
        return tmp.obsp["connectivities"]


def _group_names(
    experts: list[str], groups: np.ndarray, named: np.ndarray, usage: np.ndarray
) -> list[str]:
    """Cluster name of every expert: its group's class name, or a number by group size."""
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    names: list[str | None] = [None] * n_groups
    for g in range(n_groups):
        members = np.flatnonzero(groups == g)
        if named[members].any():
            names[g] = experts[members[named[members]][0]]
    size = np.bincount(groups, weights=np.asarray(usage, dtype=float), minlength=n_groups)
    group_names = _number_unnamed(names, size, len(experts))
    return [group_names[int(g)] for g in groups]
