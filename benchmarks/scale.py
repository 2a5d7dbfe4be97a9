"""Scaling of MoESim (K=25) with the number of cells, in memory and out of core.

Two parts, each size in a fresh process so that its peak resident memory (``ru_maxrss``) is its
own:

* **curve**: time per epoch for N in-memory cells (sparse CSR X, 2,000 genes, batch 256), one
  epoch, and the peak RSS;
* **backed**: training from ``anndata.read_h5ad(path, backed="r")`` for a fixed number of steps
  (X is never read whole: setup statistics in chunks, minibatches from disk). The h5ad files
  are written chunk by chunk under ``--tmp``. Current and peak RSS are recorded after opening
  the file, after setup, at the end of the training steps and after ``train()`` returns (which
  runs a streamed summary pass over all cells, keeping about 8 bytes a cell).

Usage::

    python scale.py --curve 10000 50000 200000 --backed 100000 1000000 --out results_scale.md
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def _rss_mib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cur_rss_mib() -> float:
    """Current resident memory (Linux ``/proc``; the peak elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except OSError:
        return _rss_mib()


def worker(mode: str, n: int, steps: int, tmp: str) -> dict:
    """Run one measurement in this process and return its figures."""
    import anndata as ad
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    import scmoesim
    from _synthetic import SyntheticCounts

    torch.set_num_threads(1)
    out: dict = {"mode": mode, "n_cells": n}

    class Probe(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, pl_module):
            out["epoch_wall_s"] = time.perf_counter() - self.t0
            out["epoch_cpu_s"] = time.process_time() - self.c0

        def on_train_start(self, trainer, pl_module):
            out["train_start_cur_mib"] = _cur_rss_mib()

        def on_train_end(self, trainer, pl_module):
            out["train_end_rss_mib"] = _rss_mib()
            out["train_end_cur_mib"] = _cur_rss_mib()
            out["t_train_end"] = time.perf_counter()
            out["steps"] = trainer.global_step
            # written at once, in case the summary pass after training is cut short
            Path(tmp, f"partial_{mode}_{n}.json").write_text(json.dumps(out))

    gen = SyntheticCounts()
    if mode == "curve":
        adata = gen.anndata(n, pool=20_000)
        kwargs = {"max_epochs": 1}
    else:
        path = os.path.join(tmp, f"moesim_scale_{n}.h5ad")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            gen.write_h5ad(path, n)
            out["write_s"] = time.perf_counter() - t0
        out["file_mib"] = os.path.getsize(path) / 2**20
        out["rss_before_setup_mib"] = _rss_mib()
        adata = ad.read_h5ad(path, backed="r")
        kwargs = {"max_epochs": 1, "max_steps": steps}
    out["rss_data_mib"] = _rss_mib()
    out["data_cur_mib"] = _cur_rss_mib()
    t0 = time.perf_counter()
    scmoesim.MoESim.setup_anndata(adata, embedding_key="X_pca")
    scvi.settings.seed = 0
    model = scmoesim.MoESim(adata, n_experts=25)
    out["setup_s"] = time.perf_counter() - t0
    out["rss_setup_mib"] = _rss_mib()
    out["setup_cur_mib"] = _cur_rss_mib()
    t0 = time.perf_counter()
    model.train(
        batch_size=256,
        train_size=1.0,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[Probe()],
        **kwargs,
    )
    out["train_total_s"] = time.perf_counter() - t0
    out["summary_s"] = time.perf_counter() - out.pop("t_train_end")
    out["final_rss_mib"] = _rss_mib()
    out["final_cur_mib"] = _cur_rss_mib()
    return out


def run_child(mode: str, n: int, steps: int, tmp: str) -> dict:
    """Run :func:`worker` in a fresh interpreter (own peak RSS)."""
    cmd = [sys.executable, __file__, "--worker", mode, str(n), str(steps), tmp]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker failed: {res.stderr[-3000:]}")


def main() -> None:  # noqa: D103
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, n, steps, tmp = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        print("RESULT " + json.dumps(worker(mode, n, steps, tmp)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--curve", type=int, nargs="*", default=[10_000, 50_000, 200_000])
    parser.add_argument("--backed", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=200, help="training steps when backed")
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    lines = [
        "# Scale benchmark (`benchmarks/scale.py`)",
        "",
        f"Command: `python scale.py {' '.join(sys.argv[1:])}`; MoESim K=25, kNN similarity, "
        "batch 256, 1 torch thread, 2,000 genes, about 12% non-zero. Machine shared with other "
        "users: wall times are inflated by their load, CPU times much less.",
        "",
    ]
    if args.curve:
        rows = []
        for n in args.curve:
            r = run_child("curve", n, 0, args.tmp)
            rows.append(r)
            print(r, flush=True)
        lines += [
            "## Time per epoch, in-memory sparse X",
            "",
            "| cells | epoch CPU s | epoch wall s | CPU µs per cell | peak RSS after training "
            "(MiB) | RSS with data loaded (MiB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['n_cells']:,} | {r['epoch_cpu_s']:.1f} | {r['epoch_wall_s']:.1f} | "
                f"{1e6 * r['epoch_cpu_s'] / r['n_cells']:.0f} | {r['final_rss_mib']:.0f} | "
                f"{r['rss_data_mib']:.0f} |"
            )
        lines.append("")
    if args.backed:
        rows = []
        for n in args.backed:
            r = run_child("backed", n, args.steps, args.tmp)
            rows.append(r)
            print(r, flush=True)
        lines += [
            f"## Out of core: backed h5ad, {args.steps} training steps",
            "",
            "Resident memory (MiB) at each stage, current / peak so far: after opening the file "
            "backed, after `setup_anndata` + model, at the end of the training steps, after "
            "`train()` returns (incl. the post-training summary pass over all cells).",
            "",
            "| cells | file (MiB) | opened | setup + model | end of steps | after train() | "
            "setup s | steps s | summary pass s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            steps_s = r["train_total_s"] - r["summary_s"]
            lines.append(
                f"| {r['n_cells']:,} | {r['file_mib']:.0f} | "
                f"{r['data_cur_mib']:.0f} / {r['rss_data_mib']:.0f} | "
                f"{r['setup_cur_mib']:.0f} / {r['rss_setup_mib']:.0f} | "
                f"{r['train_end_cur_mib']:.0f} / {r['train_end_rss_mib']:.0f} | "
                f"{r['final_cur_mib']:.0f} / {r['final_rss_mib']:.0f} | {r['setup_s']:.1f} | "
                f"{steps_s:.0f} | {r['summary_s']:.0f} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
