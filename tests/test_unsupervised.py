import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

import scmoesim
from scmoesim.model._outputs import _name_experts
from scmoesim.similarity import combine_similarities, graph_similarity, knn_similarity


def _mixture(n, n_features, n_comp, seed=0, scale=6.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=scale, size=(n_comp, n_features))
    labels = rng.integers(0, n_comp, n)
    x = centres[labels] + rng.normal(size=(n, n_features))
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def big_umap():
    """10,000 cells: past the size where scanpy 1.11 + scipy 1.17 neighbours crash."""
    x, labels = _mixture(10_000, 8, 5)
    adata = ad.AnnData(x)
    adata.obs["truth"] = pd.Categorical(labels.astype(str))
    before = adata.X.copy()
    scmoesim.pp.umap_embedding(adata, n_epochs=30, random_state=0)
    return adata, before, labels


def test_umap_embedding_at_10k_cells(big_umap):
    adata, before, labels = big_umap
    emb = adata.obsm["X_umap"]
    assert emb.shape == (10_000, 2) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    # scanpy's keys for the graph, and our settings next to scanpy's a/b
    assert set(adata.obsp) == {"distances", "connectivities"}
    assert adata.uns["umap"]["params"]["n_neighbors"] == 15
    assert {"a", "b"} <= set(adata.uns["umap"]["params"])
    np.testing.assert_array_equal(adata.X, before)
    assert list(adata.obs.columns) == ["truth"]
    km = KMeans(5, n_init=3, random_state=0).fit_predict(emb)
    assert adjusted_rand_score(labels, km) > 0.95


def test_neighbors_graph_is_exact(big_umap):
    adata, _, _ = big_umap
    d = adata.obsp["distances"]
    assert (np.diff(d.indptr) == 14).all()  # 15 neighbours including the cell itself
    exact = NearestNeighbors(n_neighbors=15).fit(adata.X).kneighbors(adata.X[:50])[1]
    for i in range(50):
        assert set(d[i].indices) == set(exact[i]) - {i}


def test_umap_embedding_options_and_copy():
    x, _ = _mixture(300, 60, 3, seed=1)
    adata = ad.AnnData(x)
    adata.obsm["X_rep"] = x[:, :5]
    out = scmoesim.pp.umap_embedding(
        adata,
        use_rep="X_rep",
        n_components=3,
        metric="canberra",
        key_added="X_umap3",
        neighbors_key="umap_graph",
        n_epochs=20,
        copy=True,
    )
    assert set(adata.obsm) == {"X_rep"} and len(adata.obsp) == 0  # input untouched
    assert out.obsm["X_umap3"].shape == (300, 3)
    assert {"umap_graph_distances", "umap_graph_connectivities"} <= set(out.obsp)
    assert out.uns["X_umap3"]["params"]["metric"] == "canberra"


def test_umap_embedding_errors():
    adata = ad.AnnData(np.zeros((20, 3), dtype=np.float32))
    with pytest.raises(KeyError, match="X_nope"):
        scmoesim.pp.umap_embedding(adata, use_rep="X_nope")
    with pytest.raises(ValueError, match="n_components"):
        scmoesim.pp.umap_embedding(adata, n_components=0)
    for bad in (-1, float("nan")):  # -1 used to give a layout without a word
        with pytest.raises(ValueError, match="min_dist must be a finite number >= 0"):
            scmoesim.pp.umap_embedding(adata, min_dist=bad)
    with pytest.raises(TypeError, match="min_dist must be a number"):
        scmoesim.pp.umap_embedding(adata, min_dist="0.1")
    assert "X_umap" not in adata.obsm
    with pytest.raises(ValueError, match="n_neighbors"):
        scmoesim.pp.neighbors(adata, n_neighbors=1)
    # the metric is recorded where sc.tl.umap reads it (scanpy wrote "euclidean")
    points = ad.AnnData(np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32))
    scmoesim.pp.neighbors(points, n_neighbors=5, use_rep="X", metric="canberra")
    assert points.uns["neighbors"]["params"]["metric"] == "canberra"
    with pytest.raises(TypeError, match="AnnData"):
        scmoesim.pp.neighbors(np.zeros((5, 2)))


