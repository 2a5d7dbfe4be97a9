"""Generation benchmark (issue: realistic expert-generated cells of any cluster, fast).

On the Tabula Muris kidney model trained with signatures exactly as ``signatures.py`` sets it up
(default model settings, ``n_experts=7``, seed 0; models cached in ``--cache``):

a. accuracy: N generated cells per cluster, classified back by the model's encoder + gate and
   by a logistic regression trained on the real cells' cluster labels (log-normalised counts);
b. realism: MMD^2 (RBF, PCA space of the real data) generated-vs-real of the same cluster
   against real-vs-real of the other clusters; ``sc.tl.rank_genes_groups`` markers recovered,
   on the N per cluster and on cells generated in the training proportions (the real data's
   make-up, so that "the rest" each cluster is compared with is the same on both sides);
c. latent separation (paper): MMD^2 between latent samples of the same vs different cell types,
   default model vs ``clustering_weight=0`` (no similarity loss);
d. speed: a VaDE-style rejection sampler (mixture sample, keep when the gate posterior of the
   requested cluster >= 0.999) vs ``generate``; throughput and peak memory of ``generate``.

Usage::

    python benchmarks/generation.py --out benchmarks/results_generation.md
"""

import argparse
import ast
import hashlib
import inspect
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
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_score

import scmoesim
from _common import environment, kidney_signature_data
from scmoesim import datasets, metrics

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
#: Cells generated in the training proportions for the marker comparison, per real cell.
PROPORTIONAL_SCALE = 10


# ---------------------------------------------------------------- models
def kidney_adata() -> AnnData:
    """The kidney data exactly as ``signatures.py`` prepares it (2,000 HVGs + markers)."""
    return kidney_signature_data()


def model_settings(**model_kwargs) -> dict:
    """``MoESim``'s keyword defaults as the code defines them now, updated with ``model_kwargs``."""
    params = inspect.signature(scmoesim.MoESim.__init__).parameters.values()
    settings = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    unknown = set(model_kwargs) - set(settings)
    if unknown:
        raise ValueError(f"MoESim has no setting(s) {sorted(unknown)}.")
    return {**settings, **model_kwargs}


def kidney_model(cache: Path, seed: int, epochs: int | None, **model_kwargs):
    """Signature model as in ``signatures.py`` (default settings), trained once and cached.

    The cache key includes a hash of every model setting (the code's current defaults plus
    ``model_kwargs``), so a changed default trains a new model.
    """
    adata = kidney_adata()
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, layer="counts", signatures=datasets.KIDNEY_SIGNATURES)
    tag = "_".join(f"{k}={v}" for k, v in sorted(model_kwargs.items())) or "default"
    stem = f"kidney_seed{seed}_epochs{epochs}_{tag}"
    return _cached_model(cache / stem, adata, epochs, n_experts=7, **model_kwargs), adata


def umi_like_model(cache: Path, seed: int, epochs: int = 20):
    """A model of UMI-like synthetic counts, trained once and cached (for the throughput part).

    ``_synthetic.py``'s NB counts: 10,000 cells x 2,000 genes in 10 groups, about 12% non-zero
    and a median library of about 500, the depth of droplet (10x) data. Trained with the group
    labels as similarity (fast; the generation speed depends on the decoder, the density and
    the means, not on the similarity source), ``n_experts=10``, other settings default.
    """
    from _synthetic import SyntheticCounts

    adata = SyntheticCounts(n_genes=2000, n_types=10, seed=seed).anndata(10_000)
    scvi.settings.seed = seed
    scmoesim.MoESim.setup_anndata(adata, labels_key="type")
    stem = f"umi_like_seed{seed}_epochs{epochs}"
    return _cached_model(cache / stem, adata, epochs, n_experts=10), adata


def _cached_model(stem: Path, adata, epochs: int | None, **model_kwargs):
    """Load the model cached under ``stem`` + a hash of every setting, or train and cache it.

    A model cached by an earlier scmoesim, without the fitted latent distributions or the sample
    of training cells' posteriors, gets them from a pass over ``adata`` (its training data), so
    ``generate`` measures the current default.
    """
    settings = model_settings(**model_kwargs)
    digest = hashlib.sha1(repr(sorted(settings.items())).encode()).hexdigest()[:8]
    path = stem.with_name(f"{stem.name}_{digest}")
    if (path / "model.pt").is_file():
        model = scmoesim.MoESim.load(str(path), adata=adata)
        if getattr(model, "latent_cells_", None) is None:
            model._summarise_training_data()
        return model
    model = scmoesim.MoESim(adata, **model_kwargs)
    model.train(max_epochs=epochs, enable_progress_bar=False)
    model.save(str(path), overwrite=True)
    return model


