import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pytest
import scanpy as sc
import scvi
import torch

from scmoesim import MoESim, datasets, metrics, pl

SIGS = {k: datasets.PBMC_SIGNATURES[k] for k in ("CD14+ Monocyte", "CD19+ B", "CD56+ NK")}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _small_pbmc() -> ad.AnnData:
    adata = datasets.pbmc68k_reduced()[::3].copy()  # 234 cells, log data
    return adata


def _train(adata, **setup):
    scvi.settings.seed = 0
    MoESim.setup_anndata(adata, **setup)
    model = MoESim(adata, likelihood="normal", n_experts=4, n_latent=5, n_hidden=32)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False, log_every_n_steps=1)
    return model


@pytest.fixture(scope="module")
def trained():
    """One small model (pbmc subset, 3 signatures, 2 epochs) and its annotated AnnData."""
    adata = _small_pbmc()
    model = _train(adata, signatures=SIGS)
    model.annotate(adata)
    return model, adata


@pytest.fixture(scope="module")
def untrained():
    adata = _small_pbmc()
    scvi.settings.seed = 0
    MoESim.setup_anndata(adata, signatures=SIGS)
    return MoESim(adata, likelihood="normal", n_experts=4, n_latent=5, n_hidden=32)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


# ---------------------------------------------------------------- training curves
def test_training_curves_one_panel_per_loss_term(trained, tmp_path):
    model, _ = trained
    fig = pl.training_curves(model, save=tmp_path / "curves.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "reconstruction_loss",
        "kl_divergence",
        "similarity_loss",
        "depict_loss",
        "clustering_loss",
    ]
    for ax, key in zip(fig.axes, pl._training.DEFAULT_KEYS, strict=True):
        (line,) = ax.get_lines()
        expected = model.history[key].iloc[:, 0].to_numpy(dtype=float)
        np.testing.assert_allclose(line.get_ydata(), expected)
        np.testing.assert_array_equal(line.get_xdata(), [0, 1])
        assert ax.get_xlabel() == "epoch"
    _assert_png(tmp_path / "curves.png")


def test_training_curves_of_per_step_logging(trained, monkeypatch):
    """plan_kwargs={"on_step": True} records {key}_step and {key}_epoch, not {key}."""
    model, _ = trained
    stepped = {}
    for key, frame in model.history.items():
        stepped[f"{key}_epoch"] = frame
        stepped[f"{key}_step"] = frame.iloc[:1]
    monkeypatch.setattr(model, "history_", stepped)
    fig = pl.training_curves(model)
    assert [ax.get_title() for ax in fig.axes][:3] == [
        "reconstruction_loss",
        "kl_divergence",
        "similarity_loss",
    ]
    (line,) = fig.axes[2].get_lines()
    expected = stepped["similarity_loss_train_epoch"].iloc[:, 0].to_numpy(dtype=float)
    np.testing.assert_allclose(line.get_ydata(), expected)
    plt.close(fig)


def test_training_curves_chosen_keys_and_errors(trained, untrained):
    model, _ = trained
    fig = pl.training_curves(model, keys=["similarity_loss", "elbo_train"], ncols=1)
    assert [ax.get_title() for ax in fig.axes] == ["similarity_loss", "elbo"]
    assert len(pl.training_curves(model, keys="depict_loss_train").axes) == 1
    with pytest.raises(KeyError, match="available keys"):
        pl.training_curves(model, keys=["no_such_loss"])
    with pytest.raises(RuntimeError, match="not trained"):
        pl.training_curves(untrained)
    with pytest.raises(TypeError, match="MoESim"):
        pl.training_curves(object())


