"""Checks run before anything is registered or trained; each error names the problem."""

from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from scmoesim._constants import COUNT_LIKELIHOODS
from scmoesim._memory import release_freed_memory

_CHUNK = 10_000


def get_matrix(adata: AnnData, layer: str | None):
    """Return ``adata.layers[layer]`` or ``adata.X``, with a clear error when missing."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is None; pass `layer=` naming the layer with the data.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"layer {layer!r} not found in adata.layers (available: {list(adata.layers)})."
        )
    return adata.layers[layer]


def _row_blocks(x):
    """Yield ``(start, rows start:start + _CHUNK)`` of ``x`` (in memory, dense or backed)."""
    for start in range(0, x.shape[0], _CHUNK):
        block = x[start : start + _CHUNK]
        yield start, block
        del block
        # Backed X: without this, the freed blocks fragment the heap and the resident memory
        # grows with the number of cells (+170 MiB over 1M cells of 2,000 genes).
        release_freed_memory()


def _value_blocks(x):
    """Yield the stored values of ``x`` block by block (sparse: non-zeros only)."""
    if sparse.issparse(x):
        yield np.asarray(x.data)
        return
    for _, block in _row_blocks(x):
        yield np.asarray(block.data if sparse.issparse(block) else block)


def where(layer: str | None) -> str:
    """Human-readable name of the data matrix."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def check_adata_basics(adata: AnnData, layer: str | None) -> None:
    """Shape, unique names and finite values of the data matrix."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes); "
            "MoESim needs at least one cell and one gene."
        )
    for axis, names in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:5].tolist()
            raise ValueError(
                f"adata.{axis} are not unique (e.g. {dup}); call "
                f"adata.{axis[:3]}_names_make_unique() first."
            )
    x = get_matrix(adata, layer)
    if not np.issubdtype(np.dtype(x.dtype), np.number) or np.dtype(x.dtype) == np.bool_:
        raise TypeError(f"{where(layer)} must be numeric, got dtype {x.dtype}.")
    for values in _value_blocks(x):
        if not np.isfinite(values).all():
            raise ValueError(
                f"{where(layer)} contains NaN or infinite values; remove or impute them first."
            )


def check_likelihood_data(adata: AnnData, layer: str | None, likelihood: str) -> None:
    """Values compatible with the likelihood: counts, or values in [0, 1] for Bernoulli."""
    x = get_matrix(adata, layer)
    for values in _value_blocks(x):
        if likelihood in COUNT_LIKELIHOODS:
            if (values < 0).any():
                raise ValueError(
                    f"{where(layer)} has negative values, but likelihood={likelihood!r} needs "
                    "raw counts. Pass the counts layer, or use likelihood='normal'."
                )
            if not np.array_equal(values, np.round(values)):
                raise ValueError(
                    f"{where(layer)} has non-integer values, but likelihood={likelihood!r} needs "
                    "raw counts (not normalised or log data). Pass the counts layer, or use "
                    "likelihood='normal'."
                )
        elif likelihood == "bernoulli" and ((values < 0).any() or (values > 1).any()):
            raise ValueError(
                f"likelihood='bernoulli' needs data scaled to [0, 1]; {where(layer)} has values "
                "outside that range."
            )


def is_count_matrix(adata: AnnData, layer: str | None) -> bool:
    """Whether the data are non-negative integers (decides signature normalisation)."""
    x = get_matrix(adata, layer)
    for values in _value_blocks(x):
        if (values < 0).any() or not np.array_equal(values, np.round(values)):
            return False
    return True


def check_obs_key(adata: AnnData, key: str | None, what: str) -> None:
    """An obs column must exist."""
    if key is not None and key not in adata.obs:
        raise KeyError(f"{what} {key!r} not found in adata.obs (columns: {list(adata.obs)}).")


def check_batch_values(adata: AnnData, batch_key: str | None) -> None:
    """Every cell needs a batch (scvi-tools' own error on NaN names no missing value)."""
    if batch_key is None:
        return
    missing = int(adata.obs[batch_key].isna().sum())
    if missing:
        raise ValueError(
            f"adata.obs[{batch_key!r}] has {missing} missing value(s) (NaN); batch_key needs a "
            "batch for every cell: fill them (e.g. with 'unknown') or drop those cells."
        )


def check_labels(adata: AnnData, labels_key: str, unlabeled_category) -> None:
    """Labels must have at least one labelled cell."""
    col = adata.obs[labels_key]
    known = col.notna() & (col.astype(object) != unlabeled_category)
    if not known.any():
        raise ValueError(
            f"adata.obs[{labels_key!r}] has no labelled cell: every value is NaN or the "
            f"unlabeled category {unlabeled_category!r}."
        )
    if pd.Series(col[known]).nunique() < 2:
        import warnings

        warnings.warn(
            f"adata.obs[{labels_key!r}] has a single label class; the label similarity then only "
            "says that labelled cells belong together.",
            UserWarning,
            stacklevel=3,
        )


def check_embedding(adata: AnnData, key: str | None) -> None:
    """An obsm embedding must exist, be 2-D and finite."""
    if key is None:
        return
    if key not in adata.obsm:
        raise KeyError(f"embedding_key {key!r} not found in adata.obsm (keys: {list(adata.obsm)}).")
    emb = adata.obsm[key]
    if sparse.issparse(emb):
        raise TypeError(
            f"adata.obsm[{key!r}] is a sparse matrix; the kNN similarity needs a dense "
            f"embedding: adata.obsm[{key!r}] = adata.obsm[{key!r}].toarray()."
        )
    emb = emb.to_numpy() if isinstance(emb, pd.DataFrame) else np.asarray(emb)
    if emb.ndim != 2 or emb.shape[1] == 0:
        raise ValueError(f"adata.obsm[{key!r}] must be a 2-D array with at least one column.")
    if not np.issubdtype(emb.dtype, np.number) or emb.dtype == np.bool_:
        raise TypeError(f"adata.obsm[{key!r}] must be numeric, got dtype {emb.dtype}.")
    # In the stored dtype and chunk by chunk: no float64 copy of a million-cell embedding.
    for start in range(0, emb.shape[0], _CHUNK):
        if not np.isfinite(emb[start : start + _CHUNK]).all():
            raise ValueError(f"adata.obsm[{key!r}] contains NaN or infinite values.")


def warn_all_zero(adata: AnnData, layer: str | None) -> None:
    """Warn about cells or genes that are 0 everywhere (kept, but they carry no signal).

    Cells without counts are encoded from an all-zero input and get whatever cluster the gate
    gives that input; genes that are 0 in every cell only cost decoder capacity.
    """
    x = get_matrix(adata, layer)
    nz_cells = np.zeros(adata.n_obs, dtype=bool)
    nz_genes = np.zeros(adata.n_vars, dtype=bool)
    for start, block in _row_blocks(x):
        if sparse.issparse(block):
            block = sparse.csr_matrix(block)
            block.eliminate_zeros()
            nz_cells[start : start + block.shape[0]] = np.diff(block.indptr) > 0
            nz_genes[np.unique(block.indices)] = True
        else:
            nonzero = np.asarray(block) != 0
            nz_cells[start : start + block.shape[0]] = nonzero.any(1)
            nz_genes |= nonzero.any(0)
    for what, keep, names, fix in (
        ("cells", nz_cells, adata.obs_names, "sc.pp.filter_cells(adata, min_counts=1)"),
        ("genes", nz_genes, adata.var_names, "sc.pp.filter_genes(adata, min_cells=1)"),
    ):
        if not keep.all():
            empty = names[~keep]
            import warnings

            warnings.warn(
                f"{where(layer)} has {len(empty)} {what} that are 0 everywhere (e.g. "
                f"{empty[:5].tolist()}); they are kept but carry no signal. Remove them with "
                f"{fix} if that is not intended.",
                UserWarning,
                stacklevel=3,
            )


def check_resolution(value) -> None:
    """``similarity_resolution`` is ``"paper"``, ``"half"`` or a positive finite number."""
    if isinstance(value, str) and value in ("paper", "half"):
        return
    if not _is_number(value) or not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"similarity_resolution must be a positive number, 'paper' or 'half', got {value!r}."
        )