def speed_table(model, adata, n_cells: int, threads: list[int], seed: int) -> pd.DataFrame:
    """``throughput`` twice per thread count, with the real data's density and library size."""
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    rows = [throughput(model, n_cells, t, seed) for t in threads for _ in range(2)]
    set_threads(1)
    table = pd.DataFrame(rows)
    table["real non-zero fraction"] = x.nnz / (x.shape[0] * x.shape[1])
    table["real median library"] = float(np.median(np.asarray(x.sum(1)).ravel()))
    return table


def lognorm(x) -> np.ndarray:
    """log1p(1e4 x / total), dense float64."""
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    x = x.astype(np.float64)
    return np.log1p(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1.0))


# ---------------------------------------------------------------- (a) + (b)
def real_reference(model, adata) -> dict:
    """What (a) and (b) compare generated cells with; it does not depend on the generated cells.

    The real cells' clusters, the logistic regression trained on them (and its 5-fold CV
    accuracy), the PCA and kernel bandwidth of the MMD, each cluster's nearest other cluster
    by real-vs-real MMD^2, and the real cells' top markers. Computed once per model and
    passed to every :func:`accuracy_and_realism` call on it.
    """
    real_cluster = np.asarray(model.predict()).astype(str)
    used = [c for c, n in model.expert_usage().items() if n > 0]
    x_real = lognorm(adata.layers["counts"])
    clf, standardise, cv = _real_classifier(x_real, real_cluster)
    z_real = np.clip(standardise(x_real), -10, 10)
    pca = PCA(n_components=50, random_state=0).fit(z_real)
    p_real = pca.transform(z_real)
    gamma = metrics._median_heuristic_gamma(p_real)
    nearest = {}
    for c in used:
        r = real_cluster == c
        others = {
            o: metrics.mmd2_unbiased(p_real[r], p_real[real_cluster == o], gamma=gamma)
            for o in used
            if o != c and (real_cluster == o).sum() > 1
        }
        closest = min(others, key=others.get)
        nearest[c] = closest, others[closest]
    return {
        "cluster": real_cluster,
        "used": used,
        "classifier": clf,
        "standardise": standardise,
        "cv": cv,
        "pca": pca,
        "p_real": p_real,
        "gamma": gamma,
        "nearest": nearest,
        "markers": _markers(x_real, real_cluster, used, adata.var_names),
        "markers t-test": _markers(x_real, real_cluster, used, adata.var_names, method="t-test"),
    }


