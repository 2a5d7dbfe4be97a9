"""Training speed of MoESim (K=1, K=25) against scvi-tools' SCVI, timed in the same run.

Synthetic NB counts (``_synthetic.py``), 10,000 cells x 2,000 genes, sparse X, batch 256, CPU.
Every repeat trains SCVI (defaults), MoESim K=1 and MoESim K=25 (kNN similarity on a 20-D
embedding, the most expensive similarity source) for a few epochs each, in a rotating order;
the time of each epoch after the first is recorded and ratios are taken within a repeat, so a
change in machine load hits all three models alike. The load average is recorded. Both the
process CPU time (robust to other users' load on a shared machine with one torch thread) and
the wall-clock time of each epoch are reported.

A second part breaks a K=25 training step down (forward, similarity, backward, optimiser),
compares the fused Adam step with PyTorch's default one over the same parameters, times the
similarity matrix and its loss at batch 1,024, and lists the top operators from torch.profiler.

Usage::

    python speed.py --repeats 3 --threads 1 --out results_speed.md
"""

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import scmoesim
from _synthetic import SyntheticCounts
from scmoesim.module._losses import similarity_bce
from scmoesim.nn._grouped import uses_grouped_mm

warnings.filterwarnings("ignore")


class EpochTimer(Callback):
    """Wall time and process CPU time of every training epoch."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def build(name: str, adata):
    """A fresh model: ``"scvi"`` or ``"K=<k>"``."""
    a = adata.copy()
    if name == "scvi":
        scvi.model.SCVI.setup_anndata(a)
        return scvi.model.SCVI(a)
    scmoesim.MoESim.setup_anndata(a, embedding_key="X_pca")
    return scmoesim.MoESim(a, n_experts=int(name.split("=")[1]))


def time_epochs(name: str, adata, epochs: int, batch_size: int) -> EpochTimer:
    """Per-epoch wall and CPU times of a fresh model (first epoch included)."""
    scvi.settings.seed = 0
    model = build(name, adata)
    timer = EpochTimer()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[timer],
    )
    return timer


def _step_parts(adata, k: int, batch_size: int, n_batches: int):
    """Seeded MoESim with ``k`` experts: module (train mode), plan, optimizer, first batches."""
    scvi.settings.seed = 0
    model = build(f"K={k}", adata)
    module = model.module.train()
    plan = scmoesim.train.MoESimTrainingPlan(module)
    opt = plan.configure_optimizers()["optimizer"]
    loader = model._make_data_loader(adata=model.adata, batch_size=batch_size, shuffle=True)
    batches = [b for _, b in zip(range(n_batches), loader, strict=False)]
    return module, plan, opt, batches


def step_breakdown(adata, k: int, batch_size: int, n_steps: int) -> dict[str, float]:
    """Milliseconds per phase of a training step of MoESim with ``k`` experts."""
    module, plan, opt, batches = _step_parts(adata, k, batch_size, n_steps + 2)
    acc = {"forward + loss": 0.0, "similarity (S)": 0.0, "backward": 0.0, "optimizer": 0.0}
    for i, b in enumerate(batches):
        t0 = time.process_time()
        inf, gen, loss = module(b, compute_loss=True)
        t1 = time.process_time()
        module.minibatch_similarity(b, inf["library"])
        t2 = time.process_time()
        opt.zero_grad()
        loss.loss.backward()
        t3 = time.process_time()
        opt.step()
        plan._em_update(inf)
        t4 = time.process_time()
        if i >= 2:
            acc["forward + loss"] += t1 - t0
            acc["similarity (S)"] += t2 - t1
            acc["backward"] += t3 - t2
            acc["optimizer"] += t4 - t3
    return {key: 1000 * v / n_steps for key, v in acc.items()}


def adam_comparison(module, n: int = 10) -> dict[str, float]:
    """Milliseconds per Adam step over ``module``'s parameters: default vs fused."""
    out = {}
    for label, kw in (("torch default (for-loop on CPU)", {}), ("fused (used)", {"fused": True})):
        params = [torch.nn.Parameter(p.detach().clone()) for p in module.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.Adam(params, lr=1e-3, eps=0.01, weight_decay=1e-6, **kw)
        opt.step()
        t0 = time.process_time()
        for _ in range(n):
            opt.step()
        out[label] = 1000 * (time.process_time() - t0) / n
    return out


def similarity_share(adata, k: int, batch_size: int, n_steps: int) -> dict[str, float]:
    """Similarity matrix + its BCE (forward and backward) against a full step, batch 1,024."""
    module, _, opt, batches = _step_parts(adata, k, batch_size, n_steps + 1)
    t_step = t_sim = 0.0
    for i, b in enumerate(batches):
        t0 = time.process_time()
        inf, _, loss = module(b, compute_loss=True)
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
        t1 = time.process_time()
        p = inf["p"].detach().requires_grad_(True)
        s, mask = module.minibatch_similarity(b, inf["library"])
        sim, _ = similarity_bce(p, s, mask)
        sim.backward()
        t2 = time.process_time()
        if i >= 1:
            t_step += t1 - t0
            t_sim += t2 - t1
    return {"step_ms": 1000 * t_step / n_steps, "similarity_ms": 1000 * t_sim / n_steps}


def profile_table(adata, k: int, batch_size: int, n_steps: int = 8) -> str:
    """torch.profiler's top operators (self CPU time) over ``n_steps`` training steps."""
    from torch.profiler import ProfilerActivity, profile

    module, _, opt, batches = _step_parts(adata, k, batch_size, n_steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches:
            _, _, loss = module(b, compute_loss=True)
            opt.zero_grad()
            loss.loss.backward()
            opt.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main(argv=None) -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cells", type=int, default=10_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--epochs", type=int, default=3, help="per model and repeat (first dropped)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    adata = SyntheticCounts(args.n_genes).anndata(args.n_cells)
    density = adata.X.nnz / np.prod(adata.shape)
    names = ["scvi", "K=1", "K=25"]
    lines = [
        "# Speed benchmark (`benchmarks/speed.py`)",
        "",
        f"Command: `python speed.py {' '.join(argv or sys.argv[1:])}`",
        "",
        f"Data: synthetic NB counts, {args.n_cells} cells x {args.n_genes} genes, sparse X "
        f"({density:.1%} non-zero), batch {args.batch_size}, CPU; 90% of the cells train "
        "(scvi-tools' default split). MoESim with kNN similarity on a 20-D `obsm['X_pca']`. "
        f"grouped_mm (sync-free experts) in use: {uses_grouped_mm(torch.zeros(2, 4, 4))}.",
        "",
        f"Environment: python {sys.version.split()[0]}, scvi-tools {scvi.__version__}, "
        f"torch {torch.__version__}, {os.cpu_count()} cores (shared with other users).",
        "",
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = []
        for r in range(args.repeats):
            order = names[r % 3 :] + names[: r % 3]
            load0 = os.getloadavg()[0]
            per = {}
            for name in order:
                timer = time_epochs(name, adata, args.epochs, args.batch_size)
                per[name] = (statistics.median(timer.cpu[1:]), statistics.median(timer.times[1:]))
                print(threads, r, name, [f"{t:.2f}" for t in timer.cpu], flush=True)
            rows.append((r, load0, os.getloadavg()[0], per))
        n_train = int(0.9 * args.n_cells)
        for col, label in ((0, "CPU seconds"), (1, "wall-clock seconds")):
            lines += [
                f"## {threads} thread(s): {label} per epoch (median of epochs 2..{args.epochs})",
                "",
                "| repeat | load avg (start, end) | SCVI | MoESim K=1 | MoESim K=25 | K=25 / SCVI "
                "| K=25 / K=1 | SCVI cells/s |",
                "|---|---|---|---|---|---|---|---|",
            ]
            r_scvi, r_k1 = [], []
            for r, l0, l1, per in rows:
                t = {k: v[col] for k, v in per.items()}
                a, b = t["K=25"] / t["scvi"], t["K=25"] / t["K=1"]
                r_scvi.append(a)
                r_k1.append(b)
                lines.append(
                    f"| {r} | {l0:.1f}, {l1:.1f} | {t['scvi']:.2f} | {t['K=1']:.2f} | "
                    f"{t['K=25']:.2f} | {a:.2f} | {b:.2f} | {n_train / t['scvi']:.0f} |"
                )
            med_a, med_b = statistics.median(r_scvi), statistics.median(r_k1)
            lines += [
                "",
                f"Median ratios ({label}): **K=25 / SCVI = {med_a:.2f}** (floor 1.3), "
                f"**K=25 / K=1 = {med_b:.2f}** (floor 1.2).",
                "",
            ]

    if not args.skip_profile:
        torch.set_num_threads(args.threads[0])
        bd = step_breakdown(adata, 25, args.batch_size, 20)
        total = sum(bd.values())
        lines += [
            f"## Where the time goes: one K=25 step, batch {args.batch_size} "
            f"({args.threads[0]} thread(s), CPU time, data loading excluded)",
            "",
            "| phase | ms | share |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in bd.items()]
        lines += [
            f"| total | {total:.1f} | |",
            "",
            "`similarity (S)` is the similarity matrix alone (kNN on the embedding), timed apart"
            " from `forward + loss`, which also builds it once. `optimizer` includes the EM "
            "update of the centres.",
            "",
        ]
        model = build("K=25", adata)
        adam = adam_comparison(model.module)
        n_par = sum(p.numel() for p in model.module.parameters())
        n_exp = sum(p.numel() for p in model.module.experts.parameters())
        lines += [
            f"Adam step over the K=25 module's {n_par / 1e6:.2f} M parameters "
            f"({n_exp / 1e6:.2f} M in the experts):",
            "",
            "| Adam | ms per step |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.1f} |" for k, v in adam.items()]
        share = similarity_share(adata, 25, 1024, 8)
        frac = share["similarity_ms"] / share["step_ms"]
        lines += [
            "",
            "Similarity matrix + BCE loss (forward and backward) at batch 1,024, K=25 (CPU time): "
            f"{share['similarity_ms']:.1f} ms against {share['step_ms']:.1f} ms per full step "
            f"= **{frac:.1%}** (floor 10%).",
            "",
            f"torch.profiler, 8 steps of K=25 at batch {args.batch_size} (self CPU time):",
            "",
            "```",
            profile_table(adata, 25, args.batch_size),
            "```",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
