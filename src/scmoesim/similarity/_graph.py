import torch


def graph_similarity(
    adjacency: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity from a precomputed cell-cell graph sliced to the minibatch.

    Parameters
    ----------
    adjacency
        ``(n, n)`` weights of the graph restricted to the minibatch (e.g. rows and columns of
        ``adata.obsp["connectivities"]``).
    threshold
        Pairs with a weight above ``threshold`` are similar. The result is symmetric.

    Returns
    -------
    S, mask
        Every off-diagonal pair is known.
    """
    a = torch.maximum(adjacency, adjacency.T)
    s = (a > threshold).to(torch.get_default_dtype())
    mask = torch.ones_like(s, dtype=torch.bool)
    mask.fill_diagonal_(False)
    return s, mask