def accuracy_and_realism(
    model, adata, n_per_cluster: int, seed: int, reference: dict | None = None, **generate_kwargs
) -> tuple[list, list, dict]:
    """(a) and (b) for ``n_per_cluster`` generated cells of every used cluster.

    The markers are also compared on ``PROPORTIONAL_SCALE`` times as many cells as the real
    data, generated in the training proportions.

    ``reference``: :func:`real_reference` of this model and data (computed when ``None``).
    """
    ref = real_reference(model, adata) if reference is None else reference
    real_cluster, used = ref["cluster"], ref["used"]
    gen = model.generate({c: n_per_cluster for c in used}, seed=seed, **generate_kwargs)
    gen_cluster = gen.obs["moesim_cluster"].astype(str).to_numpy()

    # the model's own encoder + gate
    gen_in = AnnData(gen.X.astype(np.float32), var=gen.var[[]])
    gen_in.layers["counts"] = gen_in.X
    model_pred = np.asarray(model.predict(gen_in)).astype(str)

    # an independent classifier on the real cells' cluster labels
    x_gen = lognorm(gen.X)
    z_gen = ref["standardise"](x_gen)
    clf_pred = ref["classifier"].predict(z_gen)

    # realism: PCA of the real data, one kernel bandwidth for every comparison
    p_real, gamma = ref["p_real"], ref["gamma"]
    p_gen = ref["pca"].transform(np.clip(z_gen, -10, 10))
    real_markers = ref["markers"]
    overlap = _marker_overlap(ref, x_gen, gen_cluster, adata.var_names)
    # rank_genes_groups compares each cluster with the rest, so the rest must be made up as in
    # the real data: markers of cells generated in the training proportions (generate's default)
    in_proportion = model.generate(
        PROPORTIONAL_SCALE * adata.n_obs, seed=seed, store_mean=False, **generate_kwargs
    )
    overlap_prop = _marker_overlap(
        ref,
        lognorm(in_proportion.X),
        in_proportion.obs["moesim_cluster"].astype(str).to_numpy(),
        adata.var_names,
    )
    rows, real_rows = [], []
    for c in used:
        g, r = gen_cluster == c, real_cluster == c
        mmd_same = metrics.mmd2_unbiased(p_gen[g], p_real[r], gamma=gamma)
        nearest, mmd_other = ref["nearest"][c]
        rows.append(
            {
                "cluster": c,
                "real cells": int(r.sum()),
                "generated": int(g.sum()),
                "model gate: in cluster": float((model_pred[g] == c).mean()),
                "logreg: in cluster": float((clf_pred[g] == c).mean()),
                "MMD2 gen vs real (same)": mmd_same,
                "min MMD2 real vs other real": mmd_other,
                "nearest other": nearest,
                "markers recovered /20": overlap["wilcoxon"][c],
                "markers recovered /20, t-test": overlap["t-test"][c],
                "markers /20, training proportions": overlap_prop["wilcoxon"][c],
                "markers /20, training proportions, t-test": overlap_prop["t-test"][c],
                "real density": float((adata.layers["counts"][r] > 0).mean()),
                "gen density": float((gen.X[g] > 0).mean()),
                "real median library": float(
                    np.median(np.asarray(adata.layers["counts"][r].sum(1)))
                ),
                "gen median library": float(np.median(np.asarray(gen.X[g].sum(1)))),
            }
        )
        real_rows.append({"cluster": c, "top real markers": ", ".join(real_markers[c][:8])})
    return rows, real_rows, {"logreg 5-fold CV accuracy on real cells": float(ref["cv"])}


def _real_classifier(x_real: np.ndarray, real_cluster: np.ndarray):
    """Logistic regression on standardised log-normalised real cells: (fit, standardise, CV)."""
    mean, sd = x_real.mean(0), x_real.std(0) + 1e-6

    def standardise(x: np.ndarray) -> np.ndarray:
        return (x - mean) / sd

    clf = LogisticRegression(max_iter=3000, C=0.1)
    z_real = standardise(x_real)
    cv = cross_val_score(clf, z_real, real_cluster, cv=5).mean()
    return clf.fit(z_real, real_cluster), standardise, cv


@torch.inference_mode()
def resampled_real(model, adata, seed: int, reference: dict | None = None) -> list[dict]:
    """Reference for (a): re-sample every real cell from its own posterior, classify it back.

    For each real cell: ``z ~ q(z | x)``, decoded by the cell's own expert with the cell's own
    library size, counts drawn from the likelihood (a posterior predictive sample). The fraction
    of these that the model's gate and the logistic regression put back in the cell's cluster is
    how well the clusters stay apart once the model's own count noise is added to real cells.
    Generated cells that land in their cluster much more often than this are more typical of it
    than the real cells are (not a bound: generation may sample the cluster's core).
    ``reference``: :func:`real_reference` of this model and data (computed when ``None``).
    """
    ref = real_reference(model, adata) if reference is None else reference
    module = model.module
    module.eval()
    x = torch.as_tensor(adata.layers["counts"].toarray(), dtype=torch.float32)
    torch.manual_seed(seed)
    inf = module.inference(x)
    expert = module.gate_logits(inf["qz_m"]).argmax(-1)  # the gate on the posterior mean
    px = module.generative(inf["z"], expert, inf["library"])["px"]
    x_new = px.sample().numpy()
    real_cluster = ref["cluster"]
    new_in = AnnData(x_new.astype(np.float32), var=adata.var[[]])
    new_in.layers["counts"] = new_in.X
    gate = np.asarray(model.predict(new_in)).astype(str)
    logreg = ref["classifier"].predict(ref["standardise"](lognorm(x_new)))
    out = []
    for c in ref["used"]:
        sel = real_cluster == c
        out.append(
            {
                "cluster": c,
                "real cells": int(sel.sum()),
                "model gate: in cluster": float((gate[sel] == c).mean()),
                "logreg: in cluster": float((logreg[sel] == c).mean()),
                "re-sampled density": float((x_new[sel] > 0).mean()),
            }
        )
    return out


