"""Restarts: does a label-free loss pick the better of several MoESim initialisations?

For each dataset, one UMAP (``random_state=0``) and one registration; then ``--seeds`` models
with default settings, differing only in ``scvi.settings.seed`` (what ``train(n_restarts=...)``
varies). Every run records its scores against the labels and three label-free criteria:

* ``similarity_loss``: what ``train(n_restarts=...)`` minimises
  (``scmoesim.model._restarts.clustering_objective``: the similarity loss of the trained
  model over fixed minibatches of all cells, latent means into the gate);
* ``last_epoch_similarity``: the training history's last ``similarity_loss_train`` (the
  epoch's mean over its shuffled minibatches, while the weights still move);
* ``total_loss``: the whole training loss (reconstruction + KL + clustering) over the same
  fixed minibatches, in evaluation mode;
* ``agreement``: minus the run's mean ARI (over all cells, no labels) with the other runs it
  is compared with, so the run most like the others is picked (the medoid partition, as in
  consensus clustering); unlike the others it depends on which runs are compared.

The summary gives, for each criterion and k, the expected score of the run a criterion picks
among k runs (the mean over every k-subset of the seeds), next to one run's mean and the best
run (picked with the labels).

Usage::

    python restarts.py --datasets levine32 pbmc68k_reduced --seeds 0 1 2 3 4 5 6 7 --jobs 2 \
        --out results_restarts.md
"""

# ruff: noqa: E402, I001
import suite  # first: one thread per process, before numpy and torch start

import argparse
import itertools
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import scvi
import torch
from _common import environment
from scipy import stats

import scmoesim
from scmoesim import _constants as K
from scmoesim import metrics
from scmoesim.model._restarts import _OBJECTIVE_SEED, clustering_objective

CRITERIA = ("similarity_loss", "last_epoch_similarity", "total_loss", "agreement")
SCORES = ("hungarian_f1", "ari", "nmi")
_PREPARED: dict = {}


@torch.inference_mode()
def total_loss(model: scmoesim.MoESim, batch_size: int) -> float:
    """The training loss in evaluation mode, over the objective's fixed minibatches."""
    module = model.module
    module.eval()
    n = model.adata.n_obs
    size = max(2, min(batch_size, n))
    order = np.random.default_rng(_OBJECTIVE_SEED).permutation(n)
    torch.manual_seed(0)  # the latent draws, the same for every run
    total, cells = 0.0, 0
    for tensors in model._batches(None, order, size):
        m = tensors[K.X_KEY].shape[0]
        if m < size:
            continue
        _, _, loss = module(tensors)
        total += float(loss.loss) * m
        cells += m
    return total / cells


def prepared(name: str):
    """The dataset with its UMAP, computed once per process."""
    if name not in _PREPARED:
        ds = suite.BUILTIN[name]()
        adata = ds.adata.copy()
        scmoesim.pp.umap_embedding(adata, use_rep=ds.umap_rep, random_state=0)
        _PREPARED[name] = (ds, adata)
    return _PREPARED[name]


def run(name: str, seed: int) -> dict:
    ds, umap_adata = prepared(name)
    adata = umap_adata.copy()
    t0 = time.time()
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, layer=ds.layer, embedding_key="X_umap")
    model = scmoesim.MoESim(adata, likelihood=ds.likelihood)
    model.train(enable_progress_bar=False)
    seconds = time.time() - t0
    pred = np.asarray(model.predict()).astype(str)
    truth, keep = ds.truth[ds.keep], pred[ds.keep]
    return {
        "dataset": name,
        "seed": seed,
        "hungarian_f1": metrics.hungarian_f1(truth, keep),
        "ari": metrics.ari(truth, keep),
        "nmi": metrics.nmi(truth, keep),
        "clusters": model.effective_n_clusters(),
        "similarity_loss": clustering_objective(model, 256)[0],
        "last_epoch_similarity": float(model.history["similarity_loss_train"].iloc[-1, 0]),
        "total_loss": total_loss(model, 256),
        "seconds": seconds,
        "labels": pred,
    }


