import numpy as np
import torch
from scipy import sparse

#: Registered fields arrive as float32, which holds integers exactly up to 2**24.
MAX_GRAPH_CELLS = 2**24


def neighbor_table(graph, width: int | None = None) -> np.ndarray:
    """Each cell's index and its graph neighbours as one fixed-width float32 row.

    scvi-tools hands a model the rows of a minibatch, not a cell-cell matrix, so a graph is
    registered as a table: column 0 holds the cell's own index, columns ``1..width`` the
    indices of its neighbours (non-zero entries of its row, itself excluded; the strongest
    first when a row is cut to ``width``), padded with -1.

    Parameters
    ----------
    graph
        ``(n, n)`` sparse or dense adjacency, e.g. ``adata.obsp["connectivities"]``. It is
        symmetrised (``i`` lists ``j`` when either row has the edge).
    width
        Number of neighbour columns; ``None``: the largest degree.

    Returns
    -------
    ``(n, 1 + width)`` float32 array.

    Raises
    ------
    ValueError
        Not square, negative or non-finite weights, or more than ``2**24`` cells.
    """
    g = sparse.csr_matrix(graph, dtype=np.float64)
    n = g.shape[0]
    if g.ndim != 2 or g.shape[1] != n:
        raise ValueError(f"The graph must be a square cells x cells matrix, got {g.shape}.")
    if n > MAX_GRAPH_CELLS:
        raise ValueError(
            f"A registered graph supports at most {MAX_GRAPH_CELLS:,} cells (indices travel as "
            f"float32), got {n:,}."
        )
    if g.nnz and (not np.isfinite(g.data).all() or (g.data < 0).any()):
        raise ValueError("The graph has negative or non-finite weights.")
    g = g.maximum(g.T).tocsr()
    g.setdiag(0)
    g.eliminate_zeros()
    degree = np.diff(g.indptr)
    if width is None:
        width = int(degree.max(initial=0))
    table = np.full((n, 1 + width), -1.0, dtype=np.float32)
    table[:, 0] = np.arange(n, dtype=np.float32)
    for i in range(n):
        cols = g.indices[g.indptr[i] : g.indptr[i + 1]]
        if len(cols) > width:
            weights = g.data[g.indptr[i] : g.indptr[i + 1]]
            cols = cols[np.argsort(-weights, kind="stable")[:width]]
        table[i, 1 : 1 + len(cols)] = cols
    return table


def graph_list_similarity(
    table: torch.Tensor, unlinked_known: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity of a minibatch from the rows of a :func:`neighbor_table`.

    Parameters
    ----------
    table
        ``(n, 1 + width)`` rows of the minibatch's cells (own index, then neighbours, -1 pads).
    unlinked_known
        ``True``: pairs without an edge are known dissimilar (every pair is known). ``False``:
        only the edges are known (similar), leaving the other pairs to a lower-priority source.

    Returns
    -------
    S, mask
        Symmetric ``(n, n)``; ``S[i, j] = 1`` when ``i`` and ``j`` are linked in the graph.
    """
    t = table.round().long()
    idx, nbrs = t[:, 0], t[:, 1:]
    linked = (nbrs[:, :, None] == idx[None, None, :]).any(1)
    linked = linked | linked.T
    eye = torch.eye(t.shape[0], dtype=torch.bool, device=table.device)
    linked = linked & ~eye
    mask = ~eye if unlinked_known else linked
    return linked.to(torch.get_default_dtype()), mask
