"""Fast exact sampling of sparse count matrices (Poisson, NB, ZINB) from their means.

Generated count matrices are mostly zeros, and drawing a Gamma and a Poisson variate for every
entry (what ``Distribution.sample()`` does) costs far more than everything else in generation.
Both samplers here draw one uniform ``u`` per entry and use the inverse transform for the zeros,
which is exact:

1. ``P(x = 0) >= 1 - mu`` for all three distributions (Bernoulli's inequality), so every entry
   with ``u < 1 - mu`` is zero without computing anything else.
2. For the other entries, ``P(x = 0)`` is computed (float64); ``u < P(x = 0)`` gives zero.
3. The entries that are non-zero are drawn from the distribution conditioned on ``x > 0``: by
   continuing the inverse transform with the same ``u`` where that is short, and by
   independent draws (Gamma-Poisson until ``x > 0``) otherwise.

On the CPU a fused numba kernel (:mod:`._count_kernel`) does this per row, in parallel over
rows, and writes CSR parts directly; on other devices (or without numba) a vectorised torch
version runs on the device.
"""

import numpy as np
import torch


def _numba_kernel():
    """The numba kernel module, imported on first use (``None`` without numba)."""
    try:
        from . import _count_kernel
    except ImportError:  # pragma: no cover - numba comes with scanpy
        return None
    return _count_kernel


#: Entries with P(x = 0) below this are drawn by rejection (expected <= 1 / (1 - tau) rounds).
_REJECTION_BELOW = 0.5
#: Steps of the inverse-transform recursion before the tail continues in blocks.
_INVERSION_STEPS = 16
_MAX_REJECTION_ROUNDS = 100_000
_INT32_MAX = 2**31 - 1


