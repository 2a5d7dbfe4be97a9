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
        # cdist's matmul shortcut (above 25 rows) loses the distances of close cells far from
        # the origin in float32 (UMAP coordinates near 10: errors of ~5e-3, duplicates not at
        # 0), which a distance_threshold then misjudges. Centred and in float64 the shortcut is
        # exact to ~1e-6 and, at 1,024 cells x 50 dimensions, 4x faster than the direct sums.
        y = x - x.mean(dim=0, keepdim=True)
        if y.device.type == "mps":  # no float64 there
            return torch.cdist(y, y, compute_mode="donot_use_mm_for_euclid_dist")
        y = y.double()
        return torch.cdist(y, y).to(x.dtype)
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


def nearest_neighbors(embedding: torch.Tensor, k: int, metric: str = "euclidean") -> torch.Tensor:
    """Indices of the ``k`` nearest other cells of every row (unsorted), ``(n, k)``.

    For the euclidean metric the rows are ranked by ``|x_j|^2 - 2 x_i.x_j``, which orders the
    cells of row ``i`` as their distance does (the row's constant ``|x_i|^2`` and the square
    root are dropped): one matmul, no ``cdist``. ``k`` must be in ``[1, n - 1]``.
    """
    if metric == "euclidean":
        # centred first: the expansion loses precision for points far from the origin
        centred = embedding - embedding.mean(0, keepdim=True)
        sq = (centred * centred).sum(1)
        d = torch.addmm(sq[None, :], centred, centred.T, alpha=-2.0)
    else:
        d = pairwise_distances(embedding, metric)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False, sorted=False).indices


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
    if distance_threshold is not None:
        d = pairwise_distances(embedding, metric)
        s = (d <= distance_threshold).to(embedding.dtype)
        s = torch.maximum(s, s.T)
    else:
        k = min(n_neighbors, n - 1)
        s = torch.zeros(n, n, dtype=embedding.dtype, device=embedding.device)
        if k > 0:
            idx = nearest_neighbors(embedding, k, metric)
            rows = torch.arange(n, device=embedding.device)[:, None].expand_as(idx)
            # symmetrised by writing both (i, j) and (j, i): no n x n transpose
            s[rows, idx] = 1.0
            s[idx, rows] = 1.0
    s.fill_diagonal_(0.0)
    mask = torch.ones(n, n, dtype=torch.bool, device=embedding.device)
    mask.fill_diagonal_(False)
    return s, mask
