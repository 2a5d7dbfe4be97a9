"""Loss terms of MoE-Sim-VAE (paper Eq. 3, 7, 8-9 and the principled KL alternative).

Every function returns per-cell values (shape ``(n,)``) or a scalar, as documented, so the
module can weight and average them in one place.
"""

import torch

_EPS = 1e-7


def kl_mixture(qz_m: torch.Tensor, qz_v: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``KL(N(m, diag v) || N(mu_k, I))`` per cell, against the cell's own cluster centre.

    Parameters
    ----------
    qz_m, qz_v
        ``(n, d)`` mean and variance of q(z|x).
    centres
        ``(n, d)`` centre ``mu_k`` of the cluster each cell is routed to (no gradient).

    Returns
    -------
    ``(n,)`` KL divergences.
    """
    return 0.5 * (qz_v + (qz_m - centres) ** 2 - 1.0 - torch.log(qz_v)).sum(-1)


def kl_paper(z: torch.Tensor, p: torch.Tensor, min_weight: float = 2.0) -> torch.Tensor:
    """The paper's Eq. 3: push each cluster's per-dimension variance of ``z`` towards 1.

    ``KL(N(mu, I) || N(mu, diag(sigma_k)))`` with ``sigma_k`` the ``p``-weighted variance of the
    samples of cluster ``k`` in the minibatch, i.e. ``0.5 * sum_j (1/sigma_kj - 1 + log
    sigma_kj)``; clusters are averaged weighted by their soft size. Clusters with a soft size
    below ``min_weight`` are skipped (their variance is not estimable).

    Returns
    -------
    Scalar (per-cell average scale).
    """
    w = p.sum(0)  # (K,)
    mean = (p.T @ z) / w.clamp_min(_EPS)[:, None]
    second = (p.T @ z**2) / w.clamp_min(_EPS)[:, None]
    var = (second - mean**2).clamp_min(1e-4)
    kl_k = 0.5 * (1.0 / var - 1.0 + torch.log(var)).sum(-1)
    keep = (w >= min_weight).to(z.dtype)
    return (kl_k * w * keep).sum() / (w * keep).sum().clamp_min(_EPS)


def similarity_bce(
    p: torch.Tensor, s: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy between ``P P^T`` and ``S`` over the known pairs (paper Eq. 7).

    The paper writes only the ``S log(PP^T)`` half; this is the full BCE, with the
    ``(1 - S) log(1 - PP^T)`` term that stops all cells from collapsing into one cluster.

    Parameters
    ----------
    p
        ``(n, K)`` gate probabilities.
    s, mask
        ``(n, n)`` similarity and known-pair mask.

    Returns
    -------
    loss
        Scalar: mean BCE over known pairs (0 when no pair is known).
    n_pairs
        Number of known pairs (a tensor, to avoid a host sync).
    """
    pp = (p @ p.T).clamp(_EPS, 1.0 - _EPS)
    bce = -(s * torch.log(pp) + (1.0 - s) * torch.log1p(-pp))
    m = mask.to(p.dtype)
    n_pairs = m.sum()
    return (bce * m).sum() / n_pairs.clamp_min(1.0), n_pairs


def depict_target(p: torch.Tensor) -> torch.Tensor:
    """Sharpened, frequency-balanced target ``q`` of paper Eq. 9 (detached).

    ``q_ik = (p_ik / sqrt(sum_i' p_i'k)) / sum_k' (p_ik' / sqrt(sum_i' p_i'k'))``.
    """
    p = p.detach()
    unnorm = p / p.sum(0, keepdim=True).clamp_min(_EPS).sqrt()
    return unnorm / unnorm.sum(1, keepdim=True).clamp_min(_EPS)


def depict_loss(p_clean: torch.Tensor, log_p_noisy: torch.Tensor) -> torch.Tensor:
    """DEPICT cross-entropy (paper Eq. 8) per cell.

    Parameters
    ----------
    p_clean
        ``(n, K)`` gate probabilities without dropout; the target is computed from it and not
        back-propagated.
    log_p_noisy
        ``(n, K)`` log-probabilities of the dropout-noised pass.

    Returns
    -------
    ``(n,)`` ``-sum_k q_ik log p_hat_ik``.
    """
    return -(depict_target(p_clean) * log_p_noisy).sum(-1)


def anchor_loss(p: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the gate and each known cell's class (expert ``k`` = class ``k``).

    Pins the classes of labels or signatures to their own experts, one cell at a time, so that a
    small class cannot be absorbed by a large one (the pairwise loss of Eq. 7 gives a class a
    weight proportional to its number of pairs). The authors' implementation trains the gate with
    this per-cell term instead of Eq. 7.

    Parameters
    ----------
    p
        ``(n, K)`` gate probabilities.
    codes
        ``(n,)`` class index of each cell, ``-1`` where unknown.

    Returns
    -------
    Scalar: mean ``-log p[i, codes[i]]`` over the known cells (0 when none is known).
    """
    known = (codes >= 0).to(p.dtype)
    picked = p.gather(1, codes.clamp_min(0).long()[:, None]).squeeze(1)
    nll = -torch.log(picked.clamp_min(_EPS))
    return (nll * known).sum() / known.sum().clamp_min(1.0)
