"""Generation of new cells by the experts of a trained :class:`MoESim`."""

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse

from scmoesim import _constants as K


class GenerateMixin:
    """``generate``: z ~ N(mu_k, I) decoded by expert k, no rejection sampling."""

    def generate(
        self,
        n_cells: int | Mapping[str, int] = 1000,
        clusters: Sequence[str] | None = None,
        *,
        temperature: float = 1.0,
        batch: str | None = None,
        seed: int | None = 0,
        chunk_size: int = 10_000,
        progress_bar: bool = False,
    ) -> AnnData:
        """Generate new cells of chosen clusters.

        For each requested cell of cluster ``k``: ``z ~ N(mu_k, temperature^2 I)``, decoded by
        expert ``k``; for count likelihoods the library size is drawn from the real training
        cells of that cluster (and batch), and counts are sampled from the likelihood.

        Parameters
        ----------
        n_cells
            Total number of cells, split over ``clusters`` in the proportions of the training
            data; or ``{cluster: n}`` for exact numbers per cluster.
        clusters
            Cluster names (see ``model.cluster_names_``); ``None``: every cluster that holds
            training cells.
        temperature
            Scale of the latent noise around the cluster centre (1 = the model's prior).
        batch
            Batch category to decode with (if a ``batch_key`` was registered); ``None`` draws
            batches in each cluster's training proportions.
        seed
            Seed of the generation (``None``: not reproducible). Does not touch global RNGs.
        chunk_size
            Cells generated per chunk (bounds the memory of the decoder pass).
        progress_bar
            Show a progress bar over the chunks (on stderr).

        Returns
        -------
        AnnData with the model's ``var``; ``X`` holds sampled values (integer counts, CSR, for
        count likelihoods; probabilities for ``bernoulli``), ``layers["mean"]`` the expected
        values, ``obs["moesim_cluster"]`` and ``obs["moesim_expert"]`` (and ``obs["batch"]``
        with a batch covariate); ``uns["moesim_generate"]`` records the settings
        (``clusters`` and ``n_cells`` per cluster, ``temperature``, ``seed``, ``likelihood``).
        """
        self._check_if_trained(warn=True)
        per_expert = self._cells_per_expert(n_cells, clusters)
        if temperature < 0 or not np.isfinite(temperature):
            raise ValueError(f"temperature must be a non-negative number, got {temperature!r}.")
        rng = np.random.default_rng(seed)
        experts = np.repeat(np.arange(len(per_expert)), per_expert)
        batches = self._draw_batches(experts, batch, rng)
        libraries = self._draw_libraries(experts, batches, rng)

        module = self.module
        module.eval()
        device = self.device
        samples, means = [], []
        gen = torch.random.fork_rng(devices=[] if device.type == "cpu" else [device])
        with gen, torch.inference_mode():
            torch.manual_seed(
                int(rng.integers(2**31 - 1)) if seed is not None else torch.seed() % (2**31)
            )
            starts = range(0, len(experts), chunk_size)
            if progress_bar and len(experts) > 0:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="generating", unit="chunk", total=len(starts))
            for start in starts:
                sl = slice(start, start + chunk_size)
                e = torch.as_tensor(experts[sl], device=device)
                b = torch.as_tensor(batches[sl], device=device)[:, None]
                lib = (
                    torch.as_tensor(libraries[sl], device=device, dtype=torch.float32)[:, None]
                    if libraries is not None
                    else None
                )
                sample, mean = module.sample_from_experts(e, lib, b, temperature)
                means.append(mean.cpu().numpy().astype(np.float32))
                if module.is_count:
                    samples.append(sparse.csr_matrix(sample.cpu().numpy().astype(np.int32)))
                else:
                    samples.append(sample.cpu().numpy().astype(np.float32))
        n_var = self.adata.n_vars
        if module.is_count:
            x = (
                sparse.vstack(samples, format="csr")
                if samples
                else sparse.csr_matrix((0, n_var), dtype=np.int32)
            )
        else:
            x = np.concatenate(samples) if samples else np.zeros((0, n_var), np.float32)
        mean = np.concatenate(means) if means else np.zeros((0, n_var), np.float32)

        names = np.asarray(self.cluster_names_, dtype=object)
        obs = pd.DataFrame(
            {
                K.CLUSTER_KEY: pd.Categorical(
                    names[experts], categories=[c for c in self._category_order()]
                ),
                K.EXPERT_KEY: experts.astype(np.int64),
            },
            index=[f"generated_{i}" for i in range(len(experts))],
        )
        batch_names = self._batch_categories()
        if batch_names is not None:
            obs["batch"] = pd.Categorical(batch_names[batches], categories=batch_names)
        out = AnnData(X=x, obs=obs, var=self.adata.var.copy())
        out.layers["mean"] = mean
        out.uns["moesim_generate"] = {
            "clusters": [str(names[k]) for k in np.flatnonzero(per_expert)],
            "n_cells": per_expert[per_expert > 0].astype(np.int64),
            "temperature": float(temperature),
            "seed": seed,
            "likelihood": module.likelihood,
        }
        return out

    # ------------------------------------------------------------------ helpers
    def _batch_categories(self) -> np.ndarray | None:
        setup = self.adata_manager.registry["setup_args"]
        if setup.get("batch_key") is None:
            return None
        mapping = self.adata_manager.get_state_registry(K.BATCH_KEY).categorical_mapping
        return np.asarray(mapping, dtype=object)

    def _cells_per_expert(
        self, n_cells: int | Mapping[str, int], clusters: Sequence[str] | None
    ) -> np.ndarray:
        names = list(self.cluster_names_)
        index = {n: k for k, n in enumerate(names)}
        per_expert = np.zeros(len(names), dtype=np.int64)
        usage = np.asarray(getattr(self, "expert_usage_", np.ones(len(names))), dtype=float)
        if isinstance(n_cells, Mapping):
            if clusters is not None:
                raise ValueError("Give either n_cells as {cluster: n} or clusters, not both.")
            _check_cluster_names(n_cells.keys(), index)
            for name, n in n_cells.items():
                per_expert[index[str(name)]] = _check_count(n)
            return per_expert
        total = _check_count(n_cells)
        if clusters is None:
            chosen = [k for k in range(len(names)) if usage[k] > 0]
        else:
            if isinstance(clusters, str):
                clusters = [clusters]
            _check_cluster_names(clusters, index)
            chosen = list(dict.fromkeys(index[str(c)] for c in clusters))
        weights = usage[chosen] if usage[chosen].sum() > 0 else np.ones(len(chosen))
        per_expert[chosen] = _largest_remainder(total, weights)
        return per_expert

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
        lo = np.floor(u).astype(int)
        frac = u - lo
        hi = np.minimum(lo + 1, n_q - 1)
        q = quantiles[experts, batches]
        missing = np.isnan(q[:, 0])
        q[missing] = quantiles[experts[missing], -1]
        log_lib = q[np.arange(len(u)), lo] * (1 - frac) + q[np.arange(len(u)), hi] * frac
        return np.exp(log_lib)


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"Numbers of cells must be non-negative integers, got {n!r}.")
    return int(n)


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
