import torch


def label_similarity(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity from (possibly partial) integer labels.

    Parameters
    ----------
    codes
        ``(n,)`` or ``(n, 1)`` label codes; negative values mean *unknown*. Float tensors (as
        scvi-tools delivers registered obs columns) are rounded to integers.

    Returns
    -------
    S
        ``S[i, j] = 1`` when both cells carry the same label, else 0.
    mask
        ``True`` where both cells are labelled and ``i != j``.
    """
    c = codes.reshape(-1).round().long()
    known = c >= 0
    s = (c[:, None] == c[None, :]).to(torch.get_default_dtype())
    mask = known[:, None] & known[None, :]
    mask.fill_diagonal_(False)
    return s, mask
