"""Generation benchmark (issue: realistic expert-generated cells of any cluster, fast).

On the Tabula Muris kidney model trained with signatures exactly as ``signatures.py`` sets it up
(default model settings, ``n_experts=7``, seed 0; models cached in ``--cache``):

a. accuracy: N generated cells per cluster, classified back by the model's encoder + gate and
   by a logistic regression trained on the real cells' cluster labels (log-normalised counts);
b. realism: MMD^2 (RBF, PCA space of the real data) generated-vs-real of the same cluster
   against real-vs-real of the other clusters; ``sc.tl.rank_genes_groups`` markers recovered;
c. latent separation (paper): MMD^2 between latent samples of the same vs different cell types,
   default model vs ``clustering_weight=0`` (no similarity loss);
d. speed: a VaDE-style rejection sampler (mixture sample, keep when the gate posterior of the
   requested cluster >= 0.999) vs ``generate``; throughput and peak memory of ``generate``.

Usage::

    python benchmarks/generation.py --out benchmarks/results_generation.md
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import scvi
import torch
from anndata import AnnData
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

import scmoesim
from _common import environment, select_genes
from scmoesim import datasets, metrics

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- models
def kidney_adata() -> AnnData:
    """The kidney data exactly as ``signatures.py`` prepares it (2,000 HVGs + markers)."""
    adata = datasets.tabula_muris_kidney()
    markers = [g for gs in datasets.KIDNEY_SIGNATURES.values() for g in gs]
    return select_genes(adata, 2000, markers)


def kidney_model(cache: Path, seed: int, epochs: int | None, **model_kwargs):
    """Signature model as in ``signatures.py`` (default settings), trained once and cached."""
    adata = kidney_adata()
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, layer="counts", signatures=datasets.KIDNEY_SIGNATURES)
    tag = "_".join(f"{k}={v}" for k, v in sorted(model_kwargs.items())) or "default"
    path = cache / f"kidney_seed{seed}_epochs{epochs}_{tag}"
    if (path / "model.pt").is_file():
        return scmoesim.MoESim.load(str(path), adata=adata), adata
    model = scmoesim.MoESim(adata, n_experts=7, **model_kwargs)
    model.train(max_epochs=epochs, enable_progress_bar=False)
    model.save(str(path), overwrite=True)
    return model, adata


def lognorm(x) -> np.ndarray:
    """log1p(1e4 x / total), dense float64."""
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    x = x.astype(np.float64)
    return np.log1p(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1.0))


# ---------------------------------------------------------------- (a) + (b)
def accuracy_and_realism(model, adata, n_per_cluster: int, seed: int) -> tuple[list, list, dict]:
    real_cluster = np.asarray(model.predict()).astype(str)
    used = [c for c, n in model.expert_usage().items() if n > 0]
    gen = model.generate({c: n_per_cluster for c in used}, seed=seed)
    gen_cluster = gen.obs["moesim_cluster"].astype(str).to_numpy()

    # the model's own encoder + gate
    gen_in = AnnData(gen.X.astype(np.float32), var=gen.var[[]])
    gen_in.layers["counts"] = gen_in.X
    model_pred = np.asarray(model.predict(gen_in)).astype(str)

    # an independent classifier on the real cells' cluster labels
    x_real, x_gen = lognorm(adata.layers["counts"]), lognorm(gen.X)
    mean, sd = x_real.mean(0), x_real.std(0) + 1e-6
    z_real, z_gen = (x_real - mean) / sd, (x_gen - mean) / sd
    clf = LogisticRegression(max_iter=3000, C=0.1)
    cv = cross_val_score(clf, z_real, real_cluster, cv=5).mean()
    clf.fit(z_real, real_cluster)
    clf_pred = clf.predict(z_gen)

    # realism: PCA of the real data, one kernel bandwidth for every comparison
    pca = PCA(n_components=50, random_state=0).fit(np.clip(z_real, -10, 10))
    p_real, p_gen = pca.transform(np.clip(z_real, -10, 10)), pca.transform(np.clip(z_gen, -10, 10))
    gamma = metrics._median_heuristic_gamma(p_real)
    real_markers = _markers(x_real, real_cluster, used)
    gen_markers = _markers(x_gen, gen_cluster, used)
    rows, real_rows = [], []
    for c in used:
        g, r = gen_cluster == c, real_cluster == c
        mmd_same = metrics.mmd2_unbiased(p_gen[g], p_real[r], gamma=gamma)
        others = {
            o: metrics.mmd2_unbiased(p_real[r], p_real[real_cluster == o], gamma=gamma)
            for o in used
            if o != c and (real_cluster == o).sum() > 1
        }
        nearest = min(others, key=others.get)
        overlap = len(set(real_markers[c]) & set(gen_markers[c]))
        rows.append(
            {
                "cluster": c,
                "real cells": int(r.sum()),
                "generated": int(g.sum()),
                "model gate: in cluster": float((model_pred[g] == c).mean()),
                "logreg: in cluster": float((clf_pred[g] == c).mean()),
                "MMD2 gen vs real (same)": mmd_same,
                "min MMD2 real vs other real": others[nearest],
                "nearest other": nearest,
                "markers recovered /20": overlap,
                "real density": float((adata.layers["counts"][r] > 0).mean()),
                "gen density": float((gen.X[g] > 0).mean()),
                "real median library": float(np.median(np.asarray(adata.layers["counts"][r].sum(1)))),
                "gen median library": float(np.median(np.asarray(gen.X[g].sum(1)))),
            }
        )
        real_rows.append({"cluster": c, "top real markers": ", ".join(real_markers[c][:8])})
    return rows, real_rows, {"logreg 5-fold CV accuracy on real cells": float(cv)}


def _markers(x: np.ndarray, groups: np.ndarray, clusters: list[str], n: int = 20) -> dict:
    ad = AnnData(x.astype(np.float32))
    ad.obs["g"] = pd.Categorical(groups)
    sc.tl.rank_genes_groups(ad, "g", method="wilcoxon", n_genes=n)
    names = ad.uns["rank_genes_groups"]["names"]
    return {c: [str(v) for v in names[c]] for c in clusters if c in names.dtype.names}


# ---------------------------------------------------------------- (c)
def latent_separation(model, adata, seed: int) -> dict:
    """Paper: MMD^2 between latent samples of the same vs different (annotated) cell types."""
    rng = np.random.default_rng(seed)
    z = model.get_latent_representation(give_mean=False)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    types = [t for t in np.unique(truth) if t != "unannotated"]
    same, diff = [], []
    for i, a in enumerate(types):
        za = z[truth == a]
        half = rng.permutation(len(za))
        same.append(metrics.mmd2_unbiased(za[half[::2]], za[half[1::2]]))
        for b in types[i + 1 :]:
            diff.append(metrics.mmd2_unbiased(za, z[truth == b]))
    return {
        "same type (split halves), mean": float(np.mean(same)),
        "different types, mean": float(np.mean(diff)),
        "different types, min": float(np.min(diff)),
    }


# ---------------------------------------------------------------- (d)
@torch.inference_mode()
def rejection_sampler(model, cluster: str, n_accept: int, max_proposals: int, seed: int):
    """VaDE-style: z from the mixture, decode, encode the generated cell, keep if p(k) >= .999."""
    module = model.module
    module.eval()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    k = model.cluster_names_.index(cluster)
    usage = np.asarray(model.expert_usage_, dtype=float)
    quant = model.library_quantiles_
    accepted = proposals = 0
    t0 = time.perf_counter()
    while accepted < n_accept and proposals < max_proposals:
        n = 4096
        comp = torch.as_tensor(rng.choice(len(usage), size=n, p=usage / usage.sum()))
        lib_q = quant[comp.numpy(), -1]
        lib = np.exp(lib_q[np.arange(n), rng.integers(0, lib_q.shape[1], n)])
        z = module.centres[comp] + torch.randn(n, module.n_latent, generator=gen)
        heads = module.experts(z, comp)  # one decoder evaluation per proposal
        x = torch.as_tensor(lib, dtype=torch.float32)[:, None] * torch.softmax(heads["scale"], -1)
        # The generated cell is taken as its expected counts: cheaper than sampling counts,
        # which favours the baseline.
        p = module.inference(x, use_mean=True)["p"][:, k]
        accepted += int((p >= 0.999).sum())
        proposals += n
    seconds = time.perf_counter() - t0
    return {
        "cluster": cluster,
        "proposals (decoder evaluations)": proposals,
        "accepted": accepted,
        "decoder evaluations per accepted cell": proposals / max(accepted, 1),
        "seconds per accepted cell": seconds / max(accepted, 1),
        "capped": accepted < n_accept,
    }


def throughput(model, n_cells: int, threads: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    out = model.generate(n_cells, seed=seed, store_mean=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "cells": n_cells,
        "genes": out.n_vars,
        "torch threads": threads,
        "wall s": wall,
        "process CPU s": cpu,
        "cells/s (wall)": n_cells / wall,
        "cells/s per CPU-second": n_cells / cpu,
        "load avg (1 min) before": load0,
        "load avg after": os.getloadavg()[0],
        "non-zero fraction": out.X.nnz / (out.n_obs * out.n_vars),
    }


_MEMORY_CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from generation import kidney_model
from pathlib import Path
model, _ = kidney_model(Path({cache!r}), 0, None)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = model.generate({n}, seed=0, store_mean=False, filename={filename!r}, chunk_size=2048)
wall = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nnz = out.X.group["data"].shape[0] if {filename!r} else out.X.nnz
print(json.dumps({{"rss_before_MiB": before / 1024, "peak_rss_MiB": after / 1024,
                  "wall_s": wall, "nnz": int(nnz)}}))
"""


