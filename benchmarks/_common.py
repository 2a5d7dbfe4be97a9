"""Shared helpers of the benchmark scripts (data preparation, baselines, environment)."""

import platform
import sys
from datetime import date

import numpy as np
import pandas as pd
import scanpy as sc
import scvi
from anndata import AnnData
from sklearn.cluster import KMeans

import scmoesim


def select_genes(adata: AnnData, n_top: int, keep: list[str], layer: str = "counts") -> AnnData:
    """Highly variable genes (scanpy 'seurat' on log-normalised counts) plus ``keep``."""
    tmp = AnnData(adata.layers[layer].copy(), obs=adata.obs[[]], var=adata.var[[]])
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_top, flavor="seurat")
    mask = tmp.var["highly_variable"].to_numpy() | tmp.var_names.isin(keep)
    return adata[:, mask].copy()


def kidney_signature_data() -> AnnData:
    """Tabula Muris kidney FACS: the 2,000 most variable genes plus the kidney markers."""
    from scmoesim import datasets

    adata = datasets.tabula_muris_kidney()
    markers = [g for gs in datasets.KIDNEY_SIGNATURES.values() for g in gs]
    return select_genes(adata, 2000, markers)


def log_pca(
    adata: AnnData, layer: str | None, n_comps: int = 50, counts: bool = True
) -> np.ndarray:
    """PCA of log-normalised counts (or of the values as given)."""
    x = adata.layers[layer] if layer else adata.X
    tmp = AnnData(x.copy())
    if counts:
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
    sc.pp.scale(tmp, max_value=10)
    n_comps = min(n_comps, min(tmp.shape) - 1)
    sc.pp.pca(tmp, n_comps=n_comps)
    return tmp.obsm["X_pca"]


def leiden(x: np.ndarray, seed: int) -> np.ndarray:
    """Leiden at the default resolution on the kNN graph (scanpy defaults) of the rows of ``x``.

    The graph comes from ``scmoesim.pp.neighbors``, which avoids the crash of scanpy 1.11.5's
    neighbours with scipy 1.17 at 8k+ cells.
    """
    tmp = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(x))]))
    tmp.obsm["X_rep"] = x
    scmoesim.pp.neighbors(tmp, use_rep="X_rep")
    sc.tl.leiden(tmp, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return tmp.obs["leiden"].astype(str).to_numpy()


def fit_on_clusters(
    adata: AnnData, clusters: np.ndarray, seed: int, max_epochs: int | None, **model_kwargs
) -> scmoesim.MoESim:
    """The second stage of the two-stage route: a model trained with ``clusters`` as labels.

    ``model_kwargs`` go to :class:`scmoesim.MoESim`; ``layer`` among them goes to
    ``setup_anndata``. ``adata`` is copied, not changed.
    """
    adata = adata.copy()
    adata.obs["stage1"] = pd.Categorical(clusters)
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, layer=model_kwargs.pop("layer", None), labels_key="stage1")
    model = scmoesim.MoESim(adata, **model_kwargs)
    model.train(max_epochs=max_epochs, enable_progress_bar=False)
    return model


def kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means told the true K."""
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def environment() -> str:
    """One line of package versions and machine."""
    import anndata
    import torch

    return (
        f"python {sys.version.split()[0]}, scmoesim {scmoesim.__version__}, scvi-tools "
        f"{scvi.__version__}, torch {torch.__version__}, scanpy {sc.__version__}, anndata "
        f"{anndata.__version__}; {platform.machine()} {platform.processor() or ''} "
        f"({__import__('os').cpu_count()} cores), {date.today()}"
    )