# ---------------------------------------------------------------- expert usage
def test_expert_usage_bars_from_model(trained, tmp_path):
    model, _ = trained
    usage = model.expert_usage()
    fig = pl.expert_usage(model, save=tmp_path / "usage.png")
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_array_equal(heights, usage.to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == list(usage.index)
    n_eff = int((usage > 0).sum())
    assert ax.get_title() == f"effective number of clusters: {n_eff} of {len(usage)}"
    _assert_png(tmp_path / "usage.png")


def test_expert_usage_from_annotated_adata_and_ax(trained, tmp_path):
    model, adata = trained
    expected = model.expert_usage()
    _, ax = plt.subplots()
    assert pl.expert_usage(adata, ax=ax) is ax
    np.testing.assert_array_equal([p.get_height() for p in ax.patches], expected.to_numpy())
    # the order of the bars survives an .h5ad round trip (h5py sorts dict keys)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    fig = pl.expert_usage(back, sort=True)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == sorted(heights, reverse=True)
    assert dict(zip(labels, heights, strict=True)) == expected.to_dict()


def test_expert_usage_errors(untrained):
    with pytest.raises(KeyError, match="annotate"):
        pl.expert_usage(ad.AnnData(np.zeros((3, 2), dtype=np.float32)))
    with pytest.raises(RuntimeError, match="not trained"):
        pl.expert_usage(untrained)


# ---------------------------------------------------------------- similarity
def test_similarity_images_match_model_matrices(trained, tmp_path):
    model, adata = trained
    idx = np.arange(0, 120, 2)
    fig = pl.similarity(model, indices=idx, save=tmp_path / "sim.png")
    assert len(fig.axes) == 3  # S, P P^T, colorbar
    ax_s, ax_p = fig.axes[:2]
    s_img = ax_s.images[0].get_array()
    ppt_img = np.asarray(ax_p.images[0].get_array())

    # expected, computed independently: P from predict, S from the signature codes
    proba = model.predict(indices=idx, soft=True).to_numpy()
    order = np.argsort(proba.argmax(1), kind="stable")
    p = proba[order]
    np.testing.assert_allclose(ppt_img, p @ p.T, rtol=1e-5, atol=1e-6)

    x = torch.as_tensor(adata.X[idx].toarray(), dtype=torch.float32)
    codes = model.module.signature_scorer(x, None).numpy()[order]
    known = (codes[:, None] >= 0) & (codes[None, :] >= 0)
    np.fill_diagonal(known, False)
    assert known.any() and not known.all()
    np.testing.assert_array_equal(np.ma.getmaskarray(s_img), ~known)
    same = (codes[:, None] == codes[None, :]).astype(float)
    np.testing.assert_array_equal(s_img.data[known], same[known])
    # cluster blocks are named on the y axis
    names = np.asarray(model.cluster_names_)[p.argmax(1)]
    assert [t.get_text() for t in ax_p.get_yticklabels()] == list(dict.fromkeys(names))
    _assert_png(tmp_path / "sim.png")


def test_similarity_blocks_are_clusters_after_a_merge(trained, monkeypatch):
    """Experts 0 and 2 merged: one block named once, not one per expert."""
    model, _ = trained
    idx = np.arange(0, 120, 2)
    experts = model.predict(indices=idx, soft=True).to_numpy().argmax(1)
    assert {0, 2} <= set(experts.tolist())
    names = list(model.cluster_names_)
    merged = list(names)
    merged[2] = names[0]
    monkeypatch.setattr(model, "cluster_names_", merged)
    fig = pl.similarity(model, indices=idx)
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert len(labels) == len(set(labels)) == len({merged[k] for k in experts})
    assert labels[0] == merged[0]
    # the merged block holds the cells of both experts, on top
    n_merged = int(np.isin(experts, [0, 2]).sum())
    ticks = fig.axes[1].get_yticks()
    assert ticks[0] == pytest.approx((n_merged - 1) / 2)
    plt.close(fig)


def test_similarity_random_minibatch(trained):
    model, adata = trained
    fig = pl.similarity(model, n_cells=40, seed=1)
    assert fig.axes[0].images[0].get_array().shape == (40, 40)
    a = pl.similarity(model, n_cells=40, seed=1).axes[1].images[0].get_array()
    b = fig.axes[1].images[0].get_array()
    np.testing.assert_array_equal(a, b)  # same seed, same cells
    fig = pl.similarity(model, n_cells=10_000)  # capped at the number of cells
    assert fig.axes[1].images[0].get_array().shape == (adata.n_obs, adata.n_obs)
    with pytest.raises(ValueError, match="n_cells"):
        pl.similarity(model, n_cells=1)


def test_similarity_errors(untrained):
    with pytest.raises(RuntimeError, match="not trained"):
        pl.similarity(untrained)


# ---------------------------------------------------------------- confusion
def test_confusion_values_and_counts(trained, tmp_path):
    _, adata = trained
    fig = pl.confusion(adata, truth_key="bulk_labels", save=tmp_path / "conf.png")
    ax = fig.axes[0]
    table = metrics.contingency(
        adata.obs["bulk_labels"].astype(str), adata.obs["moesim_cluster"].astype(str)
    )
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    assert rows == list(adata.obs["bulk_labels"].cat.categories)  # categorical order kept
    assert cols == list(adata.obs["moesim_cluster"].cat.categories)
    counts = table.loc[rows, cols].to_numpy()
    img = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(img, counts / counts.sum(1, keepdims=True))
    np.testing.assert_allclose(img.sum(1), 1.0)
    texts = sorted(int(t.get_text()) for t in ax.texts)
    assert texts == sorted(counts[counts > 0].tolist())
    assert ax.get_ylabel() == "bulk_labels"
    _assert_png(tmp_path / "conf.png")


def test_confusion_arrays_counts_ignore_and_ax():
    truth = ["a", "a", "b", "b", "b", "unknown", None]
    pred = ["0", "1", "1", "1", "1", "0", "0"]
    _, ax = plt.subplots()
    out = pl.confusion(truth, pred, normalize=False, ignore=["unknown"], ax=ax)
    assert out is ax
    np.testing.assert_array_equal(ax.images[0].get_array(), [[1, 1], [0, 3]])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "1", "3"]
    fig = pl.confusion(truth, pred, annotate=False)
    assert len(fig.axes[0].texts) == 0
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [[0.5, 0.5], [0, 1], [1, 0]])


