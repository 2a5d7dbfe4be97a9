"""Saving, loading, mapping new data, checkpoints and resuming: nothing lost, clear errors."""

import warnings

import numpy as np
import pytest
import scvi
import torch
from lightning.pytorch.callbacks import Callback

from scmoesim import MoESim, datasets
from scmoesim.model import _io

SIGS = {"B": ["CD79A", "MS4A1"], "NK": ["NKG7", "GNLY"]}
FAST = {"enable_progress_bar": False, "batch_size": 64}


@pytest.fixture(scope="module")
def small():
    """200 pbmc68k_reduced cells (log data; normal likelihood) with a PCA embedding."""
    return datasets.pbmc68k_reduced()[:200].copy()


def _model(adata, seed=3, **kwargs):
    scvi.settings.seed = seed
    MoESim.setup_anndata(adata, signatures=SIGS, embedding_key="X_pca", batch_key="phase")
    return MoESim(adata, likelihood="normal", n_experts=4, n_latent=5, **kwargs)


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    adata = small.copy()
    model = _model(adata)
    model.train(max_epochs=2, **FAST)
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(path)
    return model, adata, path


# ---------------------------------------------------------------- save / load
def test_save_refuses_to_overwrite(trained):
    model, _, path = trained
    before = (path / "model.pt").read_bytes()
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        model.save(path)
    assert (path / "model.pt").read_bytes() == before
    model.save(path, overwrite=True)
    assert (path / "model.pt").is_file()


def test_save_load_is_bit_identical(trained, small):
    model, adata, path = trained
    assert model.saved_with_["scmoesim"] == _io.package_versions()["scmoesim"]
    assert set(model.saved_with_) == set(_io.RECORDED_PACKAGES)
    query = small.copy()  # a fresh, unregistered copy of the same cells
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = MoESim.load(path, adata=query)
    assert not [w for w in caught if "scmoesim" in str(w.message)]  # same versions: silent
    assert loaded.saved_with_ == model.saved_with_
    assert loaded.cluster_names_ == model.cluster_names_
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    np.testing.assert_array_equal(np.asarray(loaded.predict()), np.asarray(model.predict()))
    np.testing.assert_array_equal(
        loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy()
    )
    np.testing.assert_array_equal(loaded.latent_loc_, model.latent_loc_)
    np.testing.assert_array_equal(loaded.latent_scale_tril_, model.latent_scale_tril_)
    for key, value in model.latent_cells_.items():
        np.testing.assert_array_equal(loaded.latent_cells_[key], value)
    a, b = model.generate(30, seed=4), loaded.generate(30, seed=4)
    assert a.uns["moesim_generate"]["latent"] == "posterior"
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.obs["moesim_expert"], b.obs["moesim_expert"])
    np.testing.assert_array_equal(a.obs["batch"], b.obs["batch"])
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, loaded.module.state_dict()[key]), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a[:, 3:], r"3 missing \(e.g. \['"),
        (lambda a: a[:, ::-1], r"different order \(first difference at position 0"),
    ],
    ids=["missing-genes", "reordered"],
)
def test_load_names_gene_differences(trained, small, change, message):
    _, _, path = trained
    query = change(small).copy()
    with pytest.raises(ValueError, match="The AnnData passed to load does not match the model"):
        MoESim.load(path, adata=query)
    with pytest.raises(ValueError, match=message):
        MoESim.load(path, adata=query)


def test_load_extra_genes_named(trained, small):
    import anndata as ad

    _, _, path = trained
    extra = ad.AnnData(np.zeros((small.n_obs, 2), np.float32), obs=small.obs[[]])
    extra.var_names = ["NEWGENE1", "NEWGENE2"]
    query = ad.concat([small, extra], axis=1, merge="first")
    with pytest.raises(ValueError, match=r"2 extra \(e.g. \['NEWGENE1', 'NEWGENE2'\]\)"):
        MoESim.load(path, adata=query)


def test_load_warns_on_other_version(trained, small, tmp_path, monkeypatch):
    model, _, _ = trained
    old = dict(_io.package_versions(), scmoesim="0.0.1")
    monkeypatch.setattr(_io, "package_versions", lambda: old)
    model.save(tmp_path / "old")
    monkeypatch.undo()
    now = _io.package_versions()["scmoesim"]
    with pytest.warns(UserWarning, match=rf"saved with scmoesim 0\.0\.1 \(now {now}\)"):
        loaded = MoESim.load(tmp_path / "old", adata=small.copy())
    assert loaded.saved_with_["scmoesim"] == "0.0.1"


