"""Checks around saving, loading and mapping new data, each saying exactly what is wrong.

scvi-tools' own checks either only warn (a different gene list on ``load``) or fail deep
inside torch (a state dict of the wrong shape). These run first and name the problem: which
genes are missing or extra, whether only their order differs, and which package versions
wrote and read a saved model.
"""

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from . import _validate as V

#: Name of the file that scvi-tools writes inside a model directory.
MODEL_FILE = "model.pt"
#: Packages whose versions are recorded in ``model.saved_with_`` by :meth:`MoESim.save`.
RECORDED_PACKAGES = ("scmoesim", "scvi-tools", "torch", "lightning", "anndata", "numpy")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that define a saved model's meaning."""
    out = {}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    if out["scmoesim"] == "unknown":
        from scmoesim import __version__

        out["scmoesim"] = __version__
    return out


# ---------------------------------------------------------------------------------- genes
def describe_gene_difference(reference: pd.Index, query: pd.Index) -> str | None:
    """Human-readable difference between two gene lists, or ``None`` when identical.

    Parameters
    ----------
    reference
        The model's genes (in the model's order).
    query
        The genes of the data handed to the model.
    """
    reference = pd.Index(np.asarray(reference).astype(str))
    query = pd.Index(np.asarray(query).astype(str))
    if reference.equals(query):
        return None
    missing = reference.difference(query, sort=False)
    extra = query.difference(reference, sort=False)
    if len(missing) == 0 and len(extra) == 0:
        if not query.is_unique:
            dup = query[query.duplicated()].unique()[:5].tolist()
            return f"it has duplicated gene names (e.g. {dup})"
        first = int(np.flatnonzero(reference.to_numpy() != query.to_numpy())[0])
        return (
            f"it has the model's {len(reference)} genes in a different order (first difference "
            f"at position {first}: {query[first]!r} where the model has {reference[first]!r})"
        )
    parts = []
    if len(missing):
        parts.append(f"{len(missing)} missing (e.g. {missing[:5].tolist()})")
    if len(extra):
        parts.append(f"{len(extra)} extra (e.g. {extra[:5].tolist()})")
    return "its genes differ from the model's: " + ", ".join(parts)


def check_same_genes(reference: pd.Index, query: pd.Index, what: str = "The query AnnData") -> None:
    """Raise a ``ValueError`` naming missing, extra or reordered genes.

    Parameters
    ----------
    reference
        The model's genes.
    query
        The genes of the data handed to the model.
    what
        How to call the data in the message.
    """
    diff = describe_gene_difference(reference, query)
    if diff is not None:
        raise ValueError(
            f"{what} does not match the model: {diff}. Subset and reorder it with "
            "adata[:, var_names] using the model's genes (model.adata.var_names, or "
            "MoESim.load_registry / the saved model's var_names)."
        )


def check_query(model, adata: AnnData) -> None:
    """Checks for a new AnnData handed to an output method (latent, predict, annotate).

    The genes must match the model's; the data matrix, the registered embedding and the batch
    categories must be usable. Raised before scvi-tools transfers its registration.
    """
    check_same_genes(model.adata.var_names, adata.var_names)
    setup = model.adata_manager.registry["setup_args"]
    layer = setup.get("layer")
    V.check_adata_basics(adata, layer)
    V.check_likelihood_data(adata, layer, model.module.likelihood)
    embedding_key = setup.get("embedding_key")
    if embedding_key is not None:
        V.check_embedding(adata, embedding_key)
    batch_key = setup.get("batch_key")
    if batch_key is not None:
        V.check_obs_key(adata, batch_key, "batch_key")
        known = set(map(str, model._batch_categories()))
        new = sorted(set(adata.obs[batch_key].astype(str)) - known)
        if new:
            raise ValueError(
                f"adata.obs[{batch_key!r}] has batch categories the model was not trained on: "
                f"{new[:5]}; the model knows {sorted(known)}."
            )


# ---------------------------------------------------------------------------------- saving
def check_save_target(dir_path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write into an existing path unless ``overwrite=True``."""
    if os.path.exists(dir_path) and not overwrite:
        raise ValueError(
            f"{os.fspath(dir_path)!r} already exists; pass overwrite=True to replace the model "
            "saved there, or choose another directory."
        )


def read_saved(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
    """The saved model's gene names and recorded versions (read on the CPU)."""
    path = Path(dir_path) / f"{prefix or ''}{MODEL_FILE}"
    if not path.is_file():
        raise FileNotFoundError(
            f"No saved model at {os.fspath(dir_path)!r}: {path.name} is missing "
            f"(the directory holds {sorted(p.name for p in Path(dir_path).glob('*'))[:10]})."
            if Path(dir_path).is_dir()
            else f"No saved model at {os.fspath(dir_path)!r}: no such directory."
        )
    saved = torch.load(path, map_location="cpu", weights_only=False)
    attrs = saved.get("attr_dict", {})
    return {
        "var_names": saved.get("var_names"),
        "saved_with": attrs.get("saved_with_"),
        "model_name": attrs.get("registry_", {}).get("model_name"),
    }


def check_versions(saved_with: dict | None, dir_path) -> None:
    """Warn, naming both versions, when the model was saved by another scmoesim version."""
    here = package_versions()
    if not saved_with:
        warnings.warn(
            f"The model in {os.fspath(dir_path)!r} records no scmoesim version (saved by an "
            f"older scmoesim or another tool); loading it with scmoesim {here['scmoesim']}.",
            UserWarning,
            stacklevel=3,
        )
        return
    changed = {
        name: (saved_with[name], here[name])
        for name in ("scmoesim", "scvi-tools")
        if saved_with.get(name) not in (None, here[name])
    }
    if changed:
        listed = ", ".join(f"{n} {old} (now {new})" for n, (old, new) in changed.items())
        warnings.warn(
            f"The model in {os.fspath(dir_path)!r} was saved with {listed}. It is loaded "
            "as is; outputs may differ from the saving version's.",
            UserWarning,
            stacklevel=3,
        )


def check_before_load(
    cls, dir_path: str | os.PathLike, adata: AnnData | None, prefix: str | None = None
) -> dict:
    """All checks of :meth:`MoESim.load` that can run before scvi-tools touches anything."""
    saved = read_saved(dir_path, prefix)
    if saved["model_name"] not in (None, cls.__name__):
        raise ValueError(
            f"{os.fspath(dir_path)!r} holds a {saved['model_name']} model, not a {cls.__name__}."
        )
    check_versions(saved["saved_with"], dir_path)
    stored = Path(dir_path) / f"{prefix or ''}adata.h5ad"
    if adata is None and not stored.exists():
        raise ValueError(
            f"{os.fspath(dir_path)!r} was saved without its AnnData (save(save_anndata=False), "
            "the default): pass the data to load onto, with the model's genes, as "
            "MoESim.load(dir_path, adata=...)."
        )
    if adata is not None and adata is not False and saved["var_names"] is not None:
        check_same_genes(
            pd.Index(saved["var_names"]), adata.var_names, "The AnnData passed to load"
        )
    return saved


@contextmanager
def clear_state_errors(saved_with: dict | None) -> Iterator[None]:
    """Turn torch's state-dict mismatch into an error that names the versions involved."""
    try:
        yield
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        old = (saved_with or {}).get("scmoesim", "an unknown version")
        raise RuntimeError(
            f"The saved weights do not fit this scmoesim's model (saved with scmoesim {old}, "
            f"this is {package_versions()['scmoesim']}): the architecture changed between "
            "versions. Load it with the saving version, or retrain. Torch says: "
            + " ".join(str(err).split())[:600]
        ) from err
