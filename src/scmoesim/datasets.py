"""Example data: bundled with scanpy, shipped beside the project, or read from a local path.

Nothing here downloads at run time. :func:`tabula_muris` reads the public Tabula Muris files from
a local path; :func:`tabula_muris_download_help` says where users with a network get them.
"""

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

#: PBMC marker genes present in ``pbmc68k_reduced``, one signature per ``bulk_labels`` population
#: (the T-cell subsets pooled into CD4+ and CD8+ T). In this subset the cells labelled
#: "CD14+ Monocyte" express FCGR3A (CD16) in 96 % of cases and the cells labelled "Dendritic"
#: include LYZ+ CST3+ S100A8/9+ classical monocytes besides FCER1A+ dendritic cells, so the
#: monocyte signature is FCGR3A and the dendritic one FCER1A with the myeloid LYZ and CST3
#: (Seurat's PBMC markers). CD34 itself is not among the 765 genes (PRSS57, SOX4 instead).
PBMC_SIGNATURES: dict[str, list[str]] = {
    "CD14+ Monocyte": ["FCGR3A"],
    "Dendritic": ["FCER1A", "LYZ", "CST3"],
    "CD19+ B": ["CD79A", "MS4A1"],
    "CD56+ NK": ["GNLY", "NKG7"],
    "CD8+ T": ["CD8A", "CD8B"],
    "CD4+ T": ["CD4", "IL7R"],
    "CD34+ progenitor": ["PRSS57", "SOX4"],
}

#: Kidney cell-type markers for the Tabula Muris kidney FACS file (see the tutorial for why).
KIDNEY_SIGNATURES: dict[str, list[str]] = {
    "kidney tubule cell": ["Slc34a1", "Lrp2", "Slc12a1"],
    "fenestrated cell": ["Plvap", "Kdr"],
    "fibroblast": ["Col1a2", "Pdgfrb"],
    "kidney collecting duct cell": ["Slc12a3", "Calb1"],
    "endothelial cell": ["Sox17", "Gja4", "Fbln5"],
    "leukocyte": ["Ptprc", "Cd52", "Fcer1g"],
}

#: The paper's one-marker-per-organ signatures for Tabula Muris (Lpl heart, Miox kidney, ...).
TABULA_MURIS_ORGAN_SIGNATURES: dict[str, list[str]] = {
    "Heart": ["Lpl"],
    "Kidney": ["Miox"],
    "Liver": ["Hpx"],
    "Large_Intestine": ["Tspan1"],
    "Lung": ["Prx"],
    "Spleen": ["Cd79a"],
    "Thymus": ["Dntt"],
}


def shared_data_dir() -> Path:
    """Folder with the project's shared example files.

    ``$SCMOESIM_DATA`` if set, else the first ``shared/data`` found next to the working
    directory or to this package's source checkout.
    """
    env = os.environ.get("SCMOESIM_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data", Path.cwd() / "shared" / "data"]
    candidates += [p / "shared" / "data" for p in here.parents]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError(
        "Could not find the shared example data folder; set SCMOESIM_DATA to the folder that "
        "holds tabula_muris_kidney_facs.h5ad and levine32_cytof_subset.h5ad."
    )


def pbmc68k_reduced() -> ad.AnnData:
    """Scanpy's ``pbmc68k_reduced`` (700 cells), ready for a Gaussian MoESim.

    ``X`` holds the log-normalised expression of all 765 genes (``adata.raw`` of the scanpy
    object); ``obs["bulk_labels"]`` the FACS-sorted populations; ``obsm["X_pca"]`` and
    ``obsm["X_umap"]`` are kept. Use with ``likelihood="normal"`` and
    :data:`PBMC_SIGNATURES`.
    """
    src = sc.datasets.pbmc68k_reduced()
    adata = src.raw.to_adata()
    adata.X = sparse.csr_matrix(adata.X, dtype=np.float32)
    adata.obsm["X_pca"] = src.obsm["X_pca"].copy()
    adata.obsm["X_umap"] = src.obsm["X_umap"].copy()
    return adata


