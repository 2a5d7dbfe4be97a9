"""Loss logging: epoch means kept on the device, logged once per epoch."""

import numpy as np
import pytest
import scvi
import torch

from scmoesim import MoESim, datasets
from scmoesim.train._epoch_means import EpochMeans


def _trained_pbmc400(**train_kwargs) -> MoESim:
    """2 epochs on 400 pbmc68k_reduced cells in minibatches of 32 (kNN on the PCA)."""
    adata = datasets.pbmc68k_reduced()[:400].copy()
    MoESim.setup_anndata(adata, embedding_key="X_pca")
    model = MoESim(adata, n_experts=8, likelihood="normal")
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False, **train_kwargs)
    return model


def test_epoch_means_weight_by_minibatch_size_and_start_afresh():
    means = EpochMeans()
    means.add("a", torch.tensor(1.0), 30)
    means.add("a", torch.tensor(4.0, requires_grad=True), 10)  # detached, no graph kept
    means.add("b", 2.5, 7)
    out = means.pop_means()
    assert set(out) == {"a", "b"}
    assert out["a"].item() == pytest.approx((30 * 1.0 + 10 * 4.0) / 40)
    assert out["b"].item() == pytest.approx(2.5)
    assert not out["a"].requires_grad
    assert means.pop_means() == {}


def test_epoch_logging_equals_lightnings_aggregates_of_per_step_logging():
    """The default (on_step=False) logs each value once per epoch; the history must hold what
    Lightning computes from per-step logs (on_step=True, its ``_epoch`` keys), including the
    validation minibatches of unequal size (40 cells in batches of 32)."""
    history = {}
    for on_step in (False, True):
        scvi.settings.seed = 0
        model = _trained_pbmc400(check_val_every_n_epoch=1, plan_kwargs={"on_step": on_step})
        history[on_step] = model.history
    expected = {"train_loss", "validation_loss", "elbo_train", "elbo_validation"}
    expected |= {f"similarity_loss_{m}" for m in ("train", "validation")}
    assert expected <= set(history[False])
    # every term the plan accepts as a scheduler metric is logged, and no other extra term
    from scmoesim.module._module import LOGGED_TERMS

    elbo = {"elbo", "reconstruction_loss", "kl_local", "kl_global"}
    extra = {k.removesuffix("_validation") for k in history[False] if k.endswith("_validation")}
    assert extra - elbo == set(LOGGED_TERMS)
    for key, frame in history[False].items():
        values = frame.to_numpy(dtype=float).ravel()
        assert len(values) == 2, key
        per_step = history[True][f"{key}_epoch"].to_numpy(dtype=float).ravel()
        np.testing.assert_allclose(values, per_step, rtol=1e-5, err_msg=key)


def test_checkpoint_records_each_epochs_means_with_limited_batches(tmp_path):
    """The periodic checkpoint (a callback, called before the module at the epoch's end) must
    find the epoch's training means, also when ``limit_train_batches`` ends the epoch early."""
    model = _trained_pbmc400(limit_train_batches=3, checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    history = saved["scmoesim_checkpoint"]["history"]
    for key in ("train_loss", "elbo_train", "similarity_loss_train"):
        np.testing.assert_allclose(
            history[key]["values"], model.history[key].to_numpy(dtype=float).ravel(), rtol=1e-6
        )
        assert history[key]["index"] == [0, 1], key