def _marker_overlap(ref: dict, x_gen: np.ndarray, gen_cluster: np.ndarray, names) -> dict:
    """Top-20 markers of the generated cells shared with the real cells' (wilcoxon, t-test)."""
    out = {}
    for method, key in (("wilcoxon", "markers"), ("t-test", "markers t-test")):
        gen = _markers(x_gen, gen_cluster, ref["used"], names, method=method)
        out[method] = {c: len(set(ref[key][c]) & set(gen.get(c, []))) for c in ref["used"]}
    return out


def _markers(
    x: np.ndarray,
    groups: np.ndarray,
    clusters: list[str],
    names,
    n: int = 20,
    method: str = "wilcoxon",
) -> dict:
    """Top ``n`` markers per cluster (gene names), each cluster against the rest.

    ``method`` of ``sc.tl.rank_genes_groups``: wilcoxon (the main figure) or ``"t-test"``
    (scanpy's default, reported next to it).
    """
    ad = AnnData(x.astype(np.float32), var=pd.DataFrame(index=np.asarray(names, dtype=str)))
    ad.obs["g"] = pd.Categorical(groups)
    sc.tl.rank_genes_groups(ad, "g", method=method, n_genes=n)
    names = ad.uns["rank_genes_groups"]["names"]
    return {c: [str(v) for v in names[c]] for c in clusters if c in names.dtype.names}


@torch.inference_mode()
def density_diagnosis(model, adata, seed: int) -> list[dict]:
    """Where do the extra non-zeros of generated cells come from?

    Expected non-zero fraction E[1 - P(x = 0)] per cluster, with each real cell's own library
    size, for z = the real cell's posterior mean (reconstruction: the likelihood's limit) and
    for z ~ N(mu_k, I) (generation); and the spread of the real cells' z around their centre
    (the generator assumes a standard deviation of 1 per dimension).
    """
    module = model.module
    module.eval()
    x = torch.as_tensor(adata.layers["counts"].toarray(), dtype=torch.float32)
    inf = module.inference(x, use_mean=True)
    k, lib = inf["expert"], inf["library"]
    gen = torch.Generator().manual_seed(seed)
    z_gen = module.centres[k] + torch.randn(inf["z"].shape, generator=gen)
    names = np.asarray(model.cluster_names_, dtype=object)
    out = []
    dens = {}
    for label, z in (("posterior", inf["z"]), ("prior", z_gen)):
        px = module.generative(z, k, lib)["px"]
        p0 = torch.exp(px.log_prob(torch.zeros_like(x)))
        dens[label] = (1 - p0).mean(1).numpy()
    for e in np.unique(k.numpy()):
        sel = k.numpy() == e
        dev = (inf["z"][sel] - module.centres[e]).pow(2).mean().sqrt().item()
        out.append(
            {
                "cluster": str(names[e]),
                "cells": int(sel.sum()),
                "real density": float((x[sel] > 0).float().mean()),
                "model density, z = posterior mean": float(dens["posterior"][sel].mean()),
                "model density, z ~ N(mu_k, I)": float(dens["prior"][sel].mean()),
                "RMS of real z around mu_k (prior: 1)": dev,
            }
        )
    return out


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


def balanced_request(rej: pd.DataFrame, n_per_cluster: int) -> str:
    """The paper's protocol: ``n`` cells of every cluster, from one stream of proposals.

    A proposal is decoded once and kept for whichever cluster's posterior passes 0.999, so the
    stream must run until the rarest cluster has its ``n`` cells: about
    ``max_k n / rate_k`` proposals (``rate_k``: accepted / proposals of cluster ``k`` above;
    a capped cluster with none accepted gives a lower bound), against ``n * K`` decoder
    evaluations for ``generate``.
    """
    per_accept = rej["proposals (decoder evaluations)"] / rej["accepted"].clip(lower=1)
    proposals = n_per_cluster * per_accept.max()
    ours = n_per_cluster * len(rej)
    bound = "at least " if bool((rej["capped"] & (rej["accepted"] == 0)).any()) else ""
    rarest = rej["cluster"][per_accept.idxmax()]
    return (
        f"Balanced request ({n_per_cluster} cells of each of {len(rej)} clusters, one proposal "
        f"stream): rejection {bound}{proposals:,.0f} decoder evaluations (rarest: {rarest}), "
        f"generate {ours:,}: {bound}{proposals / ours:,.0f}x fewer"
    )


