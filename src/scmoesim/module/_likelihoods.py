"""Observation models of the experts: which heads they need and the distribution they define."""

import torch
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from scvi.distributions._negative_binomial import log_zinb_positive
from torch.distributions import Bernoulli, Distribution, Normal, Poisson

from scmoesim._constants import COUNT_LIKELIHOODS


def expert_heads(likelihood: str, n_genes: int) -> dict[str, int]:
    """Output heads every expert needs for ``likelihood``."""
    if likelihood in COUNT_LIKELIHOODS:
        heads = {"scale": n_genes}
        if likelihood == "zinb":
            heads["dropout"] = n_genes
        return heads
    if likelihood in ("normal", "bernoulli"):
        return {"loc": n_genes}
    raise ValueError(f"Unknown likelihood {likelihood!r}.")


def make_distribution(
    likelihood: str,
    heads: dict[str, torch.Tensor],
    library: torch.Tensor | None,
    dispersion: torch.Tensor | None,
) -> Distribution:
    """The per-cell, per-gene distribution of the data given the expert outputs.

    Parameters
    ----------
    likelihood
        ``"nb"``, ``"zinb"``, ``"poisson"``, ``"normal"`` or ``"bernoulli"``.
    heads
        Expert outputs from :class:`~scmoesim.nn.RoutedExperts`.
    library
        ``(n, 1)`` library sizes (count likelihoods).
    dispersion
        NB inverse dispersion ``theta`` (count likelihoods with NB) or the Gaussian standard
        deviation (``normal``), broadcastable to ``(n, genes)``.

    Notes
    -----
    Argument validation is off: it reads tensor values on the host (a device sync in every
    training step), and the data are checked once by ``setup_anndata`` / the model instead.
    """
    if likelihood in COUNT_LIKELIHOODS:
        scale = torch.softmax(heads["scale"], dim=-1)
        rate = library * scale
        if likelihood == "poisson":
            return Poisson(rate.clamp_min(1e-8), validate_args=False)
        if likelihood == "nb":
            return NegativeBinomial(mu=rate, theta=dispersion, scale=scale, validate_args=False)
        return ZeroInflatedNegativeBinomial(
            mu=rate,
            theta=dispersion,
            zi_logits=heads["dropout"],
            scale=scale,
            validate_args=False,
        )
    if likelihood == "normal":
        return Normal(heads["loc"], dispersion.expand_as(heads["loc"]), validate_args=False)
    if likelihood == "bernoulli":
        return Bernoulli(logits=heads["loc"], validate_args=False)
    raise ValueError(f"Unknown likelihood {likelihood!r}.")


def reconstruction_nll(likelihood: str, dist: Distribution, x: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``x`` summed over genes, per cell.

    For ``bernoulli`` this is the full binary cross-entropy on data scaled to [0, 1] (the paper's
    Eq. 4 shows only its ``x log x'`` half).
    """
    if likelihood == "bernoulli":
        logits = dist.logits
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x, reduction="none"
        ).sum(-1)
    if isinstance(dist, ZeroInflatedNegativeBinomial):
        # scvi-tools' ZINB.log_prob validates its argument unconditionally (a host sync)
        return -log_zinb_positive(x, dist.mu, dist.theta, dist.zi_logits, eps=1e-8).sum(-1)
    return -dist.log_prob(x).sum(-1)