def agreement(runs: pd.DataFrame) -> np.ndarray:
    """ARI between every two runs' clusters, over all cells."""
    labels = list(runs["labels"])
    n = len(labels)
    a = np.eye(n)
    for i, j in itertools.combinations(range(n), 2):
        a[i, j] = a[j, i] = metrics.ari(labels[i], labels[j])
    return a


def pick(crit: str, c: np.ndarray, a: np.ndarray, subset: list[int]) -> int:
    """Index (into the dataset's runs) of the run ``crit`` picks among ``subset``."""
    if crit == "agreement":
        return subset[int(np.argmax(a[np.ix_(subset, subset)].sum(axis=1)))]
    return subset[int(np.argmin(c[subset]))]


def picks(runs: pd.DataFrame, ks: list[int]) -> pd.DataFrame:
    """Expected score of the run each criterion picks among k runs, per dataset."""
    rows = []
    for name, df in runs.groupby("dataset", sort=False):
        for score in SCORES:
            v = df[score].to_numpy()
            row = {"dataset": name, "score": score, "one run": v.mean(), "best run": v.max()}
            a = agreement(df)
            for crit in CRITERIA:
                c = -(a.sum(axis=1) - 1) if crit == "agreement" else df[crit].to_numpy()
                for k in ks:
                    if k > len(v):
                        continue
                    chosen = [
                        v[pick(crit, c, a, list(s))]
                        for s in itertools.combinations(range(len(v)), k)
                    ]
                    row[f"{crit}, best of {k}"] = np.mean(chosen)
                row[f"{crit}: Spearman"] = stats.spearmanr(-c, v).statistic
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(suite.BUILTIN))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5], help="restarts compared")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    unknown = set(opts.datasets) - set(suite.BUILTIN)
    if unknown:
        parser.error(f"unknown datasets {sorted(unknown)}; built in: {list(suite.BUILTIN)}")
    if len(opts.seeds) < 2 or any(k < 2 for k in opts.k):
        parser.error("need at least two seeds, and every --k at least 2")
    t0 = time.time()
    tasks = [(name, seed) for name in opts.datasets for seed in opts.seeds]
    with ProcessPoolExecutor(opts.jobs) as ex:
        rows = list(ex.map(run, *zip(*tasks, strict=True)))
    runs = pd.DataFrame(rows)
    table = picks(runs, opts.k)
    runs["agreement"] = np.concatenate(
        [
            (agreement(df).sum(axis=1) - 1) / max(len(df) - 1, 1)
            for _, df in runs.groupby("dataset", sort=False)
        ]
    )
    runs = runs.drop(columns="labels")
    text = "\n".join(
        [
            "# Restarts: picking the best of several initialisations without labels",
            "",
            f"Command: `python {shlex.join(sys.argv)}` ({(time.time() - t0) / 60:.1f} min)",
            "",
            f"Environment: {environment()}",
            "",
            "One UMAP per dataset (random_state=0), default MoESim settings, runs differing "
            "only in `scvi.settings.seed`. Criteria (lower picks): "
            + ", ".join(f"`{c}`" for c in CRITERIA)
            + " (see the script's docstring; for `agreement` the run with the highest mean ARI "
            "with the others compared is picked, and the table of every run gives its mean "
            "ARI with all other seeds). `best of k`: the mean score of the run the "
            "criterion picks, over every k-subset of the seeds; `best run`: picked with the "
            "labels; `Spearman`: rank correlation of minus the criterion with the score.",
            "",
            "## Expected score of the picked run",
            "",
            table.round(3).to_markdown(index=False),
            "",
            "## Every run",
            "",
            runs.round(4).to_markdown(index=False),
            "",
        ]
    )
    print(text)
    if opts.out:
        with open(opts.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