def set_threads(threads: int) -> None:
    """Threads of both torch (decoder) and numba (count sampler)."""
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def throughput(model, n_cells: int, threads: int, seed: int) -> dict:
    set_threads(threads)
    model.generate(2048, seed=seed, store_mean=False)  # warm-up (numba compile / cache load)
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    out = model.generate(n_cells, seed=seed, store_mean=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "cells": n_cells,
        "genes": out.n_vars,
        "threads": threads,
        "wall s": wall,
        "process CPU s": cpu,
        "cells/s (wall)": n_cells / wall,
        "cells per CPU-second": n_cells / cpu,
        "load avg (1 min) before": load0,
        "load avg after": os.getloadavg()[0],
        "non-zero fraction": out.X.nnz / (out.n_obs * out.n_vars),
    }


@torch.inference_mode()
def profile_chunk(model, n: int, seed: int, repeats: int = 3) -> dict:
    """CPU seconds per 1,000 cells of each step of generation (one thread, chunk of ``n``)."""
    from scmoesim.model._generate import _chunk_to_numpy, _join_csr
    from scmoesim.module._sampling import sample_sparse_counts, scaled_softmax_

    set_threads(1)
    module = model.module
    module.eval()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    usage = np.asarray(model.expert_usage_, dtype=float)
    times = dict.fromkeys(
        ["cluster + library draws", "decoder", "softmax", "count sampler", "CSR assembly"], 0.0
    )
    for _ in range(repeats):
        c = time.process_time()
        experts = np.sort(rng.choice(len(usage), size=n, p=usage / usage.sum()))
        lib = model._draw_libraries(experts, np.zeros(n, dtype=np.int64), rng)
        k = torch.as_tensor(experts)
        times["cluster + library draws"] += time.process_time() - c
        c = time.process_time()
        z = module.centres[k] + torch.randn(n, module.n_latent, generator=gen)
        heads = module.experts.decode(z, k, None)  # as in sample_from_experts
        times["decoder"] += time.process_time() - c
        c = time.process_time()
        mu = scaled_softmax_(heads["scale"], torch.as_tensor(lib, dtype=torch.float32)[:, None])
        times["softmax"] += time.process_time() - c
        c = time.process_time()
        theta, theta_index = module.dispersion_table(k)
        ip, cols, vals = sample_sparse_counts(
            module.likelihood, mu, theta, heads.get("dropout"), gen, theta_index=theta_index
        )
        times["count sampler"] += time.process_time() - c
        c = time.process_time()
        chunk = _chunk_to_numpy({"indptr": ip, "cols": cols, "values": vals}, n, 0, "counts", False)
        _join_csr([chunk], n, mu.shape[1])
        times["CSR assembly"] += time.process_time() - c
    total = sum(times.values())
    return {
        step: {"CPU s per 1,000 cells": t / repeats / n * 1000, "share": t / total}
        for step, t in times.items()
    }


_MEMORY_CHILD = """
import json, os, sys, threading, time, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from generation import kidney_model, set_threads
from pathlib import Path
set_threads(1)
model, _ = kidney_model(Path({cache!r}), 0, None)
model.generate(100, seed=0, store_mean=False)  # compile / load the numba kernel
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
before, peak, done = rss(), [0.0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.05)
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
t0, c0 = time.perf_counter(), time.process_time()
out = model.generate({n}, seed=0, store_mean=False, filename={filename!r})
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
done.set()
watcher.join()
peak[0] = max(peak[0], rss())
nnz = out.X.group["data"].shape[0] if {filename!r} else out.X.nnz
print(json.dumps({{"RSS before generate MiB": before, "peak RSS during generate MiB": peak[0],
                  "wall s": wall, "CPU s": cpu, "nnz": int(nnz)}}))
"""


def peak_memory(cache: Path, n_cells: int, to_file: bool, tmpdir: str | None = None) -> dict:
    """Peak RSS (polled every 50 ms) of a fresh process while it generates ``n_cells``."""
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        filename = str(Path(tmp) / "gen.h5ad") if to_file else None
        code = _MEMORY_CHILD.format(here=str(HERE), cache=str(cache), n=n_cells, filename=filename)
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        out = json.loads(res.stdout.strip().splitlines()[-1])
        size = Path(filename).stat().st_size / 2**30 if to_file else float("nan")
    n_var = kidney_model_genes()
    return {
        "cells": n_cells,
        "output": "backed .h5ad" if to_file else "in memory (CSR)",
        **out,
        "file GiB": size,
        "dense float32 matrix would need GiB": n_cells * n_var * 4 / 2**30,
        "load avg before": load0,
    }