def test_load_without_version_record_warns(trained, small, tmp_path):
    model, _, path = trained
    saved = torch.load(path / "model.pt", weights_only=False)
    del saved["attr_dict"]["saved_with_"]
    (tmp_path / "m").mkdir()
    torch.save(saved, tmp_path / "m" / "model.pt")
    with pytest.warns(UserWarning, match="records no scmoesim version"):
        MoESim.load(tmp_path / "m", adata=small.copy())


def test_load_incompatible_weights_names_versions(trained, small, tmp_path):
    _, _, path = trained
    saved = torch.load(path / "model.pt", weights_only=False)
    saved["attr_dict"]["saved_with_"]["scmoesim"] = "9.9"
    saved["model_state_dict"]["gate_out.weight"] = torch.zeros(7, 3)
    (tmp_path / "m").mkdir()
    torch.save(saved, tmp_path / "m" / "model.pt")
    with pytest.warns(UserWarning, match="saved with scmoesim 9.9"):
        with pytest.raises(RuntimeError, match=r"saved with scmoesim 9\.9, this is .*gate_out"):
            MoESim.load(tmp_path / "m", adata=small.copy())


def test_load_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        MoESim.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.pt is missing"):
        MoESim.load(tmp_path / "empty")


def test_load_without_adata_needs_a_stored_anndata(trained):
    _, _, path = trained  # saved with save_anndata=False, the default
    with pytest.raises(ValueError, match=r"saved without its AnnData .*adata=\.\.\."):
        MoESim.load(path)


def test_load_onto_a_query_without_labels(small, tmp_path):
    """The usual reference-to-query step: the query has no labels column, or only unknowns."""
    reference = small.copy()
    scvi.settings.seed = 0
    MoESim.setup_anndata(reference, labels_key="bulk_labels")
    model = MoESim(reference, likelihood="normal", n_experts=len(set(small.obs["bulk_labels"])))
    model.train(max_epochs=1, **FAST)
    model.save(tmp_path / "m")
    expected = model.predict(small[:40].copy())
    no_column = small[:40].copy()
    del no_column.obs["bulk_labels"]
    unknown = small[:40].copy()
    unknown.obs["bulk_labels"] = "unknown"
    for query in (no_column, unknown):
        columns = list(query.obs)
        loaded = MoESim.load(tmp_path / "m", adata=query)
        assert (loaded.adata_manager.get_from_registry("labels").ravel() == -1).all()
        np.testing.assert_array_equal(np.asarray(loaded.predict()), np.asarray(expected))
        assert [c for c in query.obs if not c.startswith("_scvi")] == columns
    # a new setup (not a load) still needs labels
    with pytest.raises(KeyError, match="labels_key 'bulk_labels' not found"):
        MoESim.setup_anndata(no_column, labels_key="bulk_labels")


# ---------------------------------------------------------------- mapping new data
def _query_problems():
    def nan(a):
        a.X[0, 0] = np.nan

    def no_emb(a):
        del a.obsm["X_pca"]

    def new_batch(a):
        a.obs["phase"] = a.obs["phase"].astype(str)
        a.obs.iloc[0, a.obs.columns.get_loc("phase")] = "M"

    def no_batch(a):
        del a.obs["phase"]

    return [
        ("missing-genes", lambda a: a[:, 2:].copy(), r"2 missing"),
        ("reordered", lambda a: a[:, ::-1].copy(), "different order"),
        ("nan", nan, "NaN or infinite"),
        ("no-embedding", no_emb, "embedding_key 'X_pca' not found"),
        ("new-batch", new_batch, r"batch categories the model was not trained on: \['M'\]"),
        ("no-batch-column", no_batch, "batch_key 'phase' not found"),
    ]


@pytest.mark.parametrize(
    ("change", "message"), [p[1:] for p in _query_problems()], ids=[p[0] for p in _query_problems()]
)
@pytest.mark.parametrize("method", ["get_latent_representation", "predict", "annotate"])
def test_mapping_a_bad_query_fails_clearly(trained, small, change, message, method):
    model, _, _ = trained
    query = small[:40].copy()
    out = change(query)
    query = out if out is not None else query
    with pytest.raises((ValueError, KeyError), match=message):
        getattr(model, method)(query)


