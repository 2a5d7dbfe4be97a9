"""Generation of new cells by the experts of a trained :class:`MoESim`."""

import numbers
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import anndata
import h5py
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse

from scmoesim import _constants as K
from scmoesim._memory import release_freed_memory

#: Freed chunk buffers go back to the OS after this many generated cells. After every chunk,
#: the next chunk's buffers page-faulted afresh (1M kidney cells, 2 threads: 12,800 cells/s
#: against 15,400, at the same peak memory); without it an earlier version's heap grew to
#: 3.5 GB over 1M cells (benchmarks/results_generation.md).
_RELEASE_EVERY_CELLS = 16_384


class GenerateMixin:
    """``generate``: z drawn around cluster k, decoded by expert k, no rejection sampling."""

    def generate(
        self,
        n_cells: int | Mapping[str, int] = 1000,
        clusters: Sequence[str] | None = None,
        *,
        proportions: Literal["training", "uniform"] | Mapping[str, float] = "training",
        temperature: float = 1.0,
        latent: Literal["posterior", "fitted", "prior"] = "posterior",
        batch: str | None = None,
        seed: int | None = 0,
        store_mean: bool | None = None,
        filename: str | Path | None = None,
        chunk_size: int = 2048,
        progress_bar: bool = False,
    ) -> AnnData:
        """Generate new cells of chosen clusters.

        For each requested cell of cluster ``k``: a latent point ``z`` drawn around the cluster
        (see ``latent``), decoded by expert ``k``; for count likelihoods the library size is
        drawn from the real training cells of that cluster (and batch), and counts are sampled
        exactly from the likelihood.

        Parameters
        ----------
        n_cells
            Total number of cells, split over the clusters by ``proportions``; or
            ``{cluster: n}`` for exact numbers per cluster.
        clusters
            Cluster names (see ``model.cluster_names_``) to generate, or one name; ``None``:
            every cluster that holds training cells (or the clusters named in ``proportions``).
        proportions
            How an integer ``n_cells`` is split: ``"training"`` (default) in the proportions of
            the training cells per cluster, ``"uniform"`` equally, or ``{cluster: weight}``
            (weights are normalised; give no ``clusters`` then). Rounded so that the numbers
            add up to ``n_cells`` exactly.
        temperature
            Scale of the latent noise (1 = the distribution chosen by ``latent``; 0 = none:
            the chosen training cells' posterior means with ``"posterior"``, the cluster centre
            with ``"fitted"`` and ``"prior"``; the counts are still sampled). Draws closer to
            the centre are not always more typical: on ``pbmc68k_reduced`` (``normal``) they
            are classified back more often (tutorial "Generation"), on the Tabula Muris kidney
            counts (``nb``) less often (``latent="fitted"``, model gate: 0.96 at 1, 0.92 at 0.5,
            0.54 at 0; ``benchmarks/results_generation.md``).
        latent
            Where ``z`` comes from. ``"posterior"`` (default): the cluster's aggregated
            posterior, the mixture of its training cells' posteriors. Each generated cell picks
            a training cell of the cluster at random (from a uniform sample of up to 2,000 per
            expert, kept with the model) and draws ``z ~ N(m_i, temperature^2 diag(s_i^2))``
            from that cell's posterior; count likelihoods take that cell's library size, and
            without ``batch`` its batch. ``"fitted"``: ``N(m_k, temperature^2 S_k)``, one
            Gaussian fitted to those posteriors (mean ``m_k``; covariance ``S_k`` = covariance
            of the posterior means + their mean posterior variance, shrunk towards its
            diagonal by ``n_latent / n_cells``). ``"prior"``: the paper's
            ``N(mu_k, temperature^2 I)`` around the EM centre ``mu_k``. On the Tabula Muris
            kidney model the generated cells are closest to the real ones of their cluster with
            ``"posterior"`` (MMD^2 below that to the nearest other cluster for 6 of 6 clusters,
            against 3-4 with ``"fitted"`` and ``"prior"``; three generation seeds) and land in
            their cluster as often or more (``benchmarks/results_generation.md``).
        batch
            Batch category to decode with (if a ``batch_key`` was registered); library sizes
            then come from that batch's cells of the cluster. ``None`` draws batches in each
            cluster's training proportions.
        seed
            Seed of the generation (``None``: not reproducible). Does not touch global RNGs.
            The same seed, ``chunk_size`` and device give the same cells.
        store_mean
            Store the expected values in ``layers["mean"]`` (dense, ``4 * n_cells * n_genes``
            bytes). Default: ``True`` in memory, ``False`` with ``filename``.
        filename
            Write the cells chunk by chunk to this ``.h5ad`` file (must not exist yet) and
            return it opened in backed mode: ``X`` stays on disk, so memory stays that of one
            chunk. (anndata reads ``layers`` into memory even in backed mode: leave
            ``store_mean`` off for large files.)
        chunk_size
            Cells decoded and sampled at once; bounds the working memory (about
            ``32 * chunk_size * n_genes`` bytes).
        progress_bar
            Show a progress bar (on stderr).

        Returns
        -------
        AnnData with the model's ``var``, cells grouped by cluster. ``X``: sampled counts as
        CSR ``int32`` for count likelihoods (``nb``, ``zinb``, ``poisson``), ``float32`` draws
        for ``normal``, probabilities for ``bernoulli`` (the model's data are in [0, 1]).
        ``layers["mean"]``: expected values (see ``store_mean``). ``obs["moesim_cluster"]``,
        ``obs["moesim_expert"]``, ``obs["batch"]`` (with a batch covariate) and
        ``obs["library_size"]`` (count likelihoods: the drawn library size).
        ``uns["moesim_generate"]`` records how it was made: ``clusters`` and ``n_cells`` per
        cluster (in the order of the cells), ``proportions`` (``"training"``, ``"uniform"``,
        ``"given"`` for weights, ``"n_cells"`` for exact numbers), ``temperature``, ``latent``,
        ``batch`` (the chosen batch, ``"drawn"``, or ``"none"`` without a batch covariate),
        ``seed`` (-1 for none), ``chunk_size``, ``likelihood``.

        Examples
        --------
        >>> model.generate(500, clusters=["B cell"])
        >>> model.generate({"B cell": 100, "NK cell": 50}, temperature=0.5)
        >>> model.generate(1000, proportions={"B cell": 0.2, "NK cell": 0.8})
        >>> model.generate(1_000_000, filename="generated.h5ad", progress_bar=True)
        """
        if not self.is_trained_:
            raise RuntimeError("Train the model (model.train()) before generating cells.")
        per_cluster, per_expert = self._cells_per_expert(n_cells, clusters, proportions)
        if isinstance(temperature, bool) or not (
            isinstance(temperature, numbers.Real) and np.isfinite(temperature) and temperature >= 0
        ):
            raise ValueError(f"temperature must be a non-negative number, got {temperature!r}.")
        loc, scale_tril, cells = self._latent_distribution(latent)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        if filename is not None:
            filename = Path(filename)
            if filename.suffix != ".h5ad":
                raise ValueError(f"filename must end in .h5ad, got {str(filename)!r}.")
            if filename.exists():
                raise FileExistsError(f"{filename} exists; remove it or choose another name.")
            if not filename.parent.is_dir():
                raise FileNotFoundError(f"The folder of {filename} does not exist.")
        if store_mean is None:
            store_mean = filename is None

        rng = np.random.default_rng(seed)
        # grouped by cluster (merged clusters: their experts one after the other), in the
        # order of each cluster's first expert
        order = np.argsort(self._first_expert_of_cluster(), kind="stable")
        experts = np.repeat(order, per_expert[order])
        batches = self._draw_batches(experts, batch, rng)
        libraries = self._draw_libraries(experts, batches, rng)
        starts = None
        if cells is not None:
            starts, libraries = self._draw_starts(cells, experts, batches, libraries, rng)
        module = self.module
        module.eval()
        device = self.device
        generator = torch.Generator(device=device)
        generator.manual_seed(int(rng.integers(2**63 - 1)))
        if loc is not None:
            loc = torch.as_tensor(loc, device=device)
            scale_tril = torch.as_tensor(scale_tril, device=device)

        obs = self._generated_obs(experts, batches, libraries)
        names = np.asarray(self.cluster_names_, dtype=object)
        batches_known = self._batch_categories() is not None
        made = [str(c) for c in dict.fromkeys(names[order]) if per_cluster.get(str(c), 0) > 0]
        record = {
            "clusters": made,
            "n_cells": np.array([per_cluster[c] for c in made], dtype=np.int64),
            # "n_cells": exact numbers per cluster; "given": weights per cluster
            "proportions": (
                "n_cells"
                if isinstance(n_cells, Mapping)
                else proportions
                if isinstance(proportions, str)
                else "given"
            ),
            "temperature": float(temperature),
            "latent": _used_latent(cells, loc),
            # "drawn": from each cluster's cells per batch; "none": no batch covariate
            "batch": str(batch) if batch is not None else "drawn" if batches_known else "none",
            "seed": -1 if seed is None else int(seed),
            "chunk_size": int(chunk_size),
            "likelihood": module.likelihood,
        }
        n_obs, n_var = len(experts), self.adata.n_vars
        kind = "counts" if module.is_count else "dense"
        writer = (
            _H5adWriter(filename, obs, self.adata.var.copy(), record, kind, store_mean)
            if filename is not None
            else _MemoryWriter(obs, self.adata.var.copy(), record, kind, store_mean)
        )
        bar = None
        if progress_bar and n_obs > 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_obs, desc="generating", unit="cell", unit_scale=True)
        since_release = 0
        try:
            with torch.inference_mode():
                for start in range(0, n_obs, chunk_size):
                    sl = slice(start, min(start + chunk_size, n_obs))
                    lib = (
                        torch.as_tensor(libraries[sl], device=device, dtype=torch.float32)[:, None]
                        if libraries is not None
                        else None
                    )
                    z = None
                    if starts is not None:
                        z = _posterior_draw(cells, starts[sl], temperature, generator, device)
                    out = module.sample_from_experts(
                        torch.as_tensor(experts[sl], device=device),
                        lib,
                        torch.as_tensor(batches[sl], device=device)[:, None],
                        float(temperature),
                        generator=generator,
                        with_mean=store_mean,
                        loc=loc,
                        scale_tril=scale_tril,
                        z=z,
                    )
                    writer.add(_chunk_to_numpy(out, sl.stop - sl.start, n_var, kind, store_mean))
                    del out
                    since_release += sl.stop - sl.start
                    if since_release >= _RELEASE_EVERY_CELLS:
                        release_freed_memory()
                        since_release = 0
                    if bar is not None:
                        bar.update(sl.stop - sl.start)
            result = writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        return result

    # ------------------------------------------------------------------ helpers
    def _latent_distribution(
        self, latent
    ) -> tuple[np.ndarray | None, np.ndarray | None, dict | None]:
        """Per-expert means and Cholesky factors, and the kept training cells, for ``latent``.

        ``(None, None, cells)``: the posteriors of the kept cells; ``(loc, scale_tril, None)``:
        the fitted Gaussians; ``(None, None, None)``: the prior.
        """
        if not isinstance(latent, str) or latent not in ("fitted", "posterior", "prior"):
            raise ValueError(f"latent must be 'fitted', 'posterior' or 'prior', got {latent!r}.")
        if latent == "prior":
            return None, None, None
        if latent == "posterior":
            cells = getattr(self, "latent_cells_", None)
            if cells is not None:
                return None, None, cells
            warnings.warn(
                "This model holds no sample of its training cells' posteriors (it was saved by "
                "an earlier scmoesim, before generate() had latent='posterior'); generating "
                "from the fitted Gaussians instead. Pass latent='fitted' to silence this warning.",
                UserWarning,
                stacklevel=3,
            )
        loc = getattr(self, "latent_loc_", None)
        if loc is None:
            warnings.warn(
                "This model holds no fitted latent distributions (it was saved by an earlier "
                "scmoesim, before generate() had latent='fitted'); generating from the prior "
                "N(mu_k, I) instead. Pass latent='prior' to silence this warning.",
                UserWarning,
                stacklevel=3,
            )
            return None, None, None
        return loc, self.latent_scale_tril_, None

    def _draw_starts(
        self, cells: dict, experts: np.ndarray, batches: np.ndarray, libraries, rng
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A kept training cell for every generated cell, and the libraries to use.

        The cell comes from the same expert and batch when the sample holds one (its library
        size replaces the drawn one), else from the same expert in any batch (the library drawn
        for the requested batch stays).
        """
        starts = np.empty(len(experts), dtype=np.int64)
        same_batch = np.zeros(len(experts), dtype=bool)
        names = np.asarray(self.cluster_names_, dtype=object)
        for k in np.unique(experts):
            of_k = np.flatnonzero(cells["expert"] == k)
            if len(of_k) == 0:
                raise ValueError(
                    f"Cluster {names[k]!r} (expert {k}) kept no training cells to draw latent "
                    "points from; use latent='fitted' or 'prior' for it."
                )
            for b in np.unique(batches[experts == k]):
                rows = np.flatnonzero((experts == k) & (batches == b))
                pool = of_k[cells["batch"][of_k] == b]
                same_batch[rows] = len(pool) > 0
                pool = pool if len(pool) else of_k
                starts[rows] = pool[rng.integers(len(pool), size=len(rows))]
        if libraries is not None and "library" in cells:
            libraries = np.where(same_batch, cells["library"][starts], libraries)
        return starts, libraries

    def _batch_categories(self) -> np.ndarray | None:
        setup = self.adata_manager.registry["setup_args"]
        if setup.get("batch_key") is None:
            return None
        mapping = self.adata_manager.get_state_registry(K.BATCH_KEY).categorical_mapping
        return np.asarray(mapping, dtype=object)

    def _generated_obs(
        self, experts: np.ndarray, batches: np.ndarray, libraries: np.ndarray | None
    ) -> pd.DataFrame:
        names = np.asarray(self.cluster_names_, dtype=object)
        index = pd.Index("generated_" + pd.RangeIndex(len(experts)).astype(str))
        obs = pd.DataFrame(
            {
                K.CLUSTER_KEY: pd.Categorical(names[experts], categories=self._category_order()),
                K.EXPERT_KEY: experts.astype(np.int64),
            },
            index=index,
        )
        batch_names = self._batch_categories()
        if batch_names is not None:
            obs["batch"] = pd.Categorical(batch_names[batches], categories=batch_names)
        if libraries is not None:
            obs["library_size"] = libraries.astype(np.float32)
        return obs

    def _cells_per_expert(
        self,
        n_cells: int | Mapping[str, int],
        clusters: Sequence[str] | None,
        proportions: str | Mapping[str, float] = "training",
    ) -> tuple[dict[str, int], np.ndarray]:
        """Cells per cluster name and per expert (a merged cluster split over its experts)."""
        per_cluster, experts, usage = self._cells_per_cluster(n_cells, clusters, proportions)
        per_expert = np.zeros(len(experts), dtype=np.int64)
        for name, n in per_cluster.items():
            members = np.flatnonzero(experts == name)
            # merged clusters (merge_clusters): split over their experts by training cells
            weights = usage[members] if usage[members].sum() > 0 else np.ones(len(members))
            per_expert[members] = _largest_remainder(n, weights)
        return per_cluster, per_expert

    def _cells_per_cluster(
        self,
        n_cells: int | Mapping[str, int],
        clusters: Sequence[str] | None,
        proportions: str | Mapping[str, float],
    ) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
        """Cells per cluster name; also each expert's cluster name and training cells."""
        experts = np.asarray(self.cluster_names_, dtype=object)
        names = list(dict.fromkeys(experts))
        index = {n: k for k, n in enumerate(names)}
        usage = np.asarray(getattr(self, "expert_usage_", np.ones(len(experts))), dtype=float)
        cluster_usage = np.array([usage[experts == n].sum() for n in names])
        given = isinstance(proportions, Mapping)
        if not given and proportions not in ("training", "uniform"):
            raise ValueError(
                "proportions must be 'training', 'uniform' or {cluster: weight}, got "
                f"{proportions!r}."
            )
        if isinstance(n_cells, Mapping):
            if clusters is not None or given:
                raise ValueError(
                    "n_cells as {cluster: n} already fixes every cluster's number; give no "
                    "clusters or proportions with it."
                )
            _check_cluster_names(n_cells.keys(), index)
            counts = {str(name): _check_count(n) for name, n in n_cells.items()}
            return counts, experts, usage
        total = _check_count(n_cells)
        if given:
            if clusters is not None:
                raise ValueError("Give either clusters or proportions as {cluster: weight}.")
            _check_cluster_names(proportions.keys(), index)
            chosen = [str(c) for c in proportions]
            weights = np.array([_check_weight(w) for w in proportions.values()], dtype=float)
            if len(weights) == 0 or weights.sum() <= 0:
                raise ValueError("proportions must contain at least one positive weight.")
        else:
            if clusters is None:
                chosen = [n for n in names if cluster_usage[index[n]] > 0]
            else:
                if isinstance(clusters, Mapping):
                    raise TypeError(
                        "clusters takes cluster names; give {cluster: n} as n_cells, or "
                        "{cluster: weight} as proportions."
                    )
                if np.isscalar(clusters):  # one name, given bare
                    clusters = [clusters]
                _check_cluster_names(clusters, index)
                chosen = list(dict.fromkeys(str(c) for c in clusters))
                if not chosen:
                    raise ValueError("clusters is empty; give at least one cluster name.")
            weights = cluster_usage[[index[c] for c in chosen]]
            if proportions == "uniform" or weights.sum() <= 0:
                weights = np.ones(len(chosen))
        counts = _largest_remainder(total, weights)
        return dict(zip(chosen, counts.tolist(), strict=True)), experts, usage

    def _draw_batches(self, experts: np.ndarray, batch, rng) -> np.ndarray:
        counts = np.asarray(self.expert_batch_counts_, dtype=float)
        names = self._batch_categories()
        if batch is not None:
            if names is None:
                raise ValueError("batch was given but no batch_key was registered.")
            matches = np.flatnonzero(names.astype(str) == str(batch))
            if len(matches) == 0:
                raise ValueError(f"Unknown batch {batch!r}; known: {names.tolist()}.")
            return np.full(len(experts), matches[0], dtype=np.int64)
        out = np.zeros(len(experts), dtype=np.int64)
        for k in np.unique(experts):
            sel = experts == k
            w = counts[k] if counts[k].sum() > 0 else counts.sum(0)
            out[sel] = rng.choice(len(w), size=sel.sum(), p=w / w.sum())
        return out

    def _draw_libraries(self, experts, batches, rng) -> np.ndarray | None:
        quantiles = getattr(self, "library_quantiles_", None)
        if quantiles is None:
            return None
        n_q = quantiles.shape[-1]
        u = rng.uniform(0, n_q - 1, size=len(experts))
        lo = np.floor(u).astype(np.int64)
        frac = u - lo
        hi = np.minimum(lo + 1, n_q - 1)
        # Index the (expert, batch) slots entry by entry: O(n) memory, never (n, n_q).
        slot = np.where(np.isnan(quantiles[experts, batches, 0]), quantiles.shape[1] - 1, batches)
        log_lib = quantiles[experts, slot, lo] * (1 - frac) + quantiles[experts, slot, hi] * frac
        return np.exp(log_lib)


def _used_latent(cells, loc) -> str:
    """The latent distribution ``generate`` used (after any fallback for an older model)."""
    if cells is not None:
        return "posterior"
    return "fitted" if loc is not None else "prior"


def _posterior_draw(
    cells: dict, starts: np.ndarray, temperature: float, generator, device
) -> torch.Tensor:
    """``z ~ N(m_i, temperature^2 diag(s_i^2))`` for the kept training cells ``starts``."""
    loc = torch.as_tensor(cells["loc"][starts], device=device)
    scale = torch.as_tensor(cells["scale"][starts], device=device)
    noise = torch.randn(loc.shape, device=device, generator=generator)
    return loc + temperature * scale * noise


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"Numbers of cells must be non-negative integers, got {n!r}.")
    return int(n)