def kidney_model_genes() -> int:
    return kidney_adata().n_vars


def variant_summary(
    name: str, model, adata, n_per_cluster: int, seed: int, reference: dict | None = None
) -> dict:
    """Realism and clustering of one model variant, summed up in one row."""
    rows, _, extra = accuracy_and_realism(model, adata, n_per_cluster, seed, reference)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    pred = np.asarray(model.predict()).astype(str)
    keep = truth != "unannotated"
    return {
        "model": name,
        "experts used": int((np.asarray(model.expert_usage_) > 0).sum()),
        "ARI vs cell_type": adjusted_rand_score(truth[keep], pred[keep]),
        **_realism_summary(pd.DataFrame(rows)),
    }


def _realism_summary(rows: pd.DataFrame) -> dict:
    closer = rows["MMD2 gen vs real (same)"] < rows["min MMD2 real vs other real"]
    markers = rows["markers recovered /20"]
    markers_t = rows["markers recovered /20, t-test"]
    prop = rows["markers /20, training proportions"]
    prop_t = rows["markers /20, training proportions, t-test"]
    return {
        "model gate: in cluster (min)": rows["model gate: in cluster"].min(),
        "model gate: in cluster (mean)": rows["model gate: in cluster"].mean(),
        "logreg: in cluster (min)": rows["logreg: in cluster"].min(),
        "logreg: in cluster (mean)": rows["logreg: in cluster"].mean(),
        "MMD2 gen < min real-other (clusters)": f"{int(closer.sum())}/{len(rows)}",
        "markers recovered /20 (min, mean)": f"{markers.min()}, {markers.mean():.1f}",
        "markers >= 10 (wilcoxon, t-test)": f"{int((markers >= 10).sum())}/{len(rows)}, "
        f"{int((markers_t >= 10).sum())}/{len(rows)}",
        "markers >= 10, training proportions (wilcoxon, t-test)": f"{int((prop >= 10).sum())}/"
        f"{len(rows)}, {int((prop_t >= 10).sum())}/{len(rows)}",
        "gen / real density (mean ratio)": float(
            (rows["gen density"] / rows["real density"]).mean()
        ),
    }


def latent_comparison(
    model, adata, n_per_cluster: int, seeds: list[int], reference: dict | None = None
) -> pd.DataFrame:
    """``generate(latent=...)``: the training cells' posteriors, the fitted Gaussians and the
    paper's N(mu_k, I)."""
    ref = real_reference(model, adata) if reference is None else reference
    rows = []
    for latent in ("fitted", "posterior", "prior"):
        for seed in seeds:
            acc, _, _ = accuracy_and_realism(model, adata, n_per_cluster, seed, ref, latent=latent)
            rows.append({"latent": latent, "seed": seed, **_realism_summary(pd.DataFrame(acc))})
    return pd.DataFrame(rows)


def pbmc_latent_comparison(model_seeds: list[int], gen_seeds: list[int]) -> pd.DataFrame:
    """``latent="posterior"``, ``"fitted"`` and ``"prior"`` on a second model: pbmc68k_reduced.

    As in the generation tutorial: log-normalised data, ``likelihood="normal"``, the sorted
    populations as labels, 200 epochs; 200 cells of each of the four largest clusters,
    classified back by a logistic regression trained on all real cells, and the MMD^2 (RBF,
    30-dim PCA of the real cells) between generated and real cells of the same population.
    """
    rows = []
    for mseed in model_seeds:
        adata = datasets.pbmc68k_reduced()
        scvi.settings.seed = mseed
        scmoesim.MoESim.setup_anndata(adata, labels_key="bulk_labels")
        model = scmoesim.MoESim(adata, likelihood="normal")
        model.train(max_epochs=200, enable_progress_bar=False)
        chosen = list(model.expert_usage().nlargest(4).index)
        x = adata.X.toarray()
        labels = adata.obs["bulk_labels"].astype(str).to_numpy()
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(x, labels)
        pca = PCA(30, random_state=0).fit(x)
        p_real = pca.transform(x)
        gamma = metrics._median_heuristic_gamma(p_real)
        for gseed in gen_seeds:
            for latent in ("fitted", "posterior", "prior"):
                new = model.generate({c: 200 for c in chosen}, seed=gseed, latent=latent)
                cluster = new.obs["moesim_cluster"].astype(str).to_numpy()
                right = clf.predict(np.asarray(new.X)) == cluster
                p_gen = pca.transform(np.asarray(new.X))
                mmd = [
                    metrics.mmd2_unbiased(p_gen[cluster == c], p_real[labels == c], gamma=gamma)
                    for c in chosen
                ]
                rows.append(
                    {
                        "model seed": mseed,
                        "generation seed": gseed,
                        "latent": latent,
                        "logreg: in cluster (mean)": right.mean(),
                        "logreg: in cluster (min)": min(right[cluster == c].mean() for c in chosen),
                        "MMD2 gen vs real (same), mean": float(np.mean(mmd)),
                    }
                )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- main
