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

    The cluster weights ``p`` are detached: the term shapes the latent space, not the gate,
    which the similarity loss trains (and which must not train during the similarity
    warm-up).

    Returns
    -------
    Scalar (per-cell average scale).
    """
    p = p.detach()
    w = p.sum(0)  # (K,)
    # moments about the minibatch mean: E[z^2] - E[z]^2 cancels catastrophically in float32
    # for z far from the origin (nothing keeps it near 0 under this KL)
    z = z - z.mean(0, keepdim=True).detach()
    mean = (p.T @ z) / w.clamp_min(_EPS)[:, None]
    second = (p.T @ z**2) / w.clamp_min(_EPS)[:, None]
    var = (second - mean**2).clamp_min(1e-4)
    kl_k = 0.5 * (1.0 / var - 1.0 + torch.log(var)).sum(-1)
    keep = (w >= min_weight).to(z.dtype)
    return (kl_k * w * keep).sum() / (w * keep).sum().clamp_min(_EPS)


class _PairBCE(torch.autograd.Function):
    """Summed BCE between ``P P^T`` and a binary ``S`` over the pairs where ``m = 1``.

    One fused pass per step instead of autograd's chain (clamp, two logs, products with ``S``
    and the mask, each with its own ``n x n`` temporaries in forward and backward). With
    ``S`` in {0, 1}, ``-[S log q + (1 - S) log(1 - q)] = -log y`` with ``y = q`` where ``S = 1``
    and ``y = 1 - q`` where ``S = 0``: one logarithm per pair. The gradient with respect to
    ``q`` is ``-1/y`` where ``S = 1`` and ``+1/y`` where ``S = 0``, zero where the clamp of
    ``q`` to ``[eps, 1 - eps]`` is active, exactly as autograd would give for the clamped
    formula. Float 0/1 tensors are used throughout: on the CPU, ``where`` and ``masked_fill``
    with a boolean ``n x n`` condition cost several times a float multiply.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        pp = p @ p.T
        keep = (pp >= _EPS) & (pp <= 1.0 - _EPS)  # where the clamp passes the gradient
        pp.clamp_(_EPS, 1.0 - _EPS)
        # u = pp where s = 1, -(1 - pp) where s = 0 (lerp is exact at weights 0 and 1), so the
        # pair's loss is -log|u| and its gradient with respect to pp is -1/u
        u = torch.lerp(pp - 1.0, pp, s)
        ctx.save_for_backward(p, m, u, keep)
        return -torch.dot(m.reshape(-1), u.abs().log_().reshape(-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, m, u, keep = ctx.saved_tensors
        g_pp = torch.where(keep, m.div(u).mul_(-grad), 0.0)
        # (p^T g)^T is g^T p without reading g transposed
        return torch.mm(g_pp, p).add_((p.T @ g_pp).T), None, None


def dissimilar_weight(
    resolution: float, n_similar: torch.Tensor, n_pairs: torch.Tensor
) -> torch.Tensor:
    """Weight of a dissimilar pair (a similar one weighs 1) in :func:`similarity_bce`.

    ``resolution * n_similar / n_dissimilar`` for ``n_pairs`` known pairs, ``n_similar`` of
    them similar (``n_dissimilar`` at least 1).
    """
    return resolution * n_similar / (n_pairs - n_similar).clamp_min(1.0)


def similarity_bce(
    p: torch.Tensor, s: torch.Tensor, mask: torch.Tensor, resolution: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy between ``P P^T`` and ``S`` over the known pairs (paper Eq. 7).

    The paper writes only the ``S log(PP^T)`` half; this is the full BCE, with the
    ``(1 - S) log(1 - PP^T)`` term that stops all cells from collapsing into one cluster.
    ``P P^T`` is clamped to ``[1e-7, 1 - 1e-7]`` (no gradient where the clamp is active).

    Parameters
    ----------
    p
        ``(n, K)`` gate probabilities.
    s, mask
        ``(n, n)`` similarity (binary: 0/1 floats or booleans, as every builder in
        :mod:`scmoesim.similarity` returns) and known-pair mask.
    resolution
        ``None`` (the paper's weights): every known pair weighs 1. A number ``r > 0``: every
        known dissimilar pair weighs ``r * n_similar / n_dissimilar`` (the counts of known
        similar and dissimilar pairs of this minibatch), the similar pairs weigh 1, and the loss
        is the weighted mean. At ``r = 1`` both kinds carry the same total weight. ``r = 0``:
        only the ``S log(PP^T)`` half that the paper prints (the mean over the similar pairs).

    Returns
    -------
    loss
        Scalar: (weighted) mean BCE over known pairs (0 when no pair is known).
    n_pairs
        Number of known pairs (a tensor, to avoid a host sync).

    Notes
    -----
    Equal, up to float rounding, to
    ``-(s * log(pp) + (1 - s) * log1p(-pp))`` averaged over the mask with
    ``pp = (p @ p.T).clamp(1e-7, 1 - 1e-7)``, in value and gradient
    (``tests/test_losses.py`` checks both against that formula).

    Why a resolution: for hard assignments, joining two groups of cells ``A`` and ``B`` changes
    the loss by ``c * (w * (|A| |B| - e) - e)`` (``e``: similar pairs between them, ``w``: the
    weight of a dissimilar pair, ``c`` the clamped log), so they are joined when their density
    of similar pairs ``e / (|A| |B|)`` exceeds ``w / (1 + w)``. With ``w = 1`` that is more than
    half of all pairs, which a kNN graph only has within groups of about ``2k`` cells: the
    paper's weighting splits every population larger than that. With
    ``w = r * n_similar / n_dissimilar`` the threshold is about ``r`` times the minibatch's
    overall density of similar pairs, the criterion of modularity-type clustering (Leiden's
    constant Potts model) with resolution ``r``; larger ``r`` gives more, smaller clusters.
    """
    m = mask.to(p.dtype)
    s = s.to(p.dtype)
    n_pairs = m.sum()
    if resolution is not None:
        w = dissimilar_weight(resolution, (m * s).sum(), n_pairs)
        # 1 on similar pairs and w on dissimilar ones (s is 0/1)
        m = m * torch.lerp(w.expand_as(s), torch.ones_like(s), s)
    return _PairBCE.apply(p, s, m) / m.sum().clamp_min(1.0), n_pairs


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
    # clamped at the smallest normal float, not 1e-7: a cell the gate puts confidently in the
    # wrong expert (logit gap > 16) still gets a gradient back to its class
    nll = -torch.log(picked.clamp_min(torch.finfo(p.dtype).tiny))
    return (nll * known).sum() / known.sum().clamp_min(1.0)
