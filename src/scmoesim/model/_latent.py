"""What ``generate`` draws latent points from, summarised in the pass after training.

:class:`PosteriorSample` keeps a uniform sample of each expert's training cells (posterior
mean and standard deviation, library size, batch) for ``latent="posterior"``, the default;
:class:`LatentMoments` fits one Gaussian per expert for ``latent="fitted"``.

The paper generates cluster ``k`` from its prior, ``z ~ N(mu_k, I)``. The cells the model
actually put in cluster ``k`` occupy a region of the latent space that need not be centred on
``mu_k`` nor spread equally in every direction (on the Tabula Muris kidney model their RMS
distance to ``mu_k`` per dimension is 0.87-1.23, depending on the cluster). Generating
from that region, the cluster's aggregated posterior (the mixture of its cells' posteriors),
puts the generated cells where real cells of the cluster are; the sample follows its shape,
the Gaussian only its first two moments.

Both are streamed. The fit keeps, per expert, the number of cells, the sums of the posterior
means and of their outer products, and the sum of the posterior variances (a few
``n_latent^2`` numbers per expert, whatever the number of cells); the sample at most twice its
size between prunings.
"""

import numpy as np


class LatentMoments:
    """Running sums of the posterior moments of each expert's cells."""

    def __init__(self, n_experts: int, n_latent: int) -> None:
        self.n = np.zeros(n_experts, dtype=np.int64)
        self.sum_m = np.zeros((n_experts, n_latent))
        self.sum_mm = np.zeros((n_experts, n_latent, n_latent))
        self.sum_v = np.zeros((n_experts, n_latent))

    def add(self, expert: np.ndarray, qz_m: np.ndarray, qz_v: np.ndarray) -> None:
        """Add a minibatch: hard expert, posterior mean and variance of each cell."""
        qz_m, qz_v = qz_m.astype(np.float64), qz_v.astype(np.float64)
        for k in np.unique(expert):
            rows = expert == k
            m = qz_m[rows]
            self.n[k] += m.shape[0]
            self.sum_m[k] += m.sum(0)
            self.sum_mm[k] += m.T @ m
            self.sum_v[k] += qz_v[rows].sum(0)

    def fit(self, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and lower Cholesky factor of each expert's aggregated posterior.

        The covariance is that of a mixture of the cells' posteriors: the covariance of the
        posterior means plus the mean posterior variance (law of total variance). Its
        off-diagonal part is shrunk towards the diagonal by ``min(1, n_latent / n_cells)``,
        so an expert with no more cells than latent dimensions gets a diagonal one. Experts
        with fewer than two cells keep the prior, ``N(mu_k, I)``.

        Returns
        -------
        ``(K, n_latent)`` means and ``(K, n_latent, n_latent)`` lower Cholesky factors, float32.
        """
        n_experts, d = self.sum_m.shape
        loc = np.array(centres, dtype=np.float64, copy=True)
        scale_tril = np.tile(np.eye(d), (n_experts, 1, 1))
        for k in np.flatnonzero(self.n >= 2):
            n = self.n[k]
            mean = self.sum_m[k] / n
            cov = (self.sum_mm[k] - n * np.outer(mean, mean)) / (n - 1)
            cov = (cov + cov.T) / 2 + np.diag(self.sum_v[k] / n)
            shrink = min(1.0, d / n)
            cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov))
            loc[k] = mean
            scale_tril[k] = _cholesky(cov)
        return loc.astype(np.float32), scale_tril.astype(np.float32)


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor, with a growing jitter if rounding made ``cov`` indefinite."""
    jitter = 0.0
    scale = float(np.mean(np.diag(cov)))
    for _ in range(6):
        try:
            return np.linalg.cholesky(cov + jitter * np.eye(cov.shape[0]))
        except np.linalg.LinAlgError:
            jitter = max(jitter * 10, 1e-8 * scale)
    return np.diag(np.sqrt(np.clip(np.diag(cov), 1e-12, None)))


class PosteriorSample:
    """A uniform sample of up to ``per_expert`` training cells of each expert, streamed.

    For ``generate(latent="posterior")``: each generated cell starts from one of these cells
    (its posterior mean and standard deviation, library size and batch), so the generated
    cells follow the cluster's aggregated posterior, the mixture of its cells' posteriors,
    rather than one Gaussian fitted to it. The sample is the ``per_expert`` cells of each expert
    with the smallest random keys (sampling without replacement), pruned as the pass goes, so
    memory stays at a few times ``per_expert`` cells per expert whatever the number of cells.
    """

    def __init__(self, n_experts: int, per_expert: int = 2000, seed: int = 0) -> None:
        self.n_experts = n_experts
        self.per_expert = per_expert
        self._rng = np.random.default_rng(seed)
        self._parts: list[dict] = []
        self._buffered = 0

    def add(
        self,
        expert: np.ndarray,
        qz_m: np.ndarray,
        qz_v: np.ndarray,
        library: np.ndarray | None = None,
        batch: np.ndarray | None = None,
    ) -> None:
        """Add a minibatch: hard expert, posterior mean and variance, library and batch."""
        n = len(expert)
        part = {
            "key": self._rng.random(n),
            "expert": np.asarray(expert, dtype=np.int32),
            "loc": np.asarray(qz_m, dtype=np.float32),
            "scale": np.sqrt(np.asarray(qz_v, dtype=np.float32)),
            "batch": np.zeros(n, np.int32) if batch is None else np.asarray(batch, np.int32),
        }
        if library is not None:
            part["library"] = np.asarray(library, dtype=np.float32)
        self._parts.append(part)
        self._buffered += n
        if self._buffered > 2 * self.per_expert * self.n_experts:
            self._prune()

    def _prune(self) -> None:
        merged = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
        order = np.lexsort((merged["key"], merged["expert"]))
        expert = merged["expert"][order]
        rank = np.arange(len(order)) - np.searchsorted(expert, expert)  # rank within expert
        keep = np.sort(order[rank < self.per_expert])
        self._parts = [{k: v[keep] for k, v in merged.items()}]
        self._buffered = len(keep)

    def result(self) -> dict[str, np.ndarray] | None:
        """The kept cells' ``expert``, ``batch``, ``loc``, ``scale`` (and ``library``)."""
        if not self._parts:
            return None
        self._prune()
        out = dict(self._parts[0])
        del out["key"]
        return out
