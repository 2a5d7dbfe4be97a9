import copy

import numpy as np
import pandas as pd
import pytest
import scvi
from anndata import AnnData
from scipy import sparse

import scmoesim
from scmoesim import MoESim

from .conftest import KIDNEY_SIGS, TRAIN

DOCUMENTED_OBS = {"_scvi_batch", "_scvi_labels"}
DOCUMENTED_UNS = {"_scvi_uuid", "_scvi_manager_uuid"}


def _trained(adata, setup=None, **model_kwargs):
    MoESim.setup_anndata(adata, **(setup or {}))
    model = MoESim(adata, **model_kwargs)
    model.train(**TRAIN)
    return model


def assert_unchanged_except(before: AnnData, after: AnnData, obs=(), obsm=(), uns=()):
    assert set(after.obs) - set(obs) - DOCUMENTED_OBS == set(before.obs) - DOCUMENTED_OBS
    keep = [c for c in before.obs if c not in DOCUMENTED_OBS]
    pd.testing.assert_frame_equal(before.obs[keep], after.obs[keep])
    assert set(after.obsm) - set(obsm) == set(before.obsm)
    assert set(after.uns) - set(uns) - DOCUMENTED_UNS == set(before.uns) - DOCUMENTED_UNS
    assert set(after.layers) == set(before.layers)
    for key in before.layers:
        assert (before.layers[key] != after.layers[key]).nnz == 0
    xb, xa = before.X, after.X
    if sparse.issparse(xb):
        assert (xb != xa).nnz == 0
    else:
        np.testing.assert_array_equal(xb, xa)
    pd.testing.assert_frame_equal(before.var, after.var)


# ---------------------------------------------------------------- signatures, end to end
def test_signatures_end_to_end(kidney):
    before = kidney.copy()
    model = _trained(kidney, {"layer": "counts", "signatures": KIDNEY_SIGS}, n_experts=4)
    assert model.is_trained_
    hist = model.history
    for key in (
        "reconstruction_loss_train",
        "kl_divergence_train",
        "similarity_loss_train",
        "depict_loss_train",
        "known_pair_fraction_train",
    ):
        assert key in hist and len(hist[key]) == TRAIN["max_epochs"]
        assert np.isfinite(hist[key].to_numpy(dtype=float)).all()
    assert (hist["known_pair_fraction_train"].to_numpy(dtype=float) > 0).all()

    assert set(KIDNEY_SIGS) <= set(model.cluster_names_)
    assert len(model.cluster_names_) == 4 and len(set(model.cluster_names_)) == 4

    z = model.get_latent_representation()
    assert z.shape == (kidney.n_obs, 20) and np.isfinite(z).all()
    hard = model.predict()
    assert isinstance(hard, pd.Categorical) and len(hard) == kidney.n_obs
    assert set(hard.categories) <= set(model.cluster_names_)
    soft = model.predict(soft=True)
    assert soft.shape == (kidney.n_obs, 4)
    assert list(soft.columns) == model.cluster_names_
    assert soft.index.equals(kidney.obs_names)
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, rtol=1e-5)
    # the hard call is the argmax of the soft one
    np.testing.assert_array_equal(
        np.asarray(hard).astype(str), soft.columns.to_numpy()[soft.to_numpy().argmax(1)]
    )
    assert_unchanged_except(before, kidney)


def test_annotate_writes_documented_keys_only(kidney):
    model = _trained(kidney, {"layer": "counts", "signatures": KIDNEY_SIGS}, n_experts=4)
    before = kidney.copy()
    model.annotate(kidney)
    assert kidney.obsm["X_moesim"].shape == (kidney.n_obs, 20)
    assert kidney.obsm["moesim_proba"].shape == (kidney.n_obs, 4)
    assert isinstance(kidney.obs["moesim_cluster"].dtype, pd.CategoricalDtype)
    uns = kidney.uns["moesim"]
    assert uns["cluster_names"] == model.cluster_names_
    assert uns["proba_columns"] == list(model.predict(soft=True).columns)
    assert uns["expert_usage"].sum() == kidney.n_obs
    assert len(uns["expert_usage"]) == 4
    assert uns["effective_n_clusters"] == kidney.obs["moesim_cluster"].nunique()
    assert uns["params"]["n_experts"] == 4
    assert_unchanged_except(
        before, kidney, obs=["moesim_cluster"], obsm=["X_moesim", "moesim_proba"], uns=["moesim"]
    )
    np.testing.assert_allclose(kidney.obsm["X_moesim"], model.get_latent_representation())


