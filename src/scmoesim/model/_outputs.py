"""Latent space, cluster assignments and AnnData annotation for :class:`MoESim`."""

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy.optimize import linear_sum_assignment

from scmoesim import _constants as K

from ._io import check_query
from ._latent import LatentMoments, PosteriorSample

_N_QUANTILES = 101


class OutputsMixin:
    """Methods that read the trained model out onto AnnData objects."""

    # ------------------------------------------------------------------ data passes
    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        if adata is not None and adata is not self.adata:
            check_query(self, adata)
            if adata.is_view:
                # scvi-tools would turn the user's view into an AnnData in place (and register
                # it): read from a copy, the view stays a view
                adata = adata.copy()
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _batches(
        self, adata: AnnData | None, indices: Sequence[int] | None, batch_size: int | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        yield from loader

    @torch.inference_mode()
    def _iter_pass(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        give_mean: bool = True,
        reference: bool = False,
        variance: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the data, minibatch by minibatch.

        Yields per-minibatch arrays: latent, gate probabilities, expert, library, batch (and,
        with ``reference``, class codes; with ``variance``, the posterior variances ``qz_v``).
        """
        self._check_if_trained(warn=False)
        self.module.eval()
        for tensors in self._batches(adata, indices, batch_size):
            inf = self.module.inference(
                **self.module._get_inference_input(tensors), use_mean=give_mean
            )
            parts = {"z": inf["qz_m"] if give_mean else inf["z"], "p": inf["p"]}
            parts["expert"] = inf["expert"]
            if inf["library"] is not None:
                parts["library"] = inf["library"].reshape(-1)
            if K.BATCH_KEY in tensors:
                parts["batch"] = tensors[K.BATCH_KEY].reshape(-1)
            if reference:
                parts["reference"] = self._reference_codes(tensors, inf["library"])
            if variance:
                parts["qz_v"] = inf["qz_v"]
            yield {key: value.detach().cpu().numpy() for key, value in parts.items()}

    def _pass(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        give_mean: bool = True,
        reference: bool = False,
        variance: bool = False,
    ) -> dict[str, np.ndarray]:
        """:meth:`_iter_pass` concatenated over all cells."""
        out: dict[str, list[np.ndarray]] = {}
        for part in self._iter_pass(adata, indices, batch_size, give_mean, reference, variance):
            for key, value in part.items():
                out.setdefault(key, []).append(value)
        return {k: np.concatenate(v) for k, v in out.items()}

    def _reference_codes(self, tensors: dict, library) -> torch.Tensor:
        """Per-cell class codes that clusters are named after (-1 unknown)."""
        if self.module.use_labels:
            return tensors[K.LABELS_KEY].reshape(-1).round().long()
        if self.module.signature_scorer is not None:
            x = tensors[K.X_KEY].to(self.device)
            lib = library.to(self.device) if library is not None else None
            return self.module.signature_scorer(x, lib)
        return torch.full((tensors[K.X_KEY].shape[0],), -1, dtype=torch.long)

    # ------------------------------------------------------------------ public outputs
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Latent representation of each cell (use with ``sc.pp.neighbors(use_rep=...)``).

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None`` uses the training data.
        indices
            Cells to use; ``None`` for all.
        give_mean
            Return the posterior mean (default) instead of a sample.
        batch_size
            Minibatch size for the pass.

        Returns
        -------
        ``(n_cells, n_latent)`` float32 array.
        """
        return self._pass(adata, indices, batch_size, give_mean)["z"]

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> pd.Categorical | pd.DataFrame:
        """Cluster of each cell (the gate's argmax expert), named after labels or signatures.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None`` uses the training data.
        indices
            Cells to use; ``None`` for all.
        soft
            Return the gate probabilities as a cells x clusters DataFrame instead.
        batch_size
            Minibatch size for the pass.

        Returns
        -------
        A :class:`pandas.Categorical` of cluster names (categories: the clusters that hold
        cells, named ones first), safe to assign to ``adata.obs``; or, with ``soft=True``, a
        DataFrame indexed by ``obs_names`` with one column per cluster (the probabilities of
        experts merged by :meth:`merge_clusters` summed).
        """
        out = self._pass(adata, indices, batch_size)
        names = np.asarray(self.cluster_names_, dtype=object)
        if soft:
            proba, columns = _cluster_proba(out["p"], names)
            return pd.DataFrame(proba, index=self._obs_names(adata, indices), columns=columns)
        order = [c for c in self._category_order() if c in set(names[out["expert"]])]
        return pd.Categorical(names[out["expert"]], categories=order)

    def expert_usage(self, adata: AnnData | None = None) -> pd.Series:
        """Count the cells routed to each expert (training data: recorded after training).

        With ``adata=None`` these are the counts recorded on the training data, also after
        :meth:`load` onto other data (they set ``generate``'s training proportions); pass
        ``adata`` (e.g. ``model.adata``) to count the cells of any AnnData.

        Returns
        -------
        Series of cell counts indexed by cluster name, in expert order (one entry per expert:
        experts merged by :meth:`merge_clusters` repeat their cluster's name).
        """
        if adata is None and getattr(self, "expert_usage_", None) is not None:
            counts = np.asarray(self.expert_usage_)
        else:
            counts = np.bincount(self._pass(adata)["expert"], minlength=self.module.n_experts)
        return pd.Series(counts, index=list(self.cluster_names_), name="n_cells")

    def effective_n_clusters(self, adata: AnnData | None = None, min_cells: int = 1) -> int:
        """Number of clusters that hold cells (the effective K).

        With more experts than clusters in the data, the gate leaves some experts without cells;
        their names never appear in :meth:`predict`, whose categories are the clusters that do.
        Unnamed clusters are numbered ``0, 1, ...`` by decreasing size on the training data, so
        the effective clusters of the training data are exactly ``"0"`` to ``"m - 1"`` (after
        any clusters named after labels or signatures). Experts merged by
        :meth:`merge_clusters` count as one cluster.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None`` uses the training data (counts recorded
            after training, kept by :meth:`load` onto other data).
        min_cells
            A cluster counts when it holds at least this many cells.

        Returns
        -------
        The number of clusters with at least ``min_cells`` cells.
        """
        if not isinstance(min_cells, int | np.integer) or min_cells < 1:
            raise ValueError(f"min_cells must be a positive integer, got {min_cells!r}.")
        return _n_clusters(self.expert_usage(adata), min_cells)

    def annotate(
        self,
        adata: AnnData | None = None,
        *,
        latent_key: str = K.LATENT_KEY,
        cluster_key: str = K.CLUSTER_KEY,
        proba_key: str = K.PROBA_KEY,
        uns_key: str = K.UNS_KEY,
        batch_size: int | None = None,
    ) -> None:
        """Write the latent space, clusters and probabilities into ``adata`` in one call.

        Writes ``obsm["X_moesim"]``, ``obs["moesim_cluster"]`` (categorical),
        ``obsm["moesim_proba"]`` (``predict(soft=True).values``: cells x clusters, columns in
        the order of ``uns["moesim"]["proba_columns"]``; one per expert unless
        :meth:`merge_clusters` joined some) and ``uns["moesim"]`` (each expert's cluster name,
        expert usage, effective number of clusters, model parameters). Keys can be renamed.

        Parameters
        ----------
        adata
            AnnData with the model's genes; ``None`` annotates the training data.
        latent_key, cluster_key, proba_key, uns_key
            Where to write.
        batch_size
            Minibatch size for the pass.
        """
        target = self.adata if adata is None else adata
        out = self._pass(adata, batch_size=batch_size)
        if target.is_view:  # written into, so it becomes an AnnData, as anndata does on writes
            target._init_as_actual(target.copy())
        names = np.asarray(self.cluster_names_, dtype=object)
        order = [c for c in self._category_order() if c in set(names[out["expert"]])]
        usage = np.bincount(out["expert"], minlength=self.module.n_experts)
        target.obsm[latent_key] = out["z"]
        target.obs[cluster_key] = pd.Categorical(names[out["expert"]], categories=order)
        proba, columns = _cluster_proba(out["p"], names)  # as predict(soft=True)
        target.obsm[proba_key] = proba
        # Lists, not dicts keyed by cluster name: names such as "CD4+/CD25 T Reg" would become
        # nested groups in .h5ad files.
        target.uns[uns_key] = {
            "cluster_names": [str(n) for n in names],
            "proba_columns": columns,
            "expert_usage": usage.astype(np.int64),
            "effective_n_clusters": _n_clusters(pd.Series(usage, index=list(names)), 1),
            "params": {k: v for k, v in self.init_params_["non_kwargs"].items() if v is not None},
        }

    # ------------------------------------------------------------------ naming
    def _obs_names(self, adata: AnnData | None, indices) -> pd.Index:
        names = (self.adata if adata is None else adata).obs_names
        return names if indices is None else names[np.asarray(indices)]

    def _default_cluster_names(self, n_experts: int) -> list[str]:
        return [str(k) for k in range(n_experts)]

    def _first_expert_of_cluster(self) -> np.ndarray:
        """For each expert, the index of its cluster's first expert (merged clusters share it).

        Sorting experts by it groups each cluster's experts, clusters in the order of their
        first expert.
        """
        first: dict[str, int] = {}
        names = [str(n) for n in self.cluster_names_]
        for k, name in enumerate(names):
            first.setdefault(name, k)
        return np.array([first[name] for name in names], dtype=np.int64)

    def _category_order(self) -> list[str]:
        """Named clusters in class order, then numbered ones by number."""
        classes = self._class_names()
        names = list(dict.fromkeys(self.cluster_names_))  # merged experts share a name
        named = [c for c in classes if c in names]
        rest = [c for c in names if c not in set(classes)]
        rest.sort(key=_number_key)
        return named + rest

    def _summarise_training_data(self) -> None:
        """Name the clusters and record per-expert statistics of the training cells.

        Streams over the cells and keeps per-expert aggregates only (usage, the gate mass of
        each class on each expert, cells per expert and batch, the moments of the latent
        posteriors for ``generate(latent="fitted")``), plus the library size, expert and batch
        of each cell for the exact library quantiles (about 8 bytes a cell, instead of the
        ``(n, K)`` probabilities and ``(n, n_latent)`` latent of a full pass).
        """
        n_exp = self.module.n_experts
        n_batch = self.summary_stats.n_batch
        classes = self._class_names()
        usage = np.zeros(n_exp, dtype=np.int64)
        mass = np.zeros((len(classes), n_exp))
        # Filled in place: per-minibatch pieces kept alive between the pass's large freed
        # buffers would fragment the heap and hold on to their memory.
        n_obs = self.adata.n_obs
        code = np.min_scalar_type(max(n_exp, n_batch, 1))
        out = {"expert": np.empty(n_obs, code), "batch": np.zeros(n_obs, code)}
        moments = LatentMoments(n_exp, self.module.n_latent)
        cells = PosteriorSample(n_exp)
        start = 0
        for part in self._iter_pass(reference=True, variance=True):
            stop = start + part["expert"].shape[0]
            usage += np.bincount(part["expert"], minlength=n_exp)
            moments.add(part["expert"], part["z"], part["qz_v"])
            cells.add(
                part["expert"], part["z"], part["qz_v"], part.get("library"), part.get("batch")
            )
            _add_class_mass(mass, part["p"], part["reference"])
            out["expert"][start:stop] = part["expert"]
            if "batch" in part:
                out["batch"][start:stop] = part["batch"]
            if "library" in part:
                out.setdefault("library", np.empty(n_obs, part["library"].dtype))
                out["library"][start:stop] = part["library"]
            start = stop
        self.expert_usage_ = usage
        self.cluster_names_ = _names_from_mass(mass, classes, usage)
        self.expert_names_ = list(self.cluster_names_)  # before any merge_clusters
        self.expert_batch_counts_ = _batch_counts(out, n_exp, n_batch)
        self.library_quantiles_ = (
            _library_quantiles(out, n_exp, n_batch) if "library" in out else None
        )
        centres = self.module.centres.detach().cpu().numpy()
        self.latent_loc_, self.latent_scale_tril_ = moments.fit(centres)
        self.latent_cells_ = cells.result()


def _n_clusters(usage: pd.Series, min_cells: int) -> int:
    """Clusters (distinct names of the per-expert ``usage``) with at least ``min_cells`` cells."""
    return int((usage.groupby(level=0, sort=False).sum() >= min_cells).sum())


def _add_class_mass(mass: np.ndarray, proba: np.ndarray, reference: np.ndarray) -> None:
    """Add each known cell's gate probabilities to its class's row of ``mass`` (in place)."""
    known = reference >= 0
    if mass.shape[0] and known.any():
        np.add.at(mass, reference[known], proba[known])


def _names_from_mass(mass: np.ndarray, classes: list[str], usage: np.ndarray) -> list[str]:
    """Name experts after classes from the ``(classes, K)`` gate mass; number the others.

    Classes are matched one-to-one to experts (Hungarian) maximising the gate probability mass
    that each class's known cells put on the expert, so every class gets an expert even when
    training left it few hard assignments. Unmatched experts are numbered ``0, 1, ...`` by
    decreasing usage (``cluster_0, ...`` if a class is itself called like a number).
    """
    n_exp = len(usage)
    names: list[str | None] = [None] * n_exp
    if classes and mass.any():
        # ties (a class none of whose cells reached the pass: a row of zeros) go to the least
        # used experts, not to whichever populated expert comes first
        used = np.asarray(usage, dtype=float)
        tie_break = 1e-9 * mass.max() * used / max(used.max(), 1.0)
        rows, cols = linear_sum_assignment(mass - tie_break[None, :], maximize=True)
        for r, c in zip(rows, cols, strict=True):
            names[c] = classes[r]
    return _number_unnamed(names, usage, n_exp)


def _cluster_proba(p: np.ndarray, names) -> tuple[np.ndarray, list[str]]:
    """Gate probabilities per cluster and the cluster of each column, in order of appearance.

    The columns of experts joined by ``merge_clusters`` (which share a name) are summed.
    """
    columns = list(dict.fromkeys(str(n) for n in names))
    if len(columns) == len(names):
        return p, columns
    index = {c: i for i, c in enumerate(columns)}
    summed = np.zeros((p.shape[0], len(columns)), dtype=p.dtype)
    for k, name in enumerate(names):
        summed[:, index[str(name)]] += p[:, k]
    return summed, columns


def _number_key(name) -> tuple:
    """Sort key of numbered clusters: ``"2"`` before ``"10"``, also as ``cluster_2``."""
    text = str(name)
    digits = text.removeprefix("cluster_")
    return (0, int(digits)) if digits.isdigit() else (1, text)


def _number_unnamed(names: list[str | None], size: np.ndarray, n_experts: int) -> list[str]:
    """Fill the ``None`` entries of ``names`` with ``0, 1, ...`` by decreasing ``size``.

    The numbers get a ``cluster_`` prefix when a given name is itself one of ``0 ..
    n_experts - 1``, so that no number can collide with a class.
    """
    taken = set(n for n in names if n is not None)
    free = [k for k in np.argsort(-np.asarray(size), kind="stable") if names[k] is None]
    prefix = "cluster_" if any(str(i) in taken for i in range(n_experts)) else ""
    names = list(names)
    for i, k in enumerate(free):
        names[k] = f"{prefix}{i}"
    return [str(n) for n in names]


def _name_experts(
    proba: np.ndarray, reference: np.ndarray, classes: list[str], usage: np.ndarray
) -> list[str]:
    """Name experts after classes from per-cell probabilities (see :func:`_names_from_mass`)."""
    mass = np.zeros((len(classes), len(usage)))
    _add_class_mass(mass, proba, reference)
    return _names_from_mass(mass, classes, usage)


def _batch_counts(out: dict, n_exp: int, n_batch: int) -> np.ndarray:
    batch = out.get("batch", np.zeros_like(out["expert"])).astype(int)
    counts = np.zeros((n_exp, max(n_batch, 1)), dtype=np.int64)
    np.add.at(counts, (out["expert"], batch), 1)
    return counts


def _library_quantiles(out: dict, n_exp: int, n_batch: int) -> np.ndarray:
    """``(K, n_batch + 1, Q)`` quantiles of log library size; slot ``n_batch`` = all batches."""
    n_batch = max(n_batch, 1)
    qs = np.linspace(0, 1, _N_QUANTILES)
    log_lib = np.log(np.maximum(out["library"], 1.0))
    batch = out.get("batch", np.zeros_like(out["expert"])).astype(int)
    result = np.full((n_exp, n_batch + 1, _N_QUANTILES), np.nan)
    overall = np.quantile(log_lib, qs)
    for k in range(n_exp):
        in_k = out["expert"] == k
        result[k, n_batch] = np.quantile(log_lib[in_k], qs) if in_k.any() else overall
        for b in range(n_batch):
            sel = in_k & (batch == b)
            if sel.any():
                result[k, b] = np.quantile(log_lib[sel], qs)
    return result
