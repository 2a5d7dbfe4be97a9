"""Weakly supervised clustering with marker-gene signatures (issue: the MoESim model).

Runs MoESim with default settings on

* Tabula Muris kidney FACS (shared data) with six kidney cell-type signatures
  (``scmoesim.datasets.KIDNEY_SIGNATURES``), scored on the annotated cells against
  ``cell_type``;
* scanpy's ``pbmc68k_reduced`` with PBMC signatures (``scmoesim.datasets.PBMC_SIGNATURES``),
  scored against ``bulk_labels``;

next to k-means told the true K on PCA, over several seeds, and writes a Markdown table.

Usage::

    python benchmarks/signatures.py --seeds 0 1 2 --out benchmarks/results_signatures.md
"""

import argparse
import time
import warnings

import numpy as np
import pandas as pd
import scvi
import torch

import scmoesim
from _common import environment, kidney_signature_data, kmeans, log_pca
from scmoesim import datasets, metrics

warnings.filterwarnings("ignore")


def _scores(truth, pred) -> dict:
    rep = metrics.mean_f1_report(truth, pred)
    return {k: rep[k] for k in ("f_measure", "nmi", "ari", "hungarian_f1", "n_clusters")}


def run_kidney(seed: int, model_kwargs: dict, epochs: int | None) -> list[dict]:
    adata = kidney_signature_data()
    truth = adata.obs["cell_type"].astype(str)
    annotated = (truth != "unannotated").to_numpy()
    rows = []
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, layer="counts", signatures=datasets.KIDNEY_SIGNATURES)
    model = scmoesim.MoESim(adata, n_experts=7, **model_kwargs)
    t0 = time.time()
    model.train(max_epochs=epochs, enable_progress_bar=False)
    pred = np.asarray(model.predict()).astype(str)
    rows.append(
        {
            "dataset": "TM kidney",
            "method": "MoESim (signatures)",
            "seed": seed,
            "seconds": time.time() - t0,
            **_scores(truth[annotated], pred[annotated]),
        }
    )
    pcs = log_pca(adata, "counts")
    km = kmeans(pcs[annotated], 6, seed)
    rows.append(
        {
            "dataset": "TM kidney",
            "method": "k-means (true K) on PCA",
            "seed": seed,
            **_scores(truth[annotated], km),
        }
    )
    return rows


def run_pbmc(seed: int, model_kwargs: dict, epochs: int | None) -> list[dict]:
    adata = datasets.pbmc68k_reduced()
    truth = adata.obs["bulk_labels"].astype(str)
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, signatures=datasets.PBMC_SIGNATURES)
    model = scmoesim.MoESim(adata, likelihood="normal", **model_kwargs)
    t0 = time.time()
    model.train(max_epochs=epochs, enable_progress_bar=False)
    pred = np.asarray(model.predict()).astype(str)
    rows = [
        {
            "dataset": "pbmc68k_reduced",
            "method": "MoESim (signatures)",
            "seed": seed,
            "seconds": time.time() - t0,
            **_scores(truth, pred),
        }
    ]
    km = kmeans(adata.obsm["X_pca"], truth.nunique(), seed)
    rows.append(
        {
            "dataset": "pbmc68k_reduced",
            "method": "k-means (true K) on PCA",
            "seed": seed,
            **_scores(truth, km),
        }
    )
    return rows


def _run(task: tuple) -> list[dict]:
    name, seed, model_kwargs, epochs, threads = task
    torch.set_num_threads(threads)
    return {"kidney": run_kidney, "pbmc": run_pbmc}[name](seed, model_kwargs, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["kidney", "pbmc"])
    parser.add_argument("--epochs", type=int, default=None, help="default: scvi heuristic")
    parser.add_argument("--kl", default=None, help="override the KL kind (mixture|paper)")
    parser.add_argument("--model-kwargs", default="{}", help="extra MoESim kwargs as JSON")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids a spinning OMP worker)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    args = parser.parse_args()
    import json

    model_kwargs = json.loads(args.model_kwargs)
    if args.kl:
        model_kwargs["kl"] = args.kl
    torch.set_num_threads(args.threads)
    tasks = [
        (name, seed, model_kwargs, args.epochs, args.threads)
        for seed in args.seeds
        for name in args.datasets
    ]
    rows = []
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forked workers inherit torch's OpenMP state and ran ~10x slower here
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            for result in pool.map(_run, tasks):
                rows += result
                print(pd.DataFrame(result).to_string(), flush=True)
    else:
        for task in tasks:
            rows += _run(task)
            print(pd.DataFrame(rows).tail(2).to_string(), flush=True)
    df = pd.DataFrame(rows)
    summary = df.groupby(["dataset", "method"]).agg(
        {c: ["mean", "std"] for c in ("f_measure", "nmi", "ari", "n_clusters")}
    )
    summary.columns = [f"{a} {b}" for a, b in summary.columns]
    text = (
        "# Signature benchmark\n\n"
        f"Command: `python signatures.py --seeds {' '.join(map(str, args.seeds))}"
        f"{' --kl ' + args.kl if args.kl else ''}"
        f"{' --model-kwargs ' + repr(args.model_kwargs) if model_kwargs else ''}`\n\n"
        f"Environment: {environment()}\n\n"
        f"Model settings: defaults{', ' + str(model_kwargs) if model_kwargs else ''}\n\n"
        "## Mean and standard deviation over seeds\n\n"
        + summary.round(3).to_markdown()
        + "\n\n## All runs\n\n"
        + df.round(3).to_markdown(index=False)
        + "\n"
    )
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