def test_confusion_errors(trained):
    _, adata = trained
    with pytest.raises(ValueError, match="truth_key"):
        pl.confusion(adata)
    with pytest.raises(KeyError, match="nope"):
        pl.confusion(adata, truth_key="nope")
    with pytest.raises(KeyError, match="annotate"):
        pl.confusion(adata, truth_key="bulk_labels", cluster_key="missing")
    with pytest.raises(ValueError, match="length"):
        pl.confusion(["a", "b"], ["0"])


# ---------------------------------------------------------------- generated vs real
def test_generated_vs_real(trained, tmp_path):
    model, adata = trained
    generated = model.generate(60, seed=0)
    fig = pl.generated_vs_real(adata, generated, save=tmp_path / "gen.png")
    assert len(fig.axes) == 2
    ax_origin, ax_cluster = fig.axes
    assert [t.get_text() for t in ax_origin.get_legend().get_texts()] == ["real", "generated"]
    n_points = sum(len(c.get_offsets()) for c in ax_origin.collections)
    assert n_points == adata.n_obs + generated.n_obs
    legend = [t.get_text() for t in ax_cluster.get_legend().get_texts()]
    clusters = set(adata.obs["moesim_cluster"].astype(str)) | set(
        generated.obs["moesim_cluster"].astype(str)
    )
    assert clusters <= set(legend)
    assert {"real (dot)", "generated (cross)"} <= set(legend)
    _assert_png(tmp_path / "gen.png")
    with pytest.raises(KeyError, match="annotate"):
        pl.generated_vs_real(ad.AnnData(adata.X.copy()), generated)
    with pytest.raises(ValueError, match="different genes"):
        pl.generated_vs_real(adata[:, :50].copy(), generated)


def test_counts_are_log_normalised_before_pca():
    from scmoesim.pl._generated import _prepare

    rng = np.random.default_rng(0)
    counts = rng.poisson(3, size=(20, 8)).astype(np.float32)
    ref = ad.AnnData(counts.copy())
    sc.pp.normalize_total(ref)  # to the median total: the real cells' own depth
    sc.pp.log1p(ref)
    x_real, x_gen = _prepare(counts, counts[:5])
    np.testing.assert_allclose(x_real, ref.X, rtol=1e-5)
    np.testing.assert_allclose(x_gen, ref.X[:5], rtol=1e-5)
    logdata = np.log1p(counts) + 0.5
    x_real, x_gen = _prepare(logdata, logdata[:3])
    np.testing.assert_array_equal(x_real, logdata.astype(np.float64))
    np.testing.assert_array_equal(x_gen, logdata[:3].astype(np.float64))


def test_real_and_generated_share_one_scale():
    """Each set normalised to its own median put identical cells far apart when the generated
    cells were of a deep cluster; expected counts (layers["mean"]) were left unnormalised."""
    from scmoesim.pl._generated import _prepare

    rng = np.random.default_rng(1)
    shallow = rng.poisson(2, size=(30, 10)).astype(np.float32)
    deep = rng.poisson(200, size=(10, 10)).astype(np.float32)
    real = np.vstack([shallow, deep])
    x_real, x_gen = _prepare(real, deep.copy())  # "generated": copies of the deep cells
    np.testing.assert_allclose(x_gen, x_real[30:], rtol=1e-12)
    mean = deep * 1.0001 + 0.3  # expected values: not integers, same scale
    x_real, x_mean = _prepare(real, mean)
    assert np.abs(x_mean - x_real[30:]).max() < 0.1
    with pytest.raises(ValueError, match="different scales"):
        _prepare(real, -np.ones((2, 10)))
    with pytest.raises(ValueError, match="generated data contain NaN"):
        _prepare(real, np.full((2, 10), np.nan))


def test_show_calls_pyplot_show(trained, monkeypatch):
    model, _ = trained
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(True))
    pl.expert_usage(model, show=True)
    pl.expert_usage(model)
    assert shown == [True]


def test_usage_series_from_uns_lists():
    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["moesim"] = {"cluster_names": ["b", "a/x"], "expert_usage": np.array([2, 1])}
    fig = pl.expert_usage(adata)
    assert [p.get_height() for p in fig.axes[0].patches] == [2, 1]
    series = pl._experts.usage_series(adata)
    assert series.to_dict() == {"b": 2, "a/x": 1}
