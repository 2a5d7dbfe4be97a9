"""Multi-process (DDP, gloo on CPU) training: state stays synchronised across processes.

The test starts two CPU processes and is marked ``slow`` (about 20-40 s on a quiet 2-core
machine, mostly process start-up and imports; up to 100 s when the machine is loaded).
"""

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import scmoesim
from scmoesim.module import MoESimModule
from scmoesim.train import MoESimTrainingPlan

pytestmark = pytest.mark.slow


def _batch(n: int = 40, k: int = 3, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(n, k, generator=gen) * 3, dim=1)
    z = torch.randn(n, d, generator=gen)
    return p, z


class RankStateRecorder(Callback):
    """At the end of training, gather every rank's centres and a parameter checksum."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        module = pl_module.module
        # the EM step on unequal shards of one fixed minibatch, one shard per rank
        shard = slice(0, 25) if trainer.global_rank == 0 else slice(25, None)
        p, z = _batch(d=module.n_latent, k=module.n_experts)
        saved = (module.centre_sum.clone(), module.centre_weight.clone())
        module.centre_sum.zero_()
        module.centre_weight.zero_()
        pl_module._em_update({"p": p[shard], "z": z[shard]})
        pl_module._em_update({"p": p[shard].flip(1), "z": z[shard] * 2})
        em = trainer.strategy.all_gather(module.centres)
        module.centre_sum.copy_(saved[0])
        module.centre_weight.copy_(saved[1])
        state = torch.cat(
            [
                module.centre_sum.reshape(-1),
                module.centre_weight,
                torch.stack([p.detach().double().sum().float() for p in module.parameters()]),
            ]
        )
        gathered = trainer.strategy.all_gather(state)
        if trainer.global_rank == 0:
            torch.save(gathered, os.path.join(self.out_dir, "ranks.pt"))
            torch.save(em, os.path.join(self.out_dir, "em.pt"))


def _train_on_two_processes(model, **kwargs) -> None:
    """Two epochs on two CPU processes (``ddp_spawn``), every cell in the training split."""
    model.train(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        train_size=1.0,
        enable_progress_bar=False,
        **kwargs,
    )


def test_train_with_ddp_spawn_keeps_ranks_in_sync(tmp_path):
    """``train(accelerator="cpu", devices=2, strategy="ddp_spawn")`` through scvi-tools.

    Checks that (1) after training both ranks hold identical centres, EM weights and
    parameters; (2) the EM weights count both ranks' cells at every step; (3) an EM update
    where each rank holds a different shard of one minibatch gives exactly the centres that a
    single process computes from the whole minibatch; (4) the main process gets the trained
    state back and the model predicts.
    """
    rng = np.random.default_rng(0)
    n, g = 160, 30
    types = rng.integers(0, 2, n)
    mu = np.where(types[:, None] == 0, 2.0, 0.5) * rng.uniform(0.5, 2, g)
    adata = ad.AnnData(
        rng.poisson(mu).astype(np.float32),
        obs=pd.DataFrame({"type": types.astype(str)}, index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(g)]),
    )
    scmoesim.MoESim.setup_anndata(adata, labels_key="type")
    scvi.settings.seed = 0
    model = scmoesim.MoESim(adata, n_experts=3)
    before = model.module.centre_weight.clone()
    _train_on_two_processes(model, batch_size=20, callbacks=[RankStateRecorder(str(tmp_path))])
    ranks = torch.load(tmp_path / "ranks.pt")
    assert ranks.shape[0] == 2
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)
    # 160 cells, 80 per rank, 4 steps of 20 per rank and epoch: every step's EM sums cover
    # both ranks' cells (gate probabilities sum to 1 per cell), so the decayed total weight is
    # that of 40-cell steps; without the all-reduce it would be that of 20-cell steps.
    k, d = model.module.n_experts, model.module.n_latent
    expected = torch.tensor(40 * sum(model.module.centre_decay**i for i in range(8)))
    torch.testing.assert_close(ranks[0][k * d : k * d + k].sum(), expected, rtol=1e-4, atol=1e-3)
    # the main process holds the trained state and the model is usable
    assert not torch.equal(model.module.centre_weight, before)
    torch.testing.assert_close(model.module.centre_weight.sum(), expected, rtol=1e-4, atol=1e-3)
    assert model.predict().shape == (n,)

    em = torch.load(tmp_path / "em.pt")
    torch.testing.assert_close(em[0], em[1], rtol=0, atol=0)
    single = MoESimTrainingPlan(MoESimModule(n_input=g, n_experts=k, n_latent=d))
    p, z = _batch(d=d, k=k)
    single._em_update({"p": p, "z": z})
    single._em_update({"p": p.flip(1), "z": z * 2})
    torch.testing.assert_close(em[0], single.module.centres)
    alone = MoESimTrainingPlan(MoESimModule(n_input=g, n_experts=k, n_latent=d))
    alone._em_update({"p": p[:25], "z": z[:25]})
    alone._em_update({"p": p[:25].flip(1), "z": z[:25] * 2})
    assert not torch.allclose(alone.module.centres, em[0])  # the all-reduce did the work


def test_ddp_batch_size_fits_the_cells_of_each_process():
    """40 cells over 2 processes, batch_size 32: each process gets one minibatch of 20.

    Without the cap each process's 20 cells would make no full minibatch of 32 (the last
    incomplete one is dropped) and no step would run.
    """
    rng = np.random.default_rng(1)
    n, g = 40, 12
    adata = ad.AnnData(
        rng.poisson(2.0, (n, g)).astype(np.float32),
        obs=pd.DataFrame(
            {"type": rng.integers(0, 2, n).astype(str)}, index=[f"c{i}" for i in range(n)]
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(g)]),
    )
    scmoesim.MoESim.setup_anndata(adata, labels_key="type")
    scvi.settings.seed = 0
    model = scmoesim.MoESim(adata, n_experts=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train_on_two_processes(model, batch_size=32)
    assert not [w for w in record if "No training step ran" in str(w.message)]
    assert len(model.history["elbo_train"]) == 2
