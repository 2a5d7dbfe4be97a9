import math

import torch

from ._knn import nearest_neighbors


def n_component_rounds(n: int) -> int:
    """Rounds of label propagation used for ``n`` cells: ``2 * ceil(log2(n)) + 4``."""
    return 2 * math.ceil(math.log2(max(n, 2))) + 4


def knn_edges(
    embedding: torch.Tensor, n_neighbors: int, metric: str = "euclidean", mutual: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Directed kNN edges of a minibatch as fixed-size lists.

    Parameters
    ----------
    embedding
        ``(n, d)`` coordinates.
    n_neighbors
        Neighbours per cell, capped at ``n - 1`` (at least 1 cell is needed on each side).
    metric
        See :func:`~scmoesim.similarity.pairwise_distances`.
    mutual
        Keep an edge ``i -> j`` only when ``i`` is among ``j``'s neighbours too.

    Returns
    -------
    src, dst, keep
        ``(n * k,)`` tensors: the edge ``src -> dst`` and whether it is kept. The length
        depends on ``n`` and ``k`` only, never on the data (no host synchronisation).
    """
    n = embedding.shape[0]
    k = min(n_neighbors, n - 1)
    dev = embedding.device
    if k < 1:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty, empty.bool()
    idx = nearest_neighbors(embedding, k, metric)
    src = torch.arange(n, device=dev)[:, None].expand_as(idx).reshape(-1)
    dst = idx.reshape(-1)
    if mutual:
        directed = torch.zeros(n, n, dtype=torch.bool, device=dev)
        directed[src, dst] = True
        keep = directed[dst, src]
    else:
        keep = torch.ones_like(src, dtype=torch.bool)
    return src, dst, keep


def connected_component_labels(
    n: int,
    src: torch.Tensor,
    dst: torch.Tensor,
    keep: torch.Tensor | None = None,
    n_rounds: int | None = None,
) -> torch.Tensor:
    """Component label of every node of an undirected graph given as an edge list.

    Min-label propagation with hooking and pointer jumping (in the manner of the
    Shiloach-Vishkin family of parallel algorithms), for a fixed number of rounds: every step
    is a tensor operation of a size fixed by ``n`` and the number of edges, so nothing waits
    for the host. Each node's label is always a node of its own component with an index no
    larger than its own; once propagation has converged, it is the smallest index in the
    component.

    Parameters
    ----------
    n
        Number of nodes.
    src, dst
        ``(m,)`` long tensors: the edges (either direction; both are used).
    keep
        ``(m,)`` bool tensor: edges to use (default: all).
    n_rounds
        Rounds of hooking and shortcutting; default :func:`n_component_rounds`. Each round at
        least halves the distance a label still has to travel along a path in the tests
        (``tests/test_knn_components.py`` compares with scipy on chains and random graphs).

    Returns
    -------
    ``(n,)`` long tensor of labels: equal labels = same component.
    """
    dev = src.device
    labels = torch.arange(n, device=dev)
    if src.numel() == 0 or n == 0:
        return labels
    if keep is None:
        keep = torch.ones_like(src, dtype=torch.bool)
    both_src = torch.cat([src, dst])
    both_dst = torch.cat([dst, src])
    both_keep = torch.cat([keep, keep])
    sentinel = torch.full_like(both_src, n)
    rounds = n_component_rounds(n) if n_rounds is None else n_rounds
    for _ in range(rounds):
        grand = labels[labels]
        # smallest grandparent label over each node's neighbours (itself included)
        offer = torch.where(both_keep, grand[both_dst], sentinel)
        best = grand.scatter_reduce(0, both_src, offer, reduce="amin")
        # hook: the node's parent adopts the smallest label seen by any of its children
        labels = labels.scatter_reduce(0, labels, best, reduce="amin")
        labels = torch.minimum(labels, best)
        labels = labels[labels]  # shortcut (pointer jumping)
    return labels


def knn_components_similarity(
    embedding: torch.Tensor,
    n_neighbors: int = 10,
    metric: str = "euclidean",
    mutual: bool = False,
    min_component_size: int = 1,
    n_rounds: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity from the connected components of the minibatch's kNN graph.

    Within the minibatch, the kNN graph of the embedding is built (``j`` among the
    ``n_neighbors`` nearest cells of ``i`` or ``i`` among those of ``j``; with ``mutual``, both)
    and split into connected components. ``S[i, j] = 1`` for two cells of one component and 0
    for cells of different components. Unlike :func:`knn_similarity`, where every
    non-neighbour pair is dissimilar, a cluster can then have any number of cells: only the
    islands of the embedding decide it.

    Parameters
    ----------
    embedding
        ``(n, d)`` coordinates of the minibatch's cells (e.g. UMAP).
    n_neighbors
        Neighbours per cell; capped at ``n - 1``.
    metric
        See :func:`pairwise_distances`.
    mutual
        Link two cells only when each is among the other's neighbours: a mutual kNN graph
        rarely bridges two islands through a few stray cells, but leaves more cells isolated.
    min_component_size
        Pairs that involve a cell whose component has fewer cells than this (in the minibatch)
        are unknown (``mask = False``). 1 (default): every pair is known.
    n_rounds
        Rounds of label propagation; see :func:`connected_component_labels`.

    Returns
    -------
    S, mask
        Symmetric ``(n, n)`` tensors; the diagonal is never known.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1]])
    >>> s, mask = knn_components_similarity(x, n_neighbors=1)
    >>> s[0, 2].item(), s[0, 3].item(), s[3, 4].item()
    (1.0, 0.0, 1.0)
    """
    if not isinstance(min_component_size, int) or min_component_size < 1:
        raise ValueError(f"min_component_size must be an integer >= 1, got {min_component_size!r}.")
    n = embedding.shape[0]
    dev = embedding.device
    src, dst, keep = knn_edges(embedding, n_neighbors, metric, mutual)
    labels = connected_component_labels(n, src, dst, keep, n_rounds)
    s = (labels[:, None] == labels[None, :]).to(embedding.dtype)
    s.fill_diagonal_(0.0)
    mask = torch.ones(n, n, dtype=torch.bool, device=dev)
    if min_component_size > 1:
        size = torch.zeros(n, dtype=torch.long, device=dev)
        size.scatter_add_(0, labels, torch.ones_like(labels))
        small = size[labels] < min_component_size
        mask = ~(small[:, None] | small[None, :])
    mask.fill_diagonal_(False)
    return s, mask