def tabula_muris_kidney(path: str | os.PathLike | None = None) -> ad.AnnData:
    """Tabula Muris kidney FACS (865 cells, raw counts) from the shared example data.

    ERCC spike-ins are removed; ``obs["cell_type"]`` has six annotated types and
    ``"unannotated"``; ``layers["counts"]`` is a copy of the counts in ``X``.
    """
    path = Path(path) if path is not None else shared_data_dir() / "tabula_muris_kidney_facs.h5ad"
    adata = ad.read_h5ad(path)
    if "is_ercc" in adata.var:
        adata = adata[:, ~adata.var["is_ercc"].to_numpy(bool)].copy()
    adata.layers["counts"] = adata.X.copy()
    return adata


def levine32(path: str | os.PathLike | None = None, cofactor: float = 5.0) -> ad.AnnData:
    """Levine_32dim CyTOF subset (1,500 cells x 32 markers), ``arcsinh(x / cofactor)`` in ``X``.

    The raw intensities are kept in ``layers["raw"]``; ``obs["population"]`` holds the gated
    populations (including ``"unassigned"``).
    """
    if (
        isinstance(cofactor, bool)
        or not isinstance(cofactor, int | float | np.number)
        or not np.isfinite(cofactor)
        or cofactor <= 0
    ):
        raise ValueError(f"cofactor must be a positive finite number, got {cofactor!r}.")
    path = Path(path) if path is not None else shared_data_dir() / "levine32_cytof_subset.h5ad"
    adata = ad.read_h5ad(path)
    raw = np.asarray(adata.X, dtype=np.float32)
    adata.layers["raw"] = raw.copy()
    adata.X = np.arcsinh(raw / cofactor).astype(np.float32)
    return adata


def tabula_muris(path: str | os.PathLike, annotations: str | os.PathLike | None = None):
    """Tabula Muris FACS or droplet data from a local path (nothing is downloaded).

    Parameters
    ----------
    path
        An ``.h5ad`` file, or a folder of per-organ count CSVs as published on figshare
        (``<Organ>-counts.csv``: genes x cells, first column gene names).
    annotations
        Optional CSV of cell annotations (``cell`` column plus e.g. ``tissue``,
        ``cell_ontology_class``), joined onto ``obs``.

    Returns
    -------
    AnnData with raw counts in ``X`` and ``obs["tissue"]`` from the file names for CSV input.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. {tabula_muris_download_help()}")
    if path.is_file():
        adata = ad.read_h5ad(path)
    else:
        files = sorted(path.glob("*-counts.csv"))
        if not files:
            raise FileNotFoundError(f"No '*-counts.csv' files in {path}.")
        parts = []
        for f in files:
            df = pd.read_csv(f, index_col=0)
            part = ad.AnnData(sparse.csr_matrix(df.T.to_numpy(dtype=np.float32)))
            part.obs_names = df.columns.astype(str)
            part.var_names = df.index.astype(str)
            part.obs["tissue"] = f.name.removesuffix("-counts.csv")
            parts.append(part)
        adata = ad.concat(parts, join="outer", fill_value=0)
    if annotations is not None:
        ann = pd.read_csv(annotations)
        key = "cell" if "cell" in ann.columns else ann.columns[0]
        ann = ann.set_index(key)
        ann.index = ann.index.astype(str)
        repeated = ann.index[ann.index.duplicated()].unique()
        if len(repeated):
            raise ValueError(
                f"{annotations} lists {len(repeated)} cell(s) more than once (e.g. "
                f"{list(repeated[:5])}); each cell needs one annotation row."
            )
        adata.obs = adata.obs.join(ann.drop(columns=["tissue"], errors="ignore"), how="left")
    return adata


def tabula_muris_download_help() -> str:
    """Where to get the public Tabula Muris files (for users with a network)."""
    return (
        "The Tabula Muris FACS and droplet count matrices are public on figshare (Tabula Muris "
        "Consortium, 2018; FACS: article 5715040, droplet: 5715025). Download and unpack them, "
        "then pass the folder of '<Organ>-counts.csv' files (or an .h5ad) to "
        "scmoesim.datasets.tabula_muris()."
    )