def as_kwargs(value, name: str) -> dict:
    """A copy of a keyword-argument mapping (``None`` is empty); anything else raises."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {value!r}.")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{name} keys must be argument names (strings), got {bad!r}.")
    return dict(value)


def n_processes(devices, num_nodes=1) -> int:
    """Training processes for Lightning's ``devices`` when it says (else 1: a single process)."""
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:  # device indices, e.g. "0,1"
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, bool):
        return 1
    if isinstance(devices, int | np.integer) and devices > 0:
        n = int(devices)
    elif isinstance(devices, list | tuple):
        n = max(len(devices), 1)
    else:
        return 1  # "auto" or -1: Lightning decides; train() warns if no step ran
    nodes = num_nodes if isinstance(num_nodes, int | np.integer) and num_nodes > 0 else 1
    return n * int(nodes)


def n_train_cells(n_obs: int, train_size: float | None) -> int:
    """Cells in the training split, as scvi-tools' data splitter counts them (default 90%)."""
    return int(np.ceil(n_obs * (0.9 if train_size is None else train_size)))


def check_enough_cells(n_obs: int, train_size: float | None) -> None:
    """Training needs a few cells in the training split (BatchNorm, minibatch similarity)."""
    n_train = n_train_cells(n_obs, train_size)
    if n_train < 3:
        raise ValueError(
            f"Training needs at least 3 cells in the training split; got {n_obs} cell(s) "
            f"with train_size={train_size}."
        )


def _is_number(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def check_model_params(
    *,
    sizes: dict[str, object],
    weights: dict[str, object],
    fractions: dict[str, object],
    knn_threshold: object,
) -> None:
    """Numeric model settings, checked before anything is built; each error names the setting.

    ``sizes``: positive integers (experts, layer widths, latent size, layer counts, neighbours);
    ``weights``: finite numbers >= 0 (loss weights); ``fractions``: numbers in [0, 1) (dropout,
    centre decay).
    """
    for name, value in sizes.items():
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    for name, value in weights.items():
        if not _is_number(value) or not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    for name, value in fractions.items():
        if not _is_number(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
    if knn_threshold is not None and (
        not _is_number(knn_threshold) or not np.isfinite(knn_threshold) or knn_threshold <= 0
    ):
        raise ValueError(f"knn_threshold must be None or a number > 0, got {knn_threshold!r}.")


def warn_degenerate_metric(n_dims: int, metric: str) -> None:
    """Correlation (and cosine) distances carry almost no information on 1-2-D embeddings.

    After centring, a 2-D point is a multiple of ``(1, -1)``, so its correlation with any other
    point is +-1: every distance is 0 or 2 and the nearest neighbours are ties. The same holds
    for cosine on a 1-D embedding.
    """
    if (metric == "correlation" and n_dims <= 2) or (metric == "cosine" and n_dims <= 1):
        import warnings

        warnings.warn(
            f"knn_metric={metric!r} on a {n_dims}-dimensional embedding gives only distances "
            "0 or 2, so the nearest neighbours are arbitrary ties; use 'euclidean' or "
            "'canberra', or an embedding with more dimensions.",
            UserWarning,
            stacklevel=3,
        )