def test_combination_rule_labels_over_knn():
    # cells 0, 1 are neighbours in the embedding but carry different labels; 2 is unlabelled
    emb = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    knn = knn_similarity(emb, n_neighbors=1)
    lab_s = torch.zeros(4, 4)
    lab_mask = torch.zeros(4, 4, dtype=torch.bool)
    lab_mask[0, 1] = lab_mask[1, 0] = True  # known: different labels
    s, mask = combine_similarities([(lab_s, lab_mask), knn])
    assert s[0, 1] == 0 and s[1, 0] == 0  # the label pair overrides the kNN pair
    assert s[2, 3] == 1 and mask[2, 3]  # kNN fills the pairs the labels leave unknown
    assert not mask.diagonal().any()


def test_graph_similarity_slices_minibatch():
    full = torch.zeros(6, 6)
    full[0, 4] = 0.7
    full[2, 3] = 0.2
    idx = torch.tensor([0, 2, 4])
    s, mask = graph_similarity(full[idx][:, idx])
    assert s[0, 2] == 1 and s[2, 0] == 1  # symmetrised
    assert s[1].sum() == 0  # cell 3 is not in the minibatch
    assert mask.sum() == 6


def test_name_experts_compact_with_and_without_classes():
    usage = np.array([0, 50, 0, 10, 30])
    names = _name_experts(np.zeros((0, 5)), np.zeros(0, dtype=int), [], usage)
    assert names == ["3", "0", "4", "2", "1"]  # used experts are 0..2 by size
    # classes keep their names; the rest are numbered by usage after them
    ref = np.array([0, 0, 1])
    proba = np.zeros((3, 5))
    proba[:2, 4] = 1.0
    proba[2, 1] = 1.0
    names = _name_experts(proba, ref, ["B", "T"], usage)
    assert names[4] == "B" and names[1] == "T"
    assert names[3] == "0" and sorted([names[0], names[2]]) == ["1", "2"]


def test_effective_clusters_and_compact_labels():
    x, labels = _mixture(400, 20, 3, seed=2, scale=8.0)
    adata = ad.AnnData(x)
    adata.obsm["X_emb"] = x[:, :10]
    scvi.settings.seed = 0
    scmoesim.MoESim.setup_anndata(adata, embedding_key="X_emb")
    model = scmoesim.MoESim(adata, n_experts=8, likelihood="normal", n_latent=5)
    model.train(max_epochs=25, batch_size=128, enable_progress_bar=False)
    pred = model.predict()
    m = model.effective_n_clusters()
    assert m == len(pred.categories) == len(set(pred))
    assert list(pred.categories) == [str(i) for i in range(m)]
    counts = pd.Series(np.asarray(pred)).value_counts()
    assert counts.is_monotonic_decreasing and list(counts.index) == list(pred.categories)
    assert model.expert_usage().sum() == 400
    assert model.effective_n_clusters(min_cells=401) == 0
    with pytest.raises(ValueError, match="min_cells"):
        model.effective_n_clusters(min_cells=0)
    model.annotate(adata)
    assert adata.uns["moesim"]["effective_n_clusters"] == m


def test_knn_far_fraction_option_selects_builder():
    from scmoesim import _constants as K
    from scmoesim.similarity import knn_band_similarity

    x, _ = _mixture(60, 6, 3, seed=3)
    adata = ad.AnnData(x)
    adata.obsm["X_emb"] = x[:, :3]
    scmoesim.MoESim.setup_anndata(adata, embedding_key="X_emb")
    for bad in (0.0, 1.5, "0.5"):
        with pytest.raises(ValueError, match="knn_far_fraction must be None or a number"):
            scmoesim.MoESim(adata, likelihood="normal", knn_far_fraction=bad)
    emb = torch.tensor(x[:30, :3])
    tensors = {K.EMBEDDING_KEY: emb}
    band = scmoesim.MoESim(adata, likelihood="normal", knn_neighbors=3, knn_far_fraction=0.3)
    s, m = band.module.minibatch_similarity(tensors)
    s_ref, m_ref = knn_band_similarity(emb, 3, 0.3)
    assert torch.equal(s, s_ref) and torch.equal(m, m_ref) and not m.all()
    assert band.init_params_["non_kwargs"]["knn_far_fraction"] == 0.3
    plain = scmoesim.MoESim(adata, likelihood="normal", knn_neighbors=3, knn_far_fraction=None)
    s, m = plain.module.minibatch_similarity(tensors)
    assert torch.equal(s, knn_similarity(emb, 3)[0]) and m.sum() == 30 * 29