def test_map_new_cells_matches_training_cells(kidney):
    model = _trained(kidney, {"layer": "counts", "signatures": KIDNEY_SIGS}, n_experts=4)
    query = kidney[:50].copy()
    query.obs = query.obs.drop(columns=["_scvi_batch", "_scvi_labels"], errors="ignore")
    query.uns.clear()
    z_query = model.get_latent_representation(query)
    np.testing.assert_allclose(z_query, model.get_latent_representation()[:50], atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(model.predict(query)), np.asarray(model.predict())[:50]
    )
    # a view stays a view (scvi-tools would make it an AnnData in place), its parent unchanged
    parent = kidney.copy()
    view = parent[:50]
    obs_before = list(parent.obs)
    np.testing.assert_allclose(model.get_latent_representation(view), z_query, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.predict(view)), np.asarray(model.predict(query)))
    assert view.is_view and list(view.obs) == obs_before and list(parent.obs) == obs_before
    wrong = kidney[:20, :-3].copy()
    with pytest.raises(ValueError, match="genes differ from the model's: 3 missing"):
        model.get_latent_representation(wrong)
    reordered = kidney[:20, ::-1].copy()
    with pytest.raises(ValueError, match="different order"):
        model.predict(reordered)


# ---------------------------------------------------------------- labels
def test_partial_labels_nan_and_unknown(kidney):
    labels = kidney.obs["cell_type"].astype(object).copy()
    labels[labels == "unannotated"] = np.nan
    labels.iloc[:10] = "unknown"
    kidney.obs["partial"] = pd.Categorical(labels)
    model = _trained(kidney, {"layer": "counts", "labels_key": "partial"})
    codes = kidney.obs["_scvi_labels"].to_numpy()
    assert (codes[:10] == -1).all()
    assert (codes[kidney.obs["cell_type"].to_numpy() == "unannotated"] == -1).all()
    classes = sorted(set(labels.dropna()) - {"unknown"})
    assert model.module.n_experts == len(classes) + 1
    assert set(classes) <= set(model.cluster_names_)
    assert "unknown" not in model.cluster_names_


def test_labels_errors(kidney):
    kidney.obs["none"] = "unknown"
    with pytest.raises(ValueError, match="no labelled cell"):
        MoESim.setup_anndata(kidney, layer="counts", labels_key="none")
    with pytest.raises(KeyError, match="labels_key 'nope' not found"):
        MoESim.setup_anndata(kidney, layer="counts", labels_key="nope")
    MoESim.setup_anndata(kidney, layer="counts", labels_key="cell_type")
    with pytest.raises(ValueError, match="n_experts=2 is smaller than the number of label"):
        MoESim(kidney, n_experts=2)