def _check_weight(w) -> float:
    if isinstance(w, bool) or not isinstance(w, int | float | np.number) or not w >= 0:
        raise ValueError(f"Proportions must be non-negative numbers, got {w!r}.")
    if not np.isfinite(w):
        raise ValueError(f"Proportions must be finite, got {w!r}.")
    return float(w)


def _check_cluster_names(requested, index: dict) -> None:
    unknown = [c for c in requested if str(c) not in index]
    if unknown:
        raise ValueError(f"Unknown cluster(s) {unknown}; the model's clusters: {list(index)}.")


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (sum exactly ``total``)."""
    share = total * weights / weights.sum()
    base = np.floor(share).astype(np.int64)
    rest = total - base.sum()
    base[np.argsort(-(share - base), kind="stable")[:rest]] += 1
    return base


def _chunk_to_numpy(out: dict, n: int, n_var: int, kind: str, store_mean: bool) -> dict:
    """One generated chunk as numpy: CSR parts (counts) or a dense sample, and the mean."""
    chunk = {"mean": out["mean"].float().cpu().numpy() if store_mean else None}
    if kind == "counts":
        chunk["indptr"] = out["indptr"].cpu().numpy()
        chunk["indices"] = out["cols"].cpu().numpy()
        chunk["data"] = out["values"].cpu().numpy()
    else:
        chunk["sample"] = out["sample"].float().cpu().numpy()
    return chunk


class _MemoryWriter:
    """Collects generated chunks into an in-memory AnnData.

    Dense outputs are preallocated; the CSR parts are joined once at the end, chunk by chunk,
    so the peak memory is the result plus one chunk.
    """

    def __init__(self, obs, var, record, kind, store_mean):
        self.obs, self.var, self.record, self.kind = obs, var, record, kind
        n, g = len(obs), len(var)
        self.pos = 0
        self.parts: list[dict] = []
        self.mean = np.empty((n, g), np.float32) if store_mean else None
        self.sample = np.empty((n, g), np.float32) if kind == "dense" else None

    def add(self, chunk: dict) -> None:
        """Store one chunk."""
        if self.kind == "dense":
            sl = slice(self.pos, self.pos + chunk["sample"].shape[0])
            self.sample[sl] = chunk["sample"]
        else:
            sl = slice(self.pos, self.pos + chunk["indptr"].shape[0] - 1)
            self.parts.append({k: chunk[k] for k in ("indptr", "indices", "data")})
        if self.mean is not None:
            self.mean[sl] = chunk["mean"]
        self.pos = sl.stop

    def finish(self) -> AnnData:
        """The generated AnnData."""
        if self.kind == "dense":
            x = self.sample
        else:
            x = _join_csr(self.parts, len(self.obs), len(self.var))
        out = AnnData(X=x, obs=self.obs, var=self.var)
        if self.mean is not None:
            out.layers["mean"] = self.mean
        out.uns["moesim_generate"] = self.record
        return out

    def abort(self) -> None:
        """Nothing to clean up in memory."""


def _join_csr(parts: list[dict], n: int, g: int) -> sparse.csr_matrix:
    nnz = sum(p["data"].shape[0] for p in parts)
    index_dtype = np.int32 if nnz < 2**31 else np.int64
    data = np.empty(nnz, np.int32)
    indices = np.empty(nnz, index_dtype)
    indptr = np.zeros(n + 1, index_dtype)
    row = nz = 0
    while parts:
        p = parts.pop(0)  # free each chunk as soon as it is copied
        k = p["data"].shape[0]
        data[nz : nz + k] = p["data"]
        indices[nz : nz + k] = p["indices"]
        rows = p["indptr"].shape[0] - 1
        indptr[row + 1 : row + rows + 1] = p["indptr"][1:] + nz
        row, nz = row + rows, nz + k
    return sparse.csr_matrix((data, indices, indptr), shape=(n, g))


class _H5adWriter:
    """Writes generated chunks straight into an ``.h5ad`` file (memory: one chunk)."""

    def __init__(self, filename: Path, obs, var, record, kind, store_mean):
        self.filename, self.kind = filename, kind
        n, g = len(obs), len(var)
        self.file = None
        try:
            skeleton = AnnData(obs=obs, var=var)
            skeleton.uns["moesim_generate"] = record
            skeleton.write_h5ad(filename)
            self.file = h5py.File(filename, "a")
            self.pos = 0
            self.n, self.g = n, g
            self.x = None
            rows = max(1, min(n, 1024))
            if kind == "dense":
                self.x = _dense_dataset(self.file, "X", (n, g), rows)
            elif n == 0:
                anndata.io.write_elem(self.file, "X", sparse.csr_matrix((0, g), dtype=np.int32))
            self.mean = (
                _dense_dataset(self.file["layers"], "mean", (n, g), rows) if store_mean else None
            )
        except BaseException:
            self.abort()
            raise

    def add(self, chunk: dict) -> None:
        """Append one chunk to the file."""
        if self.kind == "dense":
            rows = chunk["sample"].shape[0]
            self.x[self.pos : self.pos + rows] = chunk["sample"]
        else:
            rows = chunk["indptr"].shape[0] - 1
            m = sparse.csr_matrix(
                (chunk["data"], chunk["indices"], chunk["indptr"]), shape=(rows, self.g)
            )
            if self.pos == 0:
                m.indptr = m.indptr.astype(np.int64)  # room for any number of non-zeros
                anndata.io.write_elem(self.file, "X", m)
            else:
                anndata.io.sparse_dataset(self.file["X"]).append(m)
        if self.mean is not None:
            self.mean[self.pos : self.pos + rows] = chunk["mean"]
        self.pos += rows

    def finish(self) -> AnnData:
        """Close the file and open it in backed mode."""
        self.file.close()
        return anndata.read_h5ad(self.filename, backed="r")

    def abort(self) -> None:
        """Close and remove the partly written file."""
        if self.file is not None:
            self.file.close()
        self.filename.unlink(missing_ok=True)


def _dense_dataset(group, name: str, shape: tuple[int, int], rows: int):
    """An anndata-readable dense float32 array, filled chunk by chunk."""
    # h5py refuses chunks larger than the data: an empty array (no cells, or no genes) is
    # stored contiguous
    chunks = (rows, shape[1]) if min(shape) > 0 else None
    ds = group.create_dataset(name, shape=shape, dtype=np.float32, chunks=chunks)
    ds.attrs["encoding-type"] = "array"
    ds.attrs["encoding-version"] = "0.2.0"
    return ds