def test_knn_rule_option_selects_builder():
    from scmoesim import _constants as K
    from scmoesim.similarity import knn_components_similarity

    x, _ = _mixture(60, 6, 3, seed=5)
    adata = ad.AnnData(x)
    adata.obsm["X_emb"] = x[:, :3]
    scmoesim.MoESim.setup_anndata(adata, embedding_key="X_emb")
    with pytest.raises(ValueError, match="knn_rule must be one of"):
        scmoesim.MoESim(adata, likelihood="normal", knn_rule="islands")
    with pytest.raises(ValueError, match="apply to knn_rule='knn' only"):
        scmoesim.MoESim(adata, likelihood="normal", knn_rule="components", knn_far_fraction=0.5)
    emb = torch.tensor(x[:40, :3])
    tensors = {K.EMBEDDING_KEY: emb}
    for rule, mutual in (("components", False), ("mutual_components", True)):
        model = scmoesim.MoESim(adata, likelihood="normal", knn_neighbors=2, knn_rule=rule)
        s, m = model.module.minibatch_similarity(tensors)
        ref = knn_components_similarity(emb, 2, mutual=mutual, min_component_size=1 + mutual)
        assert torch.equal(s, ref[0]) and torch.equal(m, ref[1])
        assert model.init_params_["non_kwargs"]["knn_rule"] == rule
    # components hold every kNN pair and more
    comp, knn = knn_components_similarity(emb, 2)[0], knn_similarity(emb, 2)[0]
    assert (comp >= knn).all() and comp.sum() > knn.sum()
    assert scmoesim.MoESim(adata, likelihood="normal").module.knn_rule == "knn"


def test_unsupervised_defaults_resolve_and_are_saved():
    x, labels = _mixture(60, 6, 3, seed=4)
    adata = ad.AnnData(x)
    adata.obsm["X_emb"] = x[:, :3]
    adata.obs["lab"] = pd.Categorical(labels.astype(str))
    scmoesim.MoESim.setup_anndata(adata, embedding_key="X_emb")
    model = scmoesim.MoESim(adata, likelihood="normal")
    mod = model.module
    assert (mod.n_experts, mod.clustering_weight, mod.kl_weight) == (20, 4.0, 0.0)
    assert mod.knn_far_fraction is None
    assert mod.similarity_resolution == 4.0
    saved = model.init_params_["non_kwargs"]
    assert (saved["n_experts"], saved["clustering_weight"], saved["kl_weight"]) == (20, 4.0, 0.0)
    assert saved["similarity_resolution"] == 4.0
    paper = scmoesim.MoESim(adata, likelihood="normal", similarity_resolution="paper")
    assert paper.module.similarity_resolution is None
    two = scmoesim.MoESim(adata, likelihood="normal", similarity_resolution=2)
    assert two.module.similarity_resolution == 2.0
    # labels (with or without kNN) keep the supervised defaults
    scmoesim.MoESim.setup_anndata(adata, labels_key="lab", embedding_key="X_emb")
    mod = scmoesim.MoESim(adata, likelihood="normal").module
    assert (mod.n_experts, mod.clustering_weight, mod.kl_weight) == (4, 0.8, 2.0)
    assert mod.similarity_resolution is None
    explicit = scmoesim.MoESim(adata, likelihood="normal", clustering_weight=1.5)
    assert explicit.module.clustering_weight == 1.5