def peak_memory(cache: Path, n_cells: int, to_file: bool) -> dict:
    """Peak RSS of a fresh process that loads the model and generates ``n_cells``."""
    with tempfile.TemporaryDirectory() as tmp:
        filename = str(Path(tmp) / "gen.h5ad") if to_file else None
        code = _MEMORY_CHILD.format(here=str(HERE), cache=str(cache), n=n_cells, filename=filename)
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        out = json.loads(res.stdout.strip().splitlines()[-1])
    dense_gib = n_cells * 2015 * 4 / 2**30
    return {
        "cells": n_cells,
        "output": "backed .h5ad" if to_file else "in memory (CSR)",
        **out,
        "dense float32 matrix would need GiB": dense_gib,
    }


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "scmoesim_gen"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: scvi heuristic")
    parser.add_argument("--n-per-cluster", type=int, default=500)
    parser.add_argument("--reject-accept", type=int, default=100)
    parser.add_argument("--reject-max", type=int, default=200_000)
    parser.add_argument("--speed-cells", type=int, default=20_000)
    parser.add_argument("--memory-cells", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    model, adata = kidney_model(cache, args.seed, args.epochs)
    ablation, adata_abl = kidney_model(cache, args.seed, args.epochs, clustering_weight=0.0)
    print("models ready", model.expert_usage().to_dict(), flush=True)

    acc, real_markers, extra = accuracy_and_realism(model, adata, args.n_per_cluster, args.seed)
    acc = pd.DataFrame(acc)
    print(acc.round(3).to_string(), flush=True)

    sep = pd.DataFrame(
        {
            "default (similarity loss on)": latent_separation(model, adata, args.seed),
            "clustering_weight=0 (ablation)": latent_separation(ablation, adata_abl, args.seed),
        }
    ).T
    sep["ratio different / same"] = (
        sep["different types, mean"] / sep["same type (split halves), mean"].abs()
    )
    print(sep.round(4).to_string(), flush=True)

    rej = pd.DataFrame(
        [
            rejection_sampler(model, c, args.reject_accept, args.reject_max, args.seed)
            for c in acc["cluster"]
        ]
    )
    t0 = time.perf_counter()
    model.generate(len(acc) * args.reject_accept, seed=args.seed, store_mean=False)
    gen_sec = (time.perf_counter() - t0) / (len(acc) * args.reject_accept)
    rej["generate: decoder evaluations per cell"] = 1
    rej["generate: seconds per cell"] = gen_sec
    rej["fewer decoder evaluations (x)"] = rej["decoder evaluations per accepted cell"]
    print(rej.round(5).to_string(), flush=True)

    speed = pd.DataFrame([throughput(model, args.speed_cells, t, args.seed) for t in args.threads])
    torch.set_num_threads(1)
    print(speed.round(2).to_string(), flush=True)
    mem = pd.DataFrame(
        [peak_memory(cache, n, to_file) for n in args.memory_cells for to_file in (True, False)]
    )
    print(mem.round(1).to_string(), flush=True)

    cmd = "python benchmarks/generation.py " + " ".join(sys.argv[1:])
    text = (
        "# Generation benchmark\n\n"
        f"Command: `{cmd}`\n\n"
        f"Environment: {environment()}\n\n"
        f"Total run time: {(time.time() - t_start) / 60:.1f} min. Model: Tabula Muris kidney, "
        "2,000 HVGs + markers, `MoESim(adata, n_experts=7)` with default settings, signatures "
        f"as in `signatures.py`, seed {args.seed}, epochs: "
        f"{args.epochs or 'scvi heuristic'}. Expert usage: {model.expert_usage().to_dict()}\n\n"
        f"## (a) Accuracy and (b) realism, {args.n_per_cluster} generated cells per cluster\n\n"
        + acc.round(4).to_markdown(index=False)
        + "\n\n"
        + "\n".join(f"* {k}: {v:.3f}" for k, v in extra.items())
        + "\n\nTop real-cell markers (wilcoxon):\n\n"
        + pd.DataFrame(real_markers).to_markdown(index=False)
        + "\n\n## (c) Latent separation: MMD^2 between latent samples (annotated cell types)\n\n"
        + sep.round(4).to_markdown()
        + "\n\n## (d) Rejection sampler (posterior >= 0.999) vs generate\n\n"
        + rej.round(5).to_markdown(index=False)
        + "\n\n## Throughput of generate (store_mean=False)\n\n"
        + speed.round(2).to_markdown(index=False)
        + "\n\n## Peak memory (fresh process: load model + generate, store_mean=False)\n\n"
        + mem.round(1).to_markdown(index=False)
        + "\n"
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