# ---------------------------------------------------------------- checkpoints, resuming
class _InterruptAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def test_interrupted_then_resumed_equals_uninterrupted(small, tmp_path):
    full = _model(small.copy())
    full.train(max_epochs=4, **FAST)

    first = _model(small.copy())
    with pytest.warns(UserWarning, match="interrupted by the user after 1 epoch"):
        first.train(max_epochs=4, checkpoint_dir=tmp_path, callbacks=[_InterruptAt(1)], **FAST)
    assert (tmp_path / "last.ckpt").is_file() and not (tmp_path / "last.ckpt.tmp").exists()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 0

    # a new session: same data, parameters and seed, another random initialisation is fine
    resumed = _model(small.copy(), seed=3)
    resumed.train(max_epochs=4, ckpt_path=tmp_path, checkpoint_dir=tmp_path, **FAST)
    # Equal to float32 rounding (last-digit differences appeared with the grouped expert kernel);
    # a lost optimizer state, centre buffer or RNG state changes the weights by orders more.
    for key, value in full.module.state_dict().items():
        torch.testing.assert_close(
            value, resumed.module.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key
        )
    assert sorted(full.history) == sorted(resumed.history)
    for key in full.history:
        np.testing.assert_allclose(
            full.history[key].to_numpy(dtype=float),
            resumed.history[key].to_numpy(dtype=float),
            rtol=1e-5,
        )
    assert len(resumed.history["elbo_train"]) == 4
    np.testing.assert_allclose(
        full.get_latent_representation(), resumed.get_latent_representation(), rtol=1e-4, atol=1e-5
    )
    assert full.cluster_names_ == resumed.cluster_names_
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 3


def test_checkpoint_every_n_epochs_and_file_path(small, tmp_path):
    model = _model(small.copy())
    model.train(max_epochs=3, checkpoint_dir=tmp_path, checkpoint_every_n_epochs=2, **FAST)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2  # the last epoch is always written
    assert torch.equal(ckpt["state_dict"]["module.centre_sum"], model.module.centre_sum)
    assert ckpt["optimizer_states"][0]["state"]  # Adam moments are there
    more = _model(small.copy())
    more.train(max_epochs=4, ckpt_path=tmp_path / "last.ckpt", **FAST)
    assert len(more.history["elbo_train"]) == 4
    # a finished checkpoint with nothing left to train: refused before Lightning restores it
    # (it used to load the weights, warn that no step ran and leave the model untrained)
    done = _model(small.copy())
    before = {k: v.clone() for k, v in done.module.state_dict().items()}
    with pytest.raises(ValueError, match=r"already holds 3 epochs and max_epochs=3"):
        done.train(max_epochs=3, ckpt_path=tmp_path, **FAST)
    assert all(torch.equal(v, done.module.state_dict()[k]) for k, v in before.items())
    assert not done.is_trained_
    # training by steps (max_epochs=-1, Lightning's no limit) resumes as before
    steps = _model(small.copy())
    steps.train(max_epochs=-1, max_steps=int(ckpt["global_step"]) + 2, ckpt_path=tmp_path, **FAST)
    assert steps.is_trained_


def test_resume_errors(small, tmp_path):
    model = _model(small.copy())
    model.train(max_epochs=1, checkpoint_dir=tmp_path, **FAST)
    other = small.copy()
    MoESim.setup_anndata(other, signatures=SIGS, embedding_key="X_pca", batch_key="phase")
    wrong = MoESim(other, likelihood="normal", n_experts=5, n_latent=5)
    with pytest.raises(ValueError, match=r"other settings .*gate_out.weight: \(4, 100\) vs"):
        wrong.train(max_epochs=2, ckpt_path=tmp_path, **FAST)
    assert not wrong.is_trained_
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        model.train(max_epochs=2, ckpt_path=tmp_path / "nope", **FAST)
    with pytest.raises(ValueError, match="checkpoint_every_n_epochs must be >= 1"):
        model.train(max_epochs=2, checkpoint_dir=tmp_path, checkpoint_every_n_epochs=0, **FAST)
