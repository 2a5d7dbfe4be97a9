"""Is the gate's gap to Leiden in the similarity loss or in its optimisation?

Trains MoESim on one dataset with the kNN graph that PCA + Leiden clusters (``graph_key``, no
embedding) in a single minibatch of all cells, so that every cell sees all of its graph
neighbours, once per ``--resolutions`` value; then scores the gate's partitions, Leiden's and the
truth with the pair loss itself on that graph, for hard assignments: ``cut similar pairs + w *
joined dissimilar pairs`` with ``w = r * n_similar / n_dissimilar`` (``dissimilar_weight``, the
weighting of ``scmoesim.module.similarity_bce``; with one-hot gates its clamped BCE is
proportional to this).

The loss's own optimum is found too: for hard assignments, ``cut + w * joined`` is, up to a
constant, minus the constant Potts model (CPM) quality of the partition on that graph with
resolution ``gamma = w / (1 + w)``, which Leiden optimises (``leidenalg.CPMVertexPartition``,
best of five seeds). Its agreement with the truth is the most any optimiser of the pair loss
can reach on this graph. Recorded in ``results_exploration.md`` (2026-12-04).

Usage::

    python pair_objective.py --dataset pbmc68k_reduced --resolutions 4 1 --epochs 1000
    python pair_objective.py --dataset mnist --resolutions --scores-at 0.5 1 2 4 8  # optima only
"""

# ruff: noqa: E402, I001
# suite first: it sets the thread counts before numpy, torch and numba start their pools
from suite import BUILTIN

import argparse
import sys
import time

import igraph as ig
import leidenalg
import numpy as np
import pandas as pd
import scvi
import torch

import scmoesim
from _common import leiden
from scmoesim import metrics
from scmoesim.module._losses import dissimilar_weight


def cut_and_joined(adjacency: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Similar pairs split and dissimilar pairs joined by a hard partition (no self-pairs)."""
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    within = adjacency[same].sum()
    return float(adjacency.sum() - within), float(same.sum() - within)


def weight(adjacency: np.ndarray, resolution: float) -> float:
    """The loss's weight of a dissimilar pair for this graph (``dissimilar_weight``)."""
    n = len(adjacency)
    n_similar = torch.tensor(adjacency.sum())
    return float(dissimilar_weight(resolution, n_similar, torch.tensor(float(n * (n - 1)))))


def pair_loss(adjacency: np.ndarray, labels: np.ndarray, resolution: float) -> float:
    """``cut + w * joined`` of a hard partition on a binary graph."""
    cut, joined = cut_and_joined(adjacency, labels)
    return cut + weight(adjacency, resolution) * joined


def pair_loss_optimum(adjacency: np.ndarray, resolution: float, seeds: int = 5) -> np.ndarray:
    """The partition of least :func:`pair_loss`: Leiden on the CPM at ``w / (1 + w)``."""
    w = weight(adjacency, resolution)
    src, dst = np.nonzero(np.triu(adjacency, 1))
    graph = ig.Graph(n=len(adjacency), edges=list(zip(src.tolist(), dst.tolist(), strict=True)))
    candidates = [
        np.asarray(
            leidenalg.find_partition(
                graph,
                leidenalg.CPMVertexPartition,
                resolution_parameter=w / (1 + w),
                n_iterations=-1,
                seed=seed,
            ).membership
        ).astype(str)
        for seed in range(seeds)
    ]
    return min(candidates, key=lambda labels: pair_loss(adjacency, labels, resolution))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="pbmc68k_reduced", choices=list(BUILTIN))
    parser.add_argument(
        "--resolutions",
        type=float,
        nargs="*",
        default=[4.0, 1.0],
        help="train a gate at each of these similarity_resolution values (none: optima only)",
    )
    parser.add_argument(
        "--scores-at",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 4.0],
        help="score every partition at these resolutions, and find the loss's optimum at each",
    )
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ds = BUILTIN[args.dataset]()
    adata = ds.adata.copy()
    scmoesim.pp.neighbors(adata, use_rep="X_pca")  # the graph PCA + Leiden clusters
    adjacency = (adata.obsp["connectivities"] > 0).toarray()
    np.fill_diagonal(adjacency, False)
    adjacency = adjacency.astype(np.float64)

    partitions = {"truth": ds.truth.astype(str), "PCA + Leiden": leiden(ds.pca, args.seed)}
    scmoesim.MoESim.setup_anndata(adata, layer=ds.layer, graph_key="connectivities")
    for r in args.resolutions:
        scvi.settings.seed = args.seed
        model = scmoesim.MoESim(adata, likelihood=ds.likelihood, similarity_resolution=r)
        start = time.perf_counter()
        model.train(
            max_epochs=args.epochs,
            batch_size=adata.n_obs,
            train_size=1.0,
            enable_progress_bar=False,
        )
        print(f"r = {r:g}: trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        partitions[f"gate trained at r = {r:g}"] = np.asarray(model.predict()).astype(str)

    for r in args.scores_at:
        partitions[f"pair-loss optimum at r = {r:g}"] = pair_loss_optimum(adjacency, r)

    rows = []
    for name, labels in partitions.items():
        row = {
            "partition": name,
            "ARI": round(metrics.ari(ds.truth[ds.keep], labels[ds.keep]), 3),
            "NMI": round(metrics.nmi(ds.truth[ds.keep], labels[ds.keep]), 3),
            "K": len(set(labels[ds.keep])),
        }
        cut, joined = cut_and_joined(adjacency, labels)
        for r in args.scores_at:
            row[f"loss at r = {r:g}"] = round(cut + weight(adjacency, r) * joined)
        rows.append(row)
    trained = f", gates: {args.epochs} epochs in one minibatch" if args.resolutions else ""
    print(f"{args.dataset}, seed {args.seed}{trained}")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
