"""Effective number of clusters on synthetic Gaussian mixtures (paper, Appendix B.1).

Data: mixtures of ``K`` Gaussians in 100 dimensions with randomly drawn means, per-component
diagonal scales and mixing weights. Model: ``MoESim`` with 40 experts, Gaussian likelihood and the
unsupervised kNN similarity on the paper's UMAP projection (``scmoesim.pp.umap_embedding``),
everything else at its default. Reported: the effective number of clusters (experts that keep
cells, ``model.effective_n_clusters()``) next to the true ``K``, with ARI and NMI. With
``--two-stage``, also Leiden on the model's latent and a second 40-expert model trained with those
clusters as ``labels_key`` (its effective number of clusters and ARI).

Usage::

    python benchmarks/synthetic.py --components 2 3 5 8 10 12 15 --seeds 0 \
        --out benchmarks/results_synthetic.md
"""

import argparse
import json
import shlex
import sys
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scvi
import torch

import scmoesim
from _common import environment, fit_on_clusters, leiden
from scmoesim import metrics

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

N_FEATURES = 100
N_EXPERTS = 40


def gaussian_mixture(
    n_components: int, n_per_component: int, seed: int, n_features: int = N_FEATURES
) -> ad.AnnData:
    """Cells from a random Gaussian mixture; ``obs["component"]`` holds the truth.

    Means ~ N(0, 1) per dimension, per-component diagonal standard deviations ~ U(0.5, 1.5),
    mixing weights ~ Dirichlet(5) (so components differ in size, none is tiny).
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_components, n_features))
    scales = rng.uniform(0.5, 1.5, size=(n_components, n_features))
    weights = rng.dirichlet(np.full(n_components, 5.0))
    n = n_components * n_per_component
    labels = rng.choice(n_components, size=n, p=weights)
    x = means[labels] + scales[labels] * rng.normal(size=(n, n_features))
    adata = ad.AnnData(x.astype(np.float32))
    adata.obs["component"] = pd.Categorical(labels.astype(str))
    return adata


def run_one(n_components: int, seed: int, args) -> dict:
    adata = gaussian_mixture(n_components, args.cells_per_component, seed)
    t0 = time.time()
    if args.embedding == "umap":
        scmoesim.pp.umap_embedding(adata, use_rep="X", random_state=seed)
        key = "X_umap"
    else:
        adata.obsm["X_data"] = adata.X.copy()
        key = "X_data"
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, embedding_key=key)
    model = scmoesim.MoESim(adata, n_experts=N_EXPERTS, likelihood="normal", **args.model_kwargs)
    model.train(max_epochs=args.max_epochs, enable_progress_bar=False, **args.train_kwargs)
    pred = np.asarray(model.predict()).astype(str)
    truth = adata.obs["component"].astype(str).to_numpy()
    usage = model.expert_usage().to_numpy()
    raw = {
        "true K": n_components,
        "seed": seed,
        "cells": adata.n_obs,
        "effective K": model.effective_n_clusters(),
        "clusters >= 1% of cells": model.effective_n_clusters(min_cells=max(1, adata.n_obs // 100)),
        "ARI": metrics.ari(truth, pred),
        "NMI": metrics.nmi(truth, pred),
        "largest clusters": ", ".join(str(u) for u in sorted(usage[usage > 0], reverse=True)),
    }
    if args.two_stage:
        raw.update(two_stage(adata, model, truth, seed, args))
    # the same model after merge_clusters (greedy modularity on the kNN graph of its embedding)
    model.merge_clusters(resolution=args.merge_resolution)
    merged = np.asarray(model.predict()).astype(str)
    return {
        **raw,
        "merged K": model.effective_n_clusters(),
        "merged ARI": metrics.ari(truth, merged),
        "merged NMI": metrics.nmi(truth, merged),
        "seconds": round(time.time() - t0),
    }


def two_stage(adata: ad.AnnData, model: scmoesim.MoESim, truth, seed: int, args) -> dict:
    """Leiden on the model's latent, then those clusters as labels of a second 40-expert model."""
    clusters = leiden(model.get_latent_representation(), seed)
    second = fit_on_clusters(
        adata, clusters, seed, args.max_epochs, n_experts=N_EXPERTS, likelihood="normal"
    )
    pred = np.asarray(second.predict()).astype(str)
    return {
        "latent Leiden K": len(set(clusters)),
        "latent Leiden ARI": metrics.ari(truth, clusters),
        "two-stage K": second.effective_n_clusters(),
        "two-stage ARI": metrics.ari(truth, pred),
    }


def to_markdown(df: pd.DataFrame, command: str, args) -> str:
    lines = [
        "# Effective number of clusters on Gaussian mixtures (paper Appendix B.1)",
        "",
        f"Command: `{command}`",
        "",
        f"Environment: {environment()}",
        "",
        f"MoESim with {N_EXPERTS} experts, Gaussian likelihood, kNN similarity on "
        + ("the UMAP projection" if args.embedding == "umap" else "the data themselves")
        + f", other settings default; {N_FEATURES}-dimensional mixtures.",
        "",
        f"Extra model settings: {args.model_kwargs or 'none'}; "
        f"training settings: {args.train_kwargs or 'default'}.",
        "",
        *(
            [
                "Two-stage columns: Leiden (resolution 1) on that model's latent, and a second "
                f"model ({N_EXPERTS} experts, default settings) trained with those clusters as "
                "`labels_key`, scored by its gate.",
                "",
            ]
            if args.two_stage
            else []
        ),
        df.to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--components", type=int, nargs="+", default=[2, 3, 5, 8, 10, 12, 15])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cells-per-component", type=int, default=150)
    parser.add_argument("--embedding", choices=["umap", "data"], default="umap")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--model-kwargs", default="{}", help="extra MoESim kwargs as JSON")
    parser.add_argument(
        "--train-kwargs", default="{}", help="extra MoESim.train kwargs as JSON (batch_size, ...)"
    )
    parser.add_argument(
        "--merge-resolution", type=float, default=1.0, help="resolution of merge_clusters"
    )
    parser.add_argument(
        "--two-stage",
        action="store_true",
        help="also Leiden on the latent, and a second model trained on those clusters as labels",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.model_kwargs = json.loads(args.model_kwargs)
    args.train_kwargs = json.loads(args.train_kwargs)
    rows = []
    for k in args.components:
        for seed in args.seeds:
            rows.append(run_one(k, seed, args))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    if args.out:
        command = "python " + shlex.join(sys.argv)
        with open(args.out, "w") as fh:
            fh.write(to_markdown(df, command, args))


if __name__ == "__main__":
    main()
