import torch

KNN_METRICS = ("euclidean", "correlation", "canberra", "cosine")


def pairwise_distances(
    x: torch.Tensor, metric: str = "euclidean", chunk_size: int = 128
) -> torch.Tensor:
    """Pairwise distances between the rows of ``x``.

    Parameters
    ----------
    x
        ``(n, d)`` embedding.
    metric
        ``"euclidean"``, ``"correlation"`` (1 - Pearson r), ``"cosine"`` or ``"canberra"``
        (sum of ``|a - b| / (|a| + |b|)``, terms with ``a = b = 0`` counting 0).
    chunk_size
        Rows per chunk for canberra, which needs an ``(chunk, n, d)`` intermediate.

    Returns
    -------
    ``(n, n)`` distances.
    """
    if metric == "euclidean":
        return torch.cdist(x, x)
    if metric in ("correlation", "cosine"):
        y = x - x.mean(dim=1, keepdim=True) if metric == "correlation" else x
        y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (1.0 - y @ y.T).clamp_min(0.0)
    if metric == "canberra":
        rows = []
        for start in range(0, x.shape[0], chunk_size):
            a = x[start : start + chunk_size, None, :]
            num = (a - x[None, :, :]).abs()
            den = a.abs() + x[None, :, :].abs()
            rows.append(torch.where(den > 0, num / den.clamp_min(1e-12), 0.0).sum(-1))
        return torch.cat(rows, dim=0)
    raise ValueError(f"metric must be one of {KNN_METRICS}, got {metric!r}.")


def knn_similarity(
    embedding: torch.Tensor,
    n_neighbors: int = 10,
    metric: str = "euclidean",
    distance_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity from nearest neighbours within the minibatch (the paper's unsupervised S).

    Parameters
    ----------
    embedding
        ``(n, d)`` coordinates of the minibatch's cells (e.g. UMAP or PCA).
    n_neighbors
        ``S[i, j] = 1`` when ``j`` is among the ``n_neighbors`` nearest cells of ``i`` (or ``i``
        among those of ``j``: the graph is symmetrised). Capped at ``n - 1``.
    metric
        See :func:`pairwise_distances`.
    distance_threshold
        If given, ``S[i, j] = 1`` when the distance is at most this value instead of kNN.

    Returns
    -------
    S, mask
        Every off-diagonal pair is known.
    """
    n = embedding.shape[0]
    d = pairwise_distances(embedding, metric)
    eye = torch.eye(n, dtype=torch.bool, device=embedding.device)
    if distance_threshold is not None:
        s = (d <= distance_threshold) & ~eye
    else:
        k = min(n_neighbors, n - 1)
        s = torch.zeros(n, n, dtype=torch.bool, device=embedding.device)
        if k > 0:
            d = d.masked_fill(eye, float("inf"))
            idx = d.topk(k, dim=1, largest=False).indices
            s.scatter_(1, idx, True)
    s = s | s.T
    mask = ~eye
    return s.to(embedding.dtype), mask
