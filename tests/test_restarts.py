"""train(n_restarts=...): several initialisations, the lowest similarity loss kept."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import scmoesim
from scmoesim.model._restarts import clustering_objective

from .conftest import KIDNEY_SIGS

TRAIN = {"max_epochs": 4, "batch_size": 64, "enable_progress_bar": False}


@pytest.fixture
def mixture():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=5.0, size=(4, 12))
    labels = rng.integers(0, 4, 320)
    x = (centres[labels] + rng.normal(size=(320, 12))).astype(np.float32)
    adata = ad.AnnData(x)
    adata.obsm["X_emb"] = x[:, :6].copy()
    adata.obs["lab"] = pd.Categorical(np.where(labels < 2, labels.astype(str), "unknown"))
    return adata


def _model(adata, **setup):
    setup = setup or {"embedding_key": "X_emb"}
    scmoesim.MoESim.setup_anndata(adata, **setup)
    return scmoesim.MoESim(adata, likelihood="normal", n_experts=6)


def test_restarts_keep_the_lowest_loss(mixture):
    model = _model(mixture)
    before = mixture.copy()  # after setup_anndata's registration
    model.train(n_restarts=3, **TRAIN)
    table = model.restarts_
    assert list(table.index) == [0, 1, 2]
    assert list(table.columns) == ["seed", "similarity_loss", "n_clusters", "epochs", "kept"]
    assert list(table["seed"]) == [0, 1, 2]
    assert (table["epochs"] == 4).all()
    assert table["similarity_loss"].nunique() == 3  # different initialisations
    assert table["kept"].sum() == 1
    kept = table.index[table["kept"]][0]
    assert kept == table["similarity_loss"].idxmin()
    # the model holds the kept restart: its weights give the recorded loss and clusters
    loss, n_clusters = clustering_objective(model, 64)
    assert loss == pytest.approx(table.loc[kept, "similarity_loss"], rel=1e-6)
    assert n_clusters == table.loc[kept, "n_clusters"] == model.effective_n_clusters()
    assert len(model.history["train_loss"]) == 4  # one training's history, not three
    assert model.expert_usage_.sum() == mixture.n_obs
    # training with restarts writes nothing into the user's AnnData
    assert set(mixture.obsm) == set(before.obsm) and list(mixture.obs) == list(before.obs)
    np.testing.assert_array_equal(mixture.X, before.X)


def test_restart_zero_is_the_plain_training(mixture):
    model = _model(mixture)
    model.train(n_restarts=2, **TRAIN)
    scvi.settings.seed = 0
    plain = _model(mixture)
    plain.train(**TRAIN)
    assert plain.restarts_ is None
    loss, _ = clustering_objective(plain, 64)
    assert loss == pytest.approx(model.restarts_.loc[0, "similarity_loss"], rel=1e-6)
    if model.restarts_.loc[0, "kept"]:
        for key, value in plain.module.state_dict().items():
            torch.testing.assert_close(model.module.state_dict()[key], value)


def test_objective_is_deterministic_and_uses_labels(mixture):
    model = _model(mixture, labels_key="lab", unlabeled_category="unknown")
    model.train(**TRAIN)
    first = clustering_objective(model, 64)
    assert first == clustering_objective(model, 64)
    assert np.isfinite(first[0]) and first[0] > 0
    model.train(max_epochs=30, batch_size=64, enable_progress_bar=False)
    assert clustering_objective(model, 64)[0] < first[0]  # training lowers what it optimises


def test_restarts_are_saved(mixture, tmp_path):
    model = _model(mixture)
    model.train(n_restarts=2, **TRAIN)
    model.save(tmp_path / "m")
    loaded = scmoesim.MoESim.load(tmp_path / "m", adata=mixture)
    pd.testing.assert_frame_equal(loaded.restarts_, model.restarts_)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "n_restarts must be an integer >= 1, got 0"),
        (2.0, TypeError, "n_restarts must be an integer >= 1, got 2.0"),
        (True, TypeError, "n_restarts must be an integer"),
    ],
)
def test_bad_n_restarts(mixture, value, error, match):
    model = _model(mixture)
    with pytest.raises(error, match=match):
        model.train(n_restarts=value, **TRAIN)


def test_restarts_refuse_what_cannot_work(mixture, tmp_path):
    model = _model(mixture)
    with pytest.raises(ValueError, match="checkpoint_dir or ckpt_path"):
        model.train(n_restarts=2, checkpoint_dir=tmp_path, **TRAIN)
    model.train(**TRAIN)
    with pytest.raises(ValueError, match="already trained"):
        model.train(n_restarts=2, **TRAIN)
    bare = mixture.copy()
    scmoesim.MoESim.setup_anndata(bare)
    with pytest.warns(UserWarning, match="No similarity source"):
        no_source = scmoesim.MoESim(bare, likelihood="normal", n_experts=4)
    with pytest.raises(ValueError, match="no similarity source is registered"):
        no_source.train(n_restarts=2, **TRAIN)


def test_restarts_with_signatures_copy_the_scorer(kidney):
    scmoesim.MoESim.setup_anndata(kidney, layer="counts", signatures=KIDNEY_SIGS)
    model = scmoesim.MoESim(kidney, n_experts=4)
    scorer = model.module.signature_scorer
    model.train(n_restarts=2, **TRAIN)
    kept = model.module.signature_scorer
    assert (kept is scorer) == bool(model.restarts_.loc[0, "kept"])
    for key, value in scorer.state_dict().items():
        torch.testing.assert_close(kept.state_dict()[key], value)
    assert set(model.predict().unique()) <= set(KIDNEY_SIGS) | {"3"}