def _parse_variant(text: str) -> dict:
    """``"likelihood=zinb,dispersion=gene-expert"`` -> keyword arguments of ``MoESim``."""
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "scmoesim_gen"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: scvi heuristic")
    parser.add_argument("--n-per-cluster", type=int, default=500)
    parser.add_argument("--reject-accept", type=int, default=100)
    parser.add_argument("--reject-max", type=int, default=200_000)
    parser.add_argument("--speed-cells", type=int, default=20_000)
    parser.add_argument("--memory-cells", type=int, nargs="*", default=[20_000, 100_000])
    parser.add_argument("--memory-tmp", default=None, help="folder for the backed .h5ad files")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["likelihood=zinb", "dispersion=gene-expert"],
        help="model settings to compare for realism, e.g. likelihood=zinb",
    )
    parser.add_argument(
        "--latent-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="generation seeds of the posterior / fitted / prior comparison",
    )
    parser.add_argument(
        "--pbmc-latent",
        action="store_true",
        help="only the posterior / fitted / prior comparison on pbmc68k_reduced (normal "
        "likelihood)",
    )
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only the throughput of the kidney model and of a UMI-like model",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    set_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if args.speed_only:
        speed_only(args, cache, t_start)
        return
    if args.pbmc_latent:
        table = pbmc_latent_comparison([0, 1], args.latent_seeds)
        summary = table.groupby(["model seed", "latent"]).mean(numeric_only=True)
        title = "Generation: the latent distributions of generate on pbmc68k_reduced"
        note = "(see `pbmc_latent_comparison` in `generation.py` for the protocol)."
        text = (
            _header(title, t_start, note)
            + "\n\n## Mean over generation seeds\n\n"
            + summary.drop(columns="generation seed").round(4).to_markdown()
            + "\n\n## Every run\n\n"
            + table.round(4).to_markdown(index=False)
            + "\n"
        )
        _emit(text, args.out)
        return

    model, adata = kidney_model(cache, args.seed, args.epochs)
    ablation, adata_abl = kidney_model(cache, args.seed, args.epochs, clustering_weight=0.0)
    print("models ready", model.expert_usage().to_dict(), flush=True)

    ref = real_reference(model, adata)
    acc, real_markers, extra = accuracy_and_realism(
        model, adata, args.n_per_cluster, args.seed, ref
    )
    acc = pd.DataFrame(acc)
    print(acc.round(3).to_string(), flush=True)
    dens = pd.DataFrame(density_diagnosis(model, adata, args.seed))
    print(dens.round(3).to_string(), flush=True)

    latents = latent_comparison(model, adata, args.n_per_cluster, args.latent_seeds, ref)
    print(latents.round(3).to_string(), flush=True)

    variants = [variant_summary("default", model, adata, args.n_per_cluster, args.seed, ref)]
    resampled = [{"model": "default", **r} for r in resampled_real(model, adata, args.seed, ref)]
    for text in args.variants:
        kw = _parse_variant(text)
        m, a = kidney_model(cache, args.seed, args.epochs, **kw)
        ref_m = real_reference(m, a)
        variants.append(variant_summary(text, m, a, args.n_per_cluster, args.seed, ref_m))
        resampled += [{"model": text, **r} for r in resampled_real(m, a, args.seed, ref_m)]
        print(pd.DataFrame(variants).round(3).to_string(), flush=True)
    variants = pd.DataFrame(variants)
    resampled = pd.DataFrame(resampled)
    print(resampled.round(3).to_string(), flush=True)

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
    print(balanced_request(rej, args.reject_accept), flush=True)

    prof = pd.DataFrame(profile_chunk(model, 2048, args.seed)).T
    print(prof.round(4).to_string(), flush=True)
    speed = speed_table(model, adata, args.speed_cells, args.threads, args.seed)
    print(speed.round(2).to_string(), flush=True)
    umi_model, umi_adata = umi_like_model(cache, args.seed)
    umi_speed = speed_table(umi_model, umi_adata, args.speed_cells, args.threads, args.seed)
    print(umi_speed.round(2).to_string(), flush=True)
    mem = pd.DataFrame(
        [
            peak_memory(cache, n, to_file, args.memory_tmp)
            for n in args.memory_cells
            for to_file in (True, False)
        ]
    )
    print(mem.round(1).to_string(), flush=True)

    settings = model_settings(n_experts=7)
    text = (
        _header("Generation benchmark", t_start)
        + " Model: Tabula Muris kidney, 2,000 HVGs + markers, signatures as in `signatures.py`, "
        f"seed {args.seed}, epochs: {args.epochs or 'scvi heuristic'}, settings (the code's "
        f"defaults at run time): `{settings}`. "
        f"Expert usage: {model.expert_usage().to_dict()}\n\n"
        f"## (a) Accuracy and (b) realism, {args.n_per_cluster} generated cells per cluster\n\n"
        + acc.round(4).to_markdown(index=False)
        + "\n\n"
        + "\n".join(f"* {k}: {v:.3f}" for k, v in extra.items())
        + "\n\nTop real-cell markers (wilcoxon, real cells grouped by the model's clusters):\n\n"
        + pd.DataFrame(real_markers).to_markdown(index=False)
        + "\n\n### Where the extra non-zeros come from\n\n"
        + dens.round(3).to_markdown(index=False)
        + "\n\n### Latent distribution of `generate`: posterior (default), fitted, prior\n\n"
        + latents.round(3).to_markdown(index=False)
        + "\n\n### Model variants (realism vs clustering)\n\n"
        + variants.round(3).to_markdown(index=False)
        + "\n\n### Reference for (a): real cells re-sampled from their own posterior\n\n"
        + resampled.round(3).to_markdown(index=False)
        + "\n\n## (c) Latent separation: MMD^2 between latent samples (annotated cell types)\n\n"
        + sep.round(4).to_markdown()
        + "\n\n## (d) Rejection sampler (posterior >= 0.999) vs generate\n\n"
        + rej.round(5).to_markdown(index=False)
        + "\n\n## Where generation time goes (1 thread, chunks of 2,048 cells)\n\n"
        + prof.round(4).to_markdown()
        + "\n\n"
        + _speed_section(speed, umi_speed)
        + "\n\n## Peak memory (fresh process, 1 thread, store_mean=False)\n\n"
        + (mem.round(1).to_markdown(index=False) if len(mem) else "not run")
        + "\n"
    )
    _emit(text, args.out)