# ---------------------------------------------------------------- likelihoods
@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_count_likelihoods_train_and_generate(kidney, likelihood):
    model = _trained(
        kidney,
        {"layer": "counts", "signatures": KIDNEY_SIGS},
        n_experts=4,
        likelihood=likelihood,
        dispersion="gene-expert",
    )
    assert np.isfinite(model.history["elbo_train"].to_numpy(dtype=float)).all()
    gen = model.generate(30, clusters=["leukocyte", "endothelial cell"], seed=1)
    assert gen.shape == (30, kidney.n_vars)
    assert sparse.issparse(gen.X) and np.issubdtype(gen.X.dtype, np.integer)
    assert gen.X.min() >= 0
    assert gen.layers["mean"].shape == (30, kidney.n_vars)
    assert set(gen.obs["moesim_cluster"]) <= {"leukocyte", "endothelial cell"}
    assert gen.obs["moesim_cluster"].value_counts().sum() == 30
    experts = [model.cluster_names_.index(c) for c in gen.obs["moesim_cluster"]]
    np.testing.assert_array_equal(gen.obs["moesim_expert"].to_numpy(), experts)
    assert gen.var_names.equals(kidney.var_names)
    # library sizes are drawn from the real cells of the cluster, and the counts add up to them
    real = np.asarray(kidney.layers["counts"].sum(1)).ravel()
    drawn = gen.obs["library_size"].to_numpy()
    assert real.min() * 0.99 <= drawn.min() and drawn.max() <= real.max() * 1.01
    totals = np.asarray(gen.X.sum(1)).ravel()
    # the counts are drawn around the stored expected values, which for the NB and the Poisson
    # add up to the library size; the ZINB's zero inflation takes its share off that
    expected = gen.layers["mean"].sum(1)
    assert 0.7 < np.median(totals / expected) < 1.4
    if likelihood != "zinb":
        assert 0.5 < np.median(totals / drawn) < 2
    else:
        assert np.all(expected <= drawn * 1.001)


def test_normal_likelihood_on_log_data(pbmc):
    model = _trained(
        pbmc,
        {"signatures": {"B": ["CD79A", "MS4A1"], "NK": ["NKG7", "GNLY"]}},
        likelihood="normal",
    )
    assert model.module.n_experts == 3
    gen = model.generate({"B": 5, "NK": 7})
    assert gen.obs["moesim_cluster"].value_counts()[lambda c: c > 0].to_dict() == {"NK": 7, "B": 5}
    assert gen.X.dtype == np.float32 and not sparse.issparse(gen.X)


def test_bernoulli_on_scaled_data(pbmc):
    x = pbmc.X.toarray()
    pbmc.layers["scaled"] = (x - x.min(0)) / np.maximum(x.max(0) - x.min(0), 1e-6)
    model = _trained(
        pbmc, {"layer": "scaled", "embedding_key": "X_pca"}, n_experts=5, likelihood="bernoulli"
    )
    gen = model.generate(10)
    assert ((gen.X >= 0) & (gen.X <= 1)).all()
    with pytest.raises(ValueError, match="needs data scaled to \\[0, 1\\]"):
        MoESim.setup_anndata(pbmc)
        MoESim(pbmc, likelihood="bernoulli")


def test_count_likelihood_rejects_log_data(pbmc):
    MoESim.setup_anndata(pbmc, embedding_key="X_pca")
    with pytest.raises(ValueError, match="non-integer values, but likelihood='nb'"):
        MoESim(pbmc)


# ---------------------------------------------------------------- other sources, covariates
def test_knn_source_and_batch_covariate(kidney):
    kidney.obsm["X_emb"] = np.random.default_rng(0).normal(size=(kidney.n_obs, 5))
    model = _trained(
        kidney,
        {"layer": "counts", "embedding_key": "X_emb", "batch_key": "sex"},
        n_experts=5,
        knn_metric="canberra",
    )
    assert model.module.experts.n_cat == 2
    # unnamed clusters are numbered by size: the largest is "0"
    assert model.cluster_names_[int(np.argmax(model.expert_usage_))] == "0"
    assert sorted(model.cluster_names_) == [str(i) for i in range(5)]
    gen = model.generate(12, batch="F")
    assert (gen.obs["batch"] == "F").all()
    with pytest.raises(ValueError, match="Unknown batch 'X'"):
        model.generate(3, batch="X")


def test_no_source_warns(kidney):
    MoESim.setup_anndata(kidney, layer="counts")
    with pytest.warns(UserWarning, match="No similarity source registered.*umap_embedding"):
        MoESim(kidney, n_experts=3)


