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
        highest-priority source that knows it.
    """
    if len(sources) == 0:
        raise ValueError("combine_similarities needs at least one (S, mask) pair.")
    s, mask = sources[0]
    s = s.clone()
    mask = mask.clone()
    for s_next, m_next in sources[1:]:
        fill = m_next & ~mask
        s = torch.where(fill, s_next.to(s.dtype), s)
        mask = mask | m_next
    return s, mask
