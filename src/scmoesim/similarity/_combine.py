from collections.abc import Sequence

import torch


def combine_similarities(
    sources: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``(S, mask)`` pairs, the first source that knows a pair deciding it.

    Parameters
    ----------
    sources
        ``(S, mask)`` pairs in priority order (highest first), all ``(n, n)``.

    Returns
    -------
    S, mask
        ``mask`` is the union of the masks; ``S`` takes, for each known pair, the value of the
        highest-priority source that knows it. With a single source, its own tensors are
        returned (no copy).

    Notes
    -----
    :class:`~scmoesim.MoESim` passes its sources in the order labels > signatures > graph >
    kNN (the kNN source knows every pair unless ``knn_far_fraction`` is set). So a pair of
    labelled cells is similar exactly when the labels agree, whatever the neighbourhood says;
    pairs with an unlabelled cell (or a cell
    that carries no single signature) take the kNN value. Combining labels with kNN therefore
    never lets the graph join two known classes, and gives the unlabelled cells a similarity.

    Examples
    --------
    >>> s_lab = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    >>> m_lab = torch.tensor([[False, True], [True, False]])  # known: different labels
    >>> s_knn = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # but neighbours
    >>> m_knn = torch.tensor([[False, True], [True, False]])
    >>> combine_similarities([(s_lab, m_lab), (s_knn, m_knn)])[0][0, 1].item()
    0.0
    """
    if len(sources) == 0:
        raise ValueError("combine_similarities needs at least one (S, mask) pair.")
    s, mask = sources[0]  # not modified in place below: no copy needed
    for s_next, m_next in sources[1:]:
        fill = m_next & ~mask
        s = torch.where(fill, s_next.to(s.dtype), s)
        mask = mask | m_next
    return s, mask