# ---------------------------------------------------------------- errors before training
def test_setup_errors(kidney):
    with pytest.raises(ValueError, match="not found in adata.var_names: leukocyte: Nope1"):
        MoESim.setup_anndata(kidney, layer="counts", signatures={"leukocyte": ["Ptprc", "Nope1"]})
    with pytest.raises(KeyError, match="layer 'raw' not found"):
        MoESim.setup_anndata(kidney, layer="raw")
    with pytest.raises(KeyError, match="embedding_key 'X_umap' not found"):
        MoESim.setup_anndata(kidney, layer="counts", embedding_key="X_umap")
    bad = kidney.copy()
    bad.layers["counts"] = bad.layers["counts"].astype(np.float32)
    bad.layers["counts"].data[0] = np.nan
    with pytest.raises(ValueError, match="contains NaN or infinite"):
        MoESim.setup_anndata(bad, layer="counts")
    neg = kidney.copy()
    neg.layers["counts"] = neg.layers["counts"].astype(np.float32)
    neg.layers["counts"].data[0] = -1
    MoESim.setup_anndata(neg, layer="counts", signatures=KIDNEY_SIGS)
    with pytest.raises(ValueError, match="negative values"):
        MoESim(neg)
    with pytest.raises(ValueError, match="adata is empty"):
        MoESim.setup_anndata(kidney[:0].copy(), layer="counts")


def test_plan_kwargs_typo_fails_before_training(kidney):
    MoESim.setup_anndata(kidney, layer="counts", signatures=KIDNEY_SIGS)
    model = MoESim(kidney)
    with pytest.raises(TypeError, match="Unknown plan_kwargs \\['weight_decy'\\]"):
        model.train(max_epochs=1, plan_kwargs={"weight_decy": 0.1})
    assert not model.is_trained_


def test_generate_errors(kidney):
    model = _trained(kidney, {"layer": "counts", "signatures": KIDNEY_SIGS}, n_experts=4)
    with pytest.raises(ValueError, match="Unknown cluster\\(s\\) \\['liver'\\]"):
        model.generate(5, clusters=["liver"])
    with pytest.raises(ValueError, match="non-negative integers"):
        model.generate(-1)
    assert model.generate(0).n_obs == 0


# ---------------------------------------------------------------- persistence, determinism
def test_save_load_roundtrip(kidney, tmp_path):
    model = _trained(kidney, {"layer": "counts", "signatures": KIDNEY_SIGS}, n_experts=4)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="already exists"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    loaded = MoESim.load(tmp_path / "m", adata=kidney)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    np.testing.assert_array_equal(np.asarray(loaded.predict()), np.asarray(model.predict()))
    assert loaded.cluster_names_ == model.cluster_names_
    a, b = model.generate(20, seed=3), loaded.generate(20, seed=3)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.layers["mean"], b.layers["mean"])


def test_same_seed_same_result(kidney):
    runs = []
    for _ in range(2):
        scvi.settings.seed = 7
        adata = kidney.copy()
        runs.append(_trained(adata, {"layer": "counts", "signatures": KIDNEY_SIGS}, n_experts=4))
    np.testing.assert_array_equal(
        runs[0].get_latent_representation(), runs[1].get_latent_representation()
    )


def test_public_namespace():
    assert scmoesim.MoESim is MoESim
    assert isinstance(scmoesim.__version__, str)
    for name in ("metrics", "datasets", "similarity"):
        assert hasattr(scmoesim, name)
    assert copy.copy(scmoesim.datasets.PBMC_SIGNATURES)