def sample_sparse_counts(
    likelihood: str,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    theta_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a count matrix and return it as CSR parts.

    Parameters
    ----------
    likelihood
        ``"poisson"``, ``"nb"`` or ``"zinb"``.
    mu
        ``(n, genes)`` means of the Poisson / negative binomial (before zero inflation).
    theta
        NB inverse dispersion, ``(1 or n, genes)`` (``"nb"``, ``"zinb"``); with
        ``theta_index``, any number of rows ``(R, genes)``.
    zi_logits
        ``(n, genes)`` logits of the zero-inflation probability (``"zinb"``).
    generator
        Random generator on ``mu``'s device (``None``: the global one). The numba kernel takes
        one 63-bit key from it; the torch sampler draws from it directly.
    backend
        ``"auto"`` (numba on the CPU when available, else torch), ``"numba"`` or ``"torch"``.
    theta_index
        ``(n,)`` row of ``theta`` for each row of ``mu`` (e.g. the expert of each cell when
        ``theta`` holds one row per expert); saves gathering a full ``(n, genes)`` theta.

    Returns
    -------
    indptr, indices, values
        CSR parts on ``mu``'s device: ``indptr`` (int64, ``n + 1``), column indices (int32)
        and values (int32, all > 0) of the non-zero entries, sorted by row, then column.
    """
    if likelihood not in ("poisson", "nb", "zinb"):
        raise ValueError(f"Count sampling needs 'poisson', 'nb' or 'zinb', got {likelihood!r}.")
    if likelihood != "poisson" and theta is None:
        raise ValueError(f"likelihood={likelihood!r} needs theta.")
    if likelihood == "zinb" and zi_logits is None:
        raise ValueError("likelihood='zinb' needs zi_logits.")
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}.")
    n, g = mu.shape
    if likelihood != "poisson":
        theta = theta.reshape(-1, g) if theta.dim() > 1 else theta.reshape(1, -1)
        if theta.shape[1] != g:
            raise ValueError(f"theta must have {g} columns, got shape {tuple(theta.shape)}.")
        if theta_index is not None:
            theta_index = theta_index.reshape(-1).long()
            if theta_index.shape[0] != n:
                raise ValueError(f"theta_index must have {n} entries, got {theta_index.shape[0]}.")
            if n and (int(theta_index.min()) < 0 or int(theta_index.max()) >= theta.shape[0]):
                raise ValueError(f"theta_index must lie in [0, {theta.shape[0]}).")
        elif theta.shape[0] not in (1, n):
            raise ValueError(f"theta must have 1 or {n} rows, got shape {tuple(theta.shape)}.")
    kernel = _numba_kernel() if backend != "torch" else None
    if backend == "numba" and kernel is None:
        raise ImportError("backend='numba' needs numba.")
    if kernel is not None and (backend == "numba" or mu.device.type == "cpu"):
        return _sample_numba(kernel, likelihood, mu, theta, theta_index, zi_logits, generator)
    if theta_index is not None:
        theta = theta[theta_index]
    rows, cols, values = _sample_torch(likelihood, mu, theta, zi_logits, generator)
    indptr = torch.zeros(mu.shape[0] + 1, dtype=torch.int64, device=mu.device)
    torch.cumsum(torch.bincount(rows, minlength=mu.shape[0]), 0, out=indptr[1:])
    return indptr, cols.to(torch.int32), values


def scaled_softmax_(logits: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
    """``library * softmax(logits, -1)``, computed in place in ``logits`` (which it returns).

    Parameters
    ----------
    logits
        ``(n, genes)`` scale logits; overwritten.
    library
        ``(n, 1)`` library sizes.
    """
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.mul_(library / logits.sum(dim=-1, keepdim=True))


def _sample_numba(kernel, likelihood, mu, theta, theta_index, zi_logits, generator):
    device = mu.device
    kind = {"poisson": kernel.POISSON, "nb": kernel.NB, "zinb": kernel.ZINB}
    n, g = mu.shape
    mu = mu.detach().cpu().float().contiguous()
    dummy = np.zeros((1, 1), np.float32)
    th_np, rows = dummy, np.zeros(n, np.int64)
    if likelihood != "poisson":
        th_np = theta.detach().cpu().float().contiguous().numpy()
        if theta_index is not None:
            rows = theta_index.detach().cpu().numpy()
        elif th_np.shape[0] == n and n > 1:
            rows = np.arange(n, dtype=np.int64)
    zl_np = dummy
    if likelihood == "zinb":
        zl_np = zi_logits.detach().cpu().float().contiguous().numpy()
    key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
    values = np.empty(n * g, np.int32)
    cols = np.empty(n * g, np.int32)
    row_nnz = np.empty(n, np.int64)
    kernel.sample_rows(mu.numpy(), th_np, rows, zl_np, kind[likelihood], key, values, cols, row_nnz)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    out_values = np.empty(indptr[-1], np.int32)
    out_cols = np.empty(indptr[-1], np.int32)
    kernel.compact(values, cols, row_nnz, indptr, out_values, out_cols)
    return tuple(torch.from_numpy(a).to(device) for a in (indptr, out_cols, out_values))


def _sample_torch(
    likelihood: str,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch sampler (any device): the non-zero entries in row-major order.

    Returns row and column (int64) and value (int32) of every non-zero entry.
    """
    u = torch.rand(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    # Step 1: P(0) >= 1 - mu. The small slack keeps float32 rounding on the safe side.
    cand = torch.nonzero((u + mu) >= (1.0 - 1e-5))
    rows, cols = cand[:, 0], cand[:, 1]
    u_c = u[rows, cols].double()
    mu_c = mu[rows, cols].double()
    th_c = None
    if likelihood == "poisson":
        p0 = torch.exp(-mu_c)
    else:
        th_c = theta.expand_as(mu)[rows, cols].double()
        p0 = torch.exp(-th_c * torch.log1p(mu_c / th_c))
    if likelihood == "zinb":
        pi = torch.sigmoid(zi_logits[rows, cols].double())
        keep = u_c >= pi + (1.0 - pi) * p0
        # Given x > 0, the ZINB is the NB conditioned on x > 0: rescale u onto the NB's CDF.
        u_c = (u_c - pi) / (1.0 - pi)
    else:
        keep = u_c >= p0
    # Step 2: entries that stay zero are dropped.
    rows, cols, u_c, mu_c, p0 = rows[keep], cols[keep], u_c[keep], mu_c[keep], p0[keep]
    th_c = th_c[keep] if th_c is not None else None
    values = torch.zeros(rows.shape[0], dtype=torch.float64, device=mu.device)
    # Step 3: x | x > 0.
    invert = p0 >= _REJECTION_BELOW
    idx = torch.nonzero(invert).squeeze(1)
    values[idx] = _invert(u_c[idx], mu_c[idx], th_c[idx] if th_c is not None else None, p0[idx])
    reject = torch.nonzero(~invert).squeeze(1)
    if reject.numel():
        values[reject] = _positive_draws(
            mu_c[reject], th_c[reject] if th_c is not None else None, generator
        )
    return rows, cols, values.clamp_max(_INT32_MAX).to(torch.int32)


def _invert(
    u: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor | None, p0: torch.Tensor
) -> torch.Tensor:
    """Continue the inverse transform from ``F(0) = p0``: ``min{k > 0 : F(k) > u}``.

    A few steps of the pmf recursion settle almost every entry; the (few) entries in the tail
    continue in blocks of the log-pmf that double in length, so heavy tails take only a
    logarithmic number of rounds.
    """
    out = torch.zeros_like(u)
    active = torch.arange(u.shape[0], device=u.device)
    pmf, cdf = p0, p0.clone()
    ratio = mu / (mu + theta) if theta is not None else mu
    for k in range(_INVERSION_STEPS):
        if active.numel() == 0:
            return out
        if theta is not None:  # NB: P(k+1) / P(k) = (k + theta) / (k + 1) * mu / (mu + theta)
            pmf = pmf * (k + theta) / (k + 1) * ratio
        else:  # Poisson: P(k+1) / P(k) = mu / (k + 1)
            pmf = pmf * ratio / (k + 1)
        cdf = cdf + pmf
        hit = u < cdf
        out[active[hit]] = k + 1
        miss = ~hit
        active, u, pmf, cdf = active[miss], u[miss], pmf[miss], cdf[miss]
        mu, ratio = mu[miss], ratio[miss]
        theta = theta[miss] if theta is not None else None
    start, block = _INVERSION_STEPS + 1, 64
    while active.numel():
        ks = torch.arange(start, start + block, device=u.device, dtype=u.dtype)
        if theta is not None:
            th = theta[:, None]
            log_pmf = (
                torch.lgamma(ks + th)
                - torch.lgamma(th)
                - torch.lgamma(ks + 1)
                - th * torch.log1p(mu[:, None] / th)
                + ks * torch.log(ratio[:, None])
            )
        else:
            log_pmf = ks * torch.log(mu[:, None]) - mu[:, None] - torch.lgamma(ks + 1)
        block_cdf = cdf[:, None] + torch.cumsum(torch.exp(log_pmf), dim=1)
        hit = u[:, None] < block_cdf
        found = hit.any(1)
        # Rounding can leave F(k) just below a u very close to 1: settle on the last k.
        stuck = ~found & (block_cdf[:, -1] <= cdf)
        first = torch.argmax(hit.to(torch.uint8), dim=1)
        out[active[found]] = ks[first[found]]
        out[active[stuck]] = start - 1
        miss = ~(found | stuck)
        active, u, mu, ratio = active[miss], u[miss], mu[miss], ratio[miss]
        cdf = block_cdf[miss, -1]
        theta = theta[miss] if theta is not None else None
        start, block = start + block, block * 2
    return out


def _positive_draws(
    mu: torch.Tensor, theta: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Independent draws of the Poisson / NB conditioned on ``x > 0`` (by rejection)."""
    out = torch.zeros_like(mu)
    active = torch.arange(mu.shape[0], device=mu.device)
    for _ in range(_MAX_REJECTION_ROUNDS):
        if active.numel() == 0:
            return out
        rate = mu
        if theta is not None:  # NB as a Gamma-Poisson mixture
            rate = torch._standard_gamma(theta, generator=generator) * (mu / theta)
        x = torch.poisson(rate, generator=generator)
        ok = x > 0
        out[active[ok]] = x[ok]
        miss = ~ok
        active, mu = active[miss], mu[miss]
        theta = theta[miss] if theta is not None else None
    raise RuntimeError("Count sampling did not finish; means too close to zero?")
