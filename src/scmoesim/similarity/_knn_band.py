import math

import torch

from ._knn import knn_similarity, pairwise_distances


def far_rank(n: int, far_fraction: float) -> int:
    """Rank beyond which a cell counts as *far*: ``ceil(far_fraction * (n - 1))``, at least 1."""
    return max(1, math.ceil(far_fraction * (n - 1)))


def knn_band_similarity(
    embedding: torch.Tensor,
    n_neighbors: int = 10,
    far_fraction: float = 0.5,
    metric: str = "euclidean",
    distance_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour similarity that leaves the uncertain pairs of a minibatch unknown.

    Pairs are split into three bands by the rank of one cell among the other's neighbours
    within the minibatch of ``n`` cells:

    * **similar** (``S = 1``, known): ``j`` is among the ``n_neighbors`` nearest cells of ``i``
      or ``i`` among those of ``j`` (as in :func:`knn_similarity`);
    * **dissimilar** (``S = 0``, known): ``j`` is farther from ``i`` than ``i``'s
      ``m``-th nearest cell *and* ``i`` is farther from ``j`` than ``j``'s ``m``-th nearest,
      with ``m = ceil(far_fraction * (n - 1))``;
    * **unknown** (``mask = False``): everything in between, so it does not enter the loss.

    Counting every non-neighbour as dissimilar (the plain kNN rule) pushes apart cells of one
    population that are not among each other's ``k`` nearest; with the band, a population
    only has to be compact relative to the batch, not to ``k``.

    Parameters
    ----------
    embedding
        ``(n, d)`` coordinates of the minibatch's cells.
    n_neighbors
        Neighbours per cell that count as similar; capped at ``n - 1``.
    far_fraction
        In ``(0, 1]``: the far cut-off as a fraction of the minibatch. With 1 no pair is
        dissimilar; small values approach the plain kNN rule. A rank (not a distance) keeps
        the cut-off independent of the scale of the embedding and of the metric.
    metric
        See :func:`pairwise_distances`.
    distance_threshold
        If given, pairs at most this distance apart are similar instead of the kNN pairs.

    Returns
    -------
    S, mask
        Symmetric ``(n, n)`` tensors; the diagonal is never known.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    >>> s, mask = knn_band_similarity(x, n_neighbors=1, far_fraction=0.5)
    >>> s[0, 1].item(), mask[0, 3].item(), mask[0, 2].item()
    (1.0, True, False)
    """
    if not 0.0 < far_fraction <= 1.0:
        raise ValueError(f"far_fraction must be in (0, 1], got {far_fraction!r}.")
    n = embedding.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=embedding.device)
    if n < 2:
        return torch.zeros(n, n, dtype=embedding.dtype, device=embedding.device), ~eye
    d = pairwise_distances(embedding, metric).masked_fill(eye, float("inf"))
    ranked = d.sort(dim=1).values  # column 0 = nearest other cell, the diagonal is last
    # the similar pairs are exactly those of the plain rule (same builder, same tie-breaking)
    near = knn_similarity(embedding, n_neighbors, metric, distance_threshold)[0].bool()
    m = far_rank(n, far_fraction)
    if m >= n - 1:
        far = torch.zeros_like(near)
    else:
        far_one_way = d > ranked[:, m - 1 : m]  # beyond i's m-th nearest cell
        far = far_one_way & far_one_way.T & ~near & ~eye
    mask = near | far
    return near.to(embedding.dtype), mask