def test_cluster_names_with_slashes_survive_h5ad(pbmc, tmp_path):
    import anndata as ad

    pbmc.obs["lab"] = pbmc.obs["bulk_labels"]
    model = _trained(pbmc, {"labels_key": "lab"}, likelihood="normal")
    assert "CD4+/CD25 T Reg" in model.cluster_names_
    model.annotate(pbmc)
    gen = model.generate({"CD4+/CD25 T Reg": 10, "CD19+ B": 10})
    pbmc.write_h5ad(tmp_path / "a.h5ad")
    gen.write_h5ad(tmp_path / "g.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert list(back.uns["moesim"]["cluster_names"]) == model.cluster_names_
    np.testing.assert_array_equal(back.uns["moesim"]["expert_usage"], model.expert_usage_)
    gback = ad.read_h5ad(tmp_path / "g.h5ad")
    assert sorted(gback.uns["moesim_generate"]["clusters"]) == ["CD19+ B", "CD4+/CD25 T Reg"]
    assert gback.uns["moesim_generate"]["n_cells"].sum() == 20


def test_non_unique_names_rejected(kidney):
    dup = kidney.copy()
    dup.var_names = [kidney.var_names[0]] * 2 + list(kidney.var_names[2:])
    with pytest.raises(ValueError, match="var_names are not unique"):
        MoESim.setup_anndata(dup, layer="counts")
    dup = kidney.copy()
    dup.obs_names = ["c"] * kidney.n_obs
    with pytest.raises(ValueError, match="obs_names are not unique"):
        MoESim.setup_anndata(dup, layer="counts")
    with pytest.raises(ValueError, match="adata is empty"):
        MoESim.setup_anndata(kidney[:, :0].copy(), layer="counts")


@pytest.mark.parametrize("fmt", ["csc", "dense64", "int32"])
def test_input_formats_and_all_zero_cells(kidney, fmt):
    x = kidney.layers["counts"].tocsr().astype(np.float64)
    x[:3] = 0  # all-zero cells must not break training (library size 0)
    x.eliminate_zeros()
    kidney.layers["counts"] = {
        "csc": sparse.csc_matrix(x),
        "dense64": x.toarray(),
        "int32": sparse.csr_matrix(x, dtype=np.int32),
    }[fmt]
    model = _trained(kidney, {"layer": "counts", "signatures": KIDNEY_SIGS}, n_experts=4)
    z = model.get_latent_representation()
    assert np.isfinite(z).all()
    usage = model.expert_usage()
    assert usage.sum() == kidney.n_obs and list(usage.index) == model.cluster_names_


def test_paper_options_train(kidney):
    """The paper's Eq. 3 KL and DEPICT (pi_2 = 1) stay available as options."""
    model = _trained(
        kidney,
        {"layer": "counts", "signatures": KIDNEY_SIGS},
        n_experts=4,
        kl="paper",
        depict_weight=1.0,
    )
    hist = model.history
    assert np.isfinite(hist["depict_loss_train"].to_numpy(dtype=float)).all()
    assert (hist["depict_loss_train"].to_numpy(dtype=float) > 0).all()
    assert model.module.kl == "paper" and model.module.depict_weight == 1.0
    with pytest.raises(ValueError, match="kl must be 'mixture' or 'paper'"):
        MoESim(kidney, kl="vade")


def test_generate_progress_bar_and_chunks_do_not_change_cells(kidney, capsys):
    model = _trained(kidney, {"layer": "counts", "signatures": KIDNEY_SIGS}, n_experts=4)
    a = model.generate(25, seed=5, chunk_size=7, progress_bar=True)
    assert "generating" in capsys.readouterr().err
    b = model.generate(25, seed=5)
    np.testing.assert_array_equal(a.obs["moesim_expert"], b.obs["moesim_expert"])
    assert a.n_obs == 25 and b.n_obs == 25


def test_keyboard_interrupt_keeps_a_usable_model(pbmc):
    from lightning.pytorch.callbacks import Callback

    class Interrupt(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    MoESim.setup_anndata(pbmc, signatures={"B": ["CD79A"], "NK": ["NKG7"]})
    model = MoESim(pbmc, likelihood="normal")
    with pytest.warns(UserWarning, match=r"interrupted by the user after \d epoch"):
        model.train(max_epochs=10, enable_progress_bar=False, callbacks=[Interrupt()])
    assert model.is_trained_
    assert {"B", "NK"} <= set(model.cluster_names_)
    assert np.isfinite(model.get_latent_representation()).all()
    assert len(model.predict()) == pbmc.n_obs


def test_other_exceptions_still_propagate(pbmc):
    from lightning.pytorch.callbacks import Callback

    class Boom(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise RuntimeError("boom")

    MoESim.setup_anndata(pbmc, signatures={"B": ["CD79A"]})
    model = MoESim(pbmc, likelihood="normal")
    with pytest.raises((RuntimeError, SystemExit)):
        model.train(max_epochs=3, enable_progress_bar=False, callbacks=[Boom()])
    assert not model.is_trained_


def test_anchor_pins_each_label_class_to_its_own_expert(pbmc):
    pbmc.obs["partial"] = (
        pbmc.obs["bulk_labels"].astype(str).where(np.arange(pbmc.n_obs) % 2 == 0, "unknown")
    )
    MoESim.setup_anndata(pbmc, labels_key="partial")
    scvi.settings.seed = 0
    model = MoESim(pbmc, likelihood="normal", anchor_weight=5.0)
    # 630 training cells: three full minibatches per epoch, none dropped
    model.train(max_epochs=15, batch_size=210, enable_progress_bar=False)
    classes = model._class_names()
    # expert k is named after class k: the anchor fixed the correspondence during training
    assert model.cluster_names_[: len(classes)] == classes
    hist = model.history["anchor_loss_train"].to_numpy().ravel()
    assert hist[-1] < hist[0]


def test_kl_weight_default_depends_on_the_similarity_source(pbmc):
    MoESim.setup_anndata(pbmc, signatures={"B": ["CD79A"], "NK": ["NKG7"]})
    assert MoESim(pbmc, likelihood="normal").module.kl_weight == 2.0
    assert MoESim(pbmc, likelihood="normal", kl_weight=0.3).module.kl_weight == 0.3
    MoESim.setup_anndata(pbmc, embedding_key="X_pca")
    model = MoESim(pbmc, likelihood="normal")
    assert model.module.kl_weight == 0.0
    assert model.init_params_["non_kwargs"]["kl_weight"] == 0.0  # saved resolved


def test_gate_dropout_acts_only_through_depict(kidney):
    """The pass that assigns cells never drops gate units; only DEPICT's noisy pass does."""

    def latent(gate_dropout, depict_weight):
        scvi.settings.seed = 3
        adata = kidney.copy()
        setup = {"layer": "counts", "signatures": KIDNEY_SIGS}
        model = _trained(
            adata, setup, n_experts=4, gate_dropout=gate_dropout, depict_weight=depict_weight
        )
        return model.get_latent_representation()

    np.testing.assert_array_equal(latent(0.0, 0.0), latent(0.5, 0.0))
    assert not np.array_equal(latent(0.0, 1.0), latent(0.5, 1.0))


def test_class_without_cells_is_matched_to_an_unused_expert():
    """A signature no cell carried used to take a populated expert's name (row of zeros: any
    expert ties); the populated expert is now numbered and the class gets an empty one."""
    from scmoesim.model._outputs import _names_from_mass

    mass = np.array([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 0, 0]])
    names = _names_from_mass(mass, ["A", "B", "C"], np.array([10, 10, 50, 0]))
    assert names == ["A", "B", "0", "C"]
    # real mass always wins over the tie-break
    mass = np.array([[1e-6, 0, 0], [0, 1.0, 0]])
    assert _names_from_mass(mass, ["A", "B"], np.array([5, 5, 900]))[:2] == ["A", "B"]


def test_prefixed_cluster_numbers_sort_as_numbers():
    """Classes named "0", "1" give the unnamed experts cluster_0, cluster_1, ... (no clash);
    their categories used to sort as text: cluster_10 before cluster_2."""
    from scmoesim.model._outputs import _number_key, _number_unnamed

    names = _number_unnamed(["0", "1"] + [None] * 12, np.arange(14)[::-1], 14)
    assert names[2:5] == ["cluster_0", "cluster_1", "cluster_2"]
    ordered = sorted(names[2:], key=_number_key)
    assert ordered == [f"cluster_{i}" for i in range(12)]
    assert sorted(["10", "2", "b", "a"], key=_number_key) == ["2", "10", "a", "b"]