def _speed_section(speed: pd.DataFrame, umi_speed: pd.DataFrame) -> str:
    return (
        "## Throughput of generate (store_mean=False, two runs per thread count)\n\n"
        "Kidney model (Smart-seq2 depth):\n\n"
        + speed.round(2).to_markdown(index=False)
        + "\n\nUMI-like model (`umi_like_model`: synthetic NB counts at droplet depth):\n\n"
        + umi_speed.round(2).to_markdown(index=False)
        + "\n"
    )


def speed_only(args, cache: Path, t_start: float) -> None:
    """``--speed-only``: the throughput tables alone."""
    model, adata = kidney_model(cache, args.seed, args.epochs)
    umi_model, umi_adata = umi_like_model(cache, args.seed)
    speed = speed_table(model, adata, args.speed_cells, args.threads, args.seed)
    umi_speed = speed_table(umi_model, umi_adata, args.speed_cells, args.threads, args.seed)
    text = _header("Generation throughput", t_start) + "\n\n" + _speed_section(speed, umi_speed)
    _emit(text, args.out)


def _header(title: str, t_start: float, note: str = "(cached models are reused).") -> str:
    """Title, command, environment and run time of a results file."""
    cmd = "python benchmarks/generation.py " + " ".join(sys.argv[1:])
    return (
        f"# {title}\n\nCommand: `{cmd}`\n\nEnvironment: {environment()}\n\n"
        f"Total run time: {(time.time() - t_start) / 60:.1f} min {note}"
    )


def _emit(text: str, out: str | None) -> None:
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
