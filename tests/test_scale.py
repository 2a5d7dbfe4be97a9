"""Speed- and scale-related behaviour: grouped expert matmuls, no host syncs, backed data."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from torch.overrides import TorchFunctionMode

import scmoesim
from scmoesim import _constants as K
from scmoesim.model import _validate
from scmoesim.nn import _grouped
from scmoesim.nn._grouped import _SegmentMM, grouped_mm
from scmoesim.similarity import _signatures
from scmoesim.train import MoESimTrainingPlan


@pytest.mark.parametrize("n_in, n_out", [(3, 4), (3, 5), (20, 100), (103, 64)])
@pytest.mark.parametrize("counts", [[0, 3, 0, 2, 0], [4, 0, 0, 0, 1], [0, 0, 0, 0, 5]])
def test_grouped_mm_matches_per_segment_products(n_in, n_out, counts):
    """Values and gradients equal per-segment matmuls, with empty groups anywhere."""
    torch.manual_seed(0)
    x = torch.randn(5, n_in, requires_grad=True)
    w = torch.randn(5, n_in, n_out, requires_grad=True)
    g = torch.randn(5, n_out)
    out = grouped_mm(x, w, torch.tensor(counts))
    (out * g).sum().backward()
    groups = np.repeat(np.arange(5), counts)
    ref = torch.stack([x[i] @ w[k] for i, k in enumerate(groups)])
    torch.testing.assert_close(out, ref)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (ref * g).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
    for k in np.flatnonzero(np.asarray(counts) == 0):
        assert gw[k].abs().sum() == 0


def test_segment_fallback_matches_grouped_mm():
    torch.manual_seed(1)
    x = torch.randn(7, 8, requires_grad=True)
    w = torch.randn(3, 8, 12, requires_grad=True)
    counts = torch.tensor([2, 0, 5])
    a = grouped_mm(x, w, counts)
    b = _SegmentMM.apply(x, w, [2, 0, 5])
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.square().sum(), (x, w))
    gb = torch.autograd.grad(b.square().sum(), (x, w))
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v)


# ---------------------------------------------------------------------- host syncs
_SYNC_METHODS = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "unique",
    "masked_select",
    "bincount",
    "repeat_interleave",
}


class SyncRecorder(TorchFunctionMode):
    """Records torch calls that force a host-device sync on an accelerator.

    CUDA's own detector (``torch.cuda.set_sync_debug_mode``) needs a GPU; this one sees the
    same culprits on the CPU: reading values on the host (``.item()``, ``.tolist()``,
    ``bool(t)``, ``.cpu()``, ``.numpy()``) and ops whose output shape depends on the values
    (``nonzero``, boolean-mask indexing, ``unique``, ``bincount``, ...).
    """

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _SYNC_METHODS:
            self.calls.append(name)
        if name == "__getitem__" and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self.calls.append("__getitem__[bool mask]")
        return func(*args, **(kwargs or {}))


def _toy_adata(n=64, g=24, seed=0):
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n)
    mu = rng.uniform(0.2, 3, (3, g))[types]
    obs = pd.DataFrame(
        {"type": types.astype(str), "batch": rng.integers(0, 2, n).astype(str)},
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(
        sparse.csr_matrix(rng.poisson(mu).astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=[f"g{j}" for j in range(g)]),
    )
    adata.obsm["X_pca"] = rng.normal(size=(n, 4)).astype(np.float32) + types[:, None]
    return adata


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson", "normal"])
def test_training_step_has_no_host_sync(likelihood):
    """Forward, all similarity sources, loss, backward, fused Adam and the EM update."""
    adata = _toy_adata()
    scmoesim.MoESim.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="type",
        signatures={"a": ["g0"], "b": ["g1", "g2"]},
        embedding_key="X_pca",
    )
    model = scmoesim.MoESim(adata, n_experts=4, likelihood=likelihood, n_hidden=16, n_latent=8)
    module = model.module.train()
    plan = MoESimTrainingPlan(module)
    opt = plan.configure_optimizers()["optimizer"]
    batch = next(iter(model._make_data_loader(adata=adata, batch_size=32, shuffle=False)))
    assert all(key in batch for key in (K.X_KEY, K.BATCH_KEY, K.LABELS_KEY, K.EMBEDDING_KEY))
    assert _grouped.uses_grouped_mm(next(iter(module.experts.head_weights.values())))
    for _ in range(2):  # the second step runs with Adam's state in place
        with SyncRecorder() as rec:
            inf, _, loss = module(batch, compute_loss=True)
            opt.zero_grad()
            loss.loss.backward()
            opt.step()
            plan._em_update(inf)
        assert rec.calls == [], f"host syncs in the training step: {rec.calls}"
    assert torch.isfinite(loss.loss)


def test_sync_recorder_catches_syncs():
    """The detector is not blind: it sees the usual culprits."""
    t = torch.arange(4.0)
    with SyncRecorder() as rec:
        t.sum().item()
        bool(t.max() > 1)
        t[t > 1]
        torch.bincount(t.long())
    assert rec.calls == ["item", "__bool__", "__getitem__[bool mask]", "bincount"]


def test_segment_fallback_is_the_only_sync_and_is_counted(monkeypatch):
    """Without grouped_mm (older PyTorch), the experts read the segment sizes once per matmul."""
    monkeypatch.setattr(_grouped, "_GROUPED_MM", None)
    from scmoesim.nn import RoutedExperts

    experts = RoutedExperts(3, 4, {"scale": 8}, n_hidden=8, n_layers=1)
    with SyncRecorder() as rec:
        out = experts(torch.randn(6, 4), torch.tensor([2, 0, 2, 1, 0, 2]))["scale"]
    assert out.shape == (6, 8)
    assert rec.calls == ["tolist", "tolist"]  # one hidden layer + one head


# ---------------------------------------------------------------------- backed data
def test_train_from_backed_h5ad_without_loading_x(tmp_path, monkeypatch):
    """setup_anndata, signatures, training and outputs on ``read_h5ad(backed="r")``."""
    adata = _toy_adata(n=300, g=32)
    path = tmp_path / "toy.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    x_ds = backed.X
    assert not sparse.issparse(x_ds)  # a backed dataset, not a matrix in memory

    loaded_rows = []
    orig = type(x_ds).__getitem__

    def spy(self, idx):
        out = orig(self, idx)
        loaded_rows.append(out.shape[0])
        return out

    monkeypatch.setattr(type(x_ds), "__getitem__", spy)
    monkeypatch.setattr(
        type(x_ds), "to_memory", lambda self: pytest.fail("X was read whole (to_memory)")
    )
    # chunks of 50 cells (10,000 by default) so that a whole-matrix read would show
    monkeypatch.setattr(_validate, "_CHUNK", 50)
    chunks = _signatures._row_chunks
    monkeypatch.setattr(_signatures, "_row_chunks", lambda x: chunks(x, chunk_size=50))
    scmoesim.MoESim.setup_anndata(backed, labels_key="type", signatures={"a": ["g0"]})
    model = scmoesim.MoESim(backed, n_experts=4, n_hidden=16, n_latent=8)
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    # reads: setup statistics in chunks of 50, training minibatches of 32, then the
    # post-training summary pass in scvi-tools' default inference batches of 128; never all
    assert loaded_rows and max(loaded_rows) <= 128 < backed.n_obs
    assert backed.isbacked
    assert model.predict().shape == (300,)

    monkeypatch.undo()
    mem = ad.read_h5ad(path)
    scmoesim.MoESim.setup_anndata(mem, labels_key="type", signatures={"a": ["g0"]})
    model_mem = scmoesim.MoESim(mem, n_experts=4, n_hidden=16, n_latent=8)
    torch.testing.assert_close(
        model.module.signature_scorer.means, model_mem.module.signature_scorer.means
    )
    torch.testing.assert_close(
        model.module.signature_scorer.sds, model_mem.module.signature_scorer.sds
    )


def test_embedding_check_does_not_copy_the_embedding():
    """Finiteness is checked chunk by chunk in the stored dtype (no float64 copy of it all)."""
    import tracemalloc

    emb = np.random.default_rng(0).normal(size=(100_000, 20)).astype(np.float32)
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(emb.shape[0])]))
    adata.obsm["X_pca"] = emb
    tracemalloc.start()
    _validate.check_embedding(adata, "X_pca")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < emb.nbytes / 10
    adata.obsm["X_pca"][-1, -1] = np.inf  # in the last chunk
    with pytest.raises(ValueError, match="contains NaN or infinite"):
        _validate.check_embedding(adata, "X_pca")
    adata.obsm["X_pca"] = np.full((emb.shape[0], 2), "a", dtype=object)
    with pytest.raises(TypeError, match="must be numeric"):
        _validate.check_embedding(adata, "X_pca")


def test_streamed_training_summary_equals_the_per_cell_computation():
    """Usage, names, batch counts and library quantiles as computed from a full per-cell pass."""
    from scmoesim.model import _outputs

    adata = _toy_adata(n=300)
    scmoesim.MoESim.setup_anndata(adata, labels_key="type", batch_key="batch")
    model = scmoesim.MoESim(adata, n_experts=5, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    out = model._pass(reference=True, batch_size=7)  # other minibatches than the summary's
    usage = np.bincount(out["expert"], minlength=5)
    np.testing.assert_array_equal(model.expert_usage_, usage)
    assert model.cluster_names_ == _outputs._name_experts(
        out["p"], out["reference"], model._class_names(), usage
    )
    assert {"0", "1", "2"} <= set(model.cluster_names_)
    np.testing.assert_array_equal(model.expert_batch_counts_, _outputs._batch_counts(out, 5, 2))
    assert model.expert_batch_counts_.sum() == 300 and model.expert_batch_counts_.shape == (5, 2)
    np.testing.assert_allclose(
        model.library_quantiles_, _outputs._library_quantiles(out, 5, 2), equal_nan=True
    )
    # the fitted latent distributions, from the per-cell posterior means and variances
    full = model._pass(variance=True, batch_size=7)
    centres = model.module.centres.detach().numpy()
    for k in range(5):
        rows = full["expert"] == k
        n, d = int(rows.sum()), 4
        if n < 2:  # the prior
            np.testing.assert_allclose(model.latent_loc_[k], centres[k], rtol=1e-6)
            np.testing.assert_array_equal(model.latent_scale_tril_[k], np.eye(d))
            continue
        cov = np.cov(full["z"][rows].T.astype(np.float64)) + np.diag(full["qz_v"][rows].mean(0))
        shrink = min(1.0, d / n)
        cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov))
        chol = model.latent_scale_tril_[k].astype(np.float64)
        np.testing.assert_allclose(model.latent_loc_[k], full["z"][rows].mean(0), atol=1e-5)
        np.testing.assert_allclose(chol @ chol.T, cov, rtol=1e-4, atol=1e-6)
        assert np.allclose(chol, np.tril(chol))
    # the kept cells of latent="posterior": all 300 (below the cap), in the data's order
    cells = model.latent_cells_
    np.testing.assert_array_equal(cells["expert"], full["expert"])
    np.testing.assert_array_equal(cells["batch"], full["batch"])
    np.testing.assert_allclose(cells["loc"], full["z"], atol=1e-5)
    np.testing.assert_allclose(cells["scale"] ** 2, full["qz_v"], rtol=1e-4)
    np.testing.assert_allclose(cells["library"], full["library"], rtol=1e-6)
