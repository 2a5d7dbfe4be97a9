"""merge_clusters: experts joined into clusters by greedy modularity on a kNN graph."""

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pandas as pd
import pytest
import scvi
from scipy import sparse

import scmoesim
from scmoesim.model._merge import _group_names, modularity_merge


def _two_cliques(n=10, bridge=1.0):
    """Two cliques of ``n`` nodes joined by one edge of weight ``bridge``."""
    a = np.zeros((2 * n, 2 * n))
    a[:n, :n] = 1.0
    a[n:, n:] = 1.0
    np.fill_diagonal(a, 0.0)
    a[0, n] = a[n, 0] = bridge
    return sparse.csr_matrix(a)


def test_modularity_merge_joins_split_communities_only():
    graph = _two_cliques()
    # each clique split over two groups; group 4 is empty
    codes = np.array([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5)
    groups = modularity_merge(codes, graph, 5)
    assert groups[0] == groups[1] and groups[2] == groups[3]
    assert groups[0] != groups[2]
    assert groups[4] not in groups[:4]  # the empty group stays alone
    assert sorted(set(groups)) == [0, 1, 2]


def test_modularity_merge_resolution_and_fixed_groups():
    graph = _two_cliques()
    codes = np.array([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5)
    # a very high resolution makes every merge lose modularity
    assert len(set(modularity_merge(codes, graph, 4, resolution=50.0))) == 4
    # a very low one merges everything that is connected
    assert len(set(modularity_merge(codes, graph, 4, resolution=1e-3))) == 1
    # fixed groups (named after different classes) never merge with each other ...
    fixed = np.array([True, True, False, False])
    groups = modularity_merge(codes, graph, 4, resolution=1e-3, fixed=fixed)
    assert groups[0] != groups[1]
    # ... but unnamed groups still join them
    assert len(set(groups)) == 2


def test_group_names_keep_class_names_and_number_the_rest():
    experts = ["B", "T", "0", "1", "2"]
    named = np.array([True, True, False, False, False])
    usage = np.array([10, 20, 5, 30, 40])
    # expert 2 joins "B"; experts 3 and 4 form one unnamed cluster
    groups = np.array([0, 1, 0, 2, 2])
    assert _group_names(experts, groups, named, usage) == ["B", "T", "B", "0", "0"]
    # unnamed clusters are numbered by decreasing size
    groups = np.array([0, 1, 2, 3, 4])
    names = _group_names(["0", "1", "2", "3", "4"], groups, np.zeros(5, bool), usage)
    assert names == ["3", "2", "4", "1", "0"]


@pytest.fixture(scope="module")
def split_model():
    """A trained model and a graph on which its two largest clusters form one community.

    ``X_joined`` puts the cells of the model's clusters "0" and "1" into one blob and all other
    cells into another, far away: whatever the training found, merging on it must join exactly
    those two clusters.
    """
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10.0, size=(3, 10))
    labels = np.repeat([0, 1, 2], [300, 200, 100])
    x = (centres[labels] + rng.normal(size=(600, 10))).astype(np.float32)
    adata = ad.AnnData(x)
    adata.obsm["X_emb"] = x.copy()
    scvi.settings.seed = 0
    scmoesim.MoESim.setup_anndata(adata, embedding_key="X_emb")
    model = scmoesim.MoESim(adata, n_experts=8, likelihood="normal", n_latent=4)
    model.train(max_epochs=20, batch_size=128, enable_progress_bar=False)
    raw = np.asarray(model.predict())
    assert model.effective_n_clusters() >= 2
    joined = np.isin(raw, ["0", "1"])
    adata.obsm["X_joined"] = (
        np.where(joined[:, None], 0.0, 50.0) + rng.normal(size=(600, 3))
    ).astype(np.float32)
    return model, adata


def test_merge_clusters_joins_the_experts_of_one_community(split_model, tmp_path):
    model, adata = split_model
    before = model.effective_n_clusters()
    raw = model.predict()
    raw_soft = model.predict(soft=True)
    snapshot = adata.copy()
    table = model.merge_clusters(use_rep="X_joined")
    assert list(table.columns) == ["before", "cluster", "n_cells"]
    assert table.index.name == "expert" and len(table) == 8
    assert table["n_cells"].sum() == 600
    assert list(table["before"]) == model.expert_names_ == list(raw_soft.columns)
    merged = model.predict()
    k = model.effective_n_clusters()
    assert k == before - 1 == len(merged.categories) == len(set(merged))
    assert list(merged.categories) == [str(i) for i in range(k)]
    # clusters "0" and "1" became one (the largest, so now "0"); the others only renumbered
    expected = np.where(np.isin(np.asarray(raw), ["0", "1"]), "0", "other")
    assert ((np.asarray(merged) == "0") == (expected == "0")).all()
    crosstab = pd.crosstab(np.asarray(raw), np.asarray(merged))
    assert ((crosstab > 0).sum(1) == 1).all() and ((crosstab > 0).sum(0) <= 2).all()
    # soft: one column per cluster, the merged one the sum of its experts' columns
    soft = model.predict(soft=True)
    assert list(soft.columns) == list(dict.fromkeys(model.cluster_names_))
    np.testing.assert_allclose(soft["0"], raw_soft["0"] + raw_soft["1"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
    # the usage plot tells merged clusters from experts
    fig = scmoesim.pl.expert_usage(model)
    assert fig.axes[0].get_title() == f"{k} clusters (merged) on {before} of 8 experts"
    plt.close(fig)
    # the training data is not touched
    assert adata.obs.equals(snapshot.obs) and set(adata.obsm) == set(snapshot.obsm)
    model.annotate(snapshot)
    assert snapshot.uns["moesim"]["effective_n_clusters"] == k
    assert snapshot.uns["moesim"]["cluster_names"] == list(model.cluster_names_)
    # the probabilities are predict(soft=True)'s, one column per cluster
    assert snapshot.uns["moesim"]["proba_columns"] == list(soft.columns)
    np.testing.assert_allclose(snapshot.obsm["moesim_proba"], soft.to_numpy(), rtol=1e-6)
    # saved and loaded with the model
    model.save(tmp_path / "m")
    loaded = scmoesim.MoESim.load(tmp_path / "m", adata=adata)
    assert list(loaded.cluster_names_) == list(model.cluster_names_)
    assert loaded.effective_n_clusters() == k
    # undo restores one cluster per expert
    model.merge_clusters(None)
    assert list(model.cluster_names_) == model.expert_names_
    assert model.effective_n_clusters() == before


def test_generate_splits_a_merged_cluster_over_its_experts(split_model):
    model, _ = split_model
    model.merge_clusters(use_rep="X_joined")
    members = np.flatnonzero(np.asarray(model.cluster_names_) == "0")
    assert len(members) == 2
    usage = np.asarray(model.expert_usage_)[members]
    out = model.generate(600, clusters=["0"], seed=0)
    assert (out.obs["moesim_cluster"] == "0").all()
    got = out.obs["moesim_expert"].astype(int).value_counts()
    # split in proportion to the experts' training cells
    expected = 600 * usage / usage.sum()
    np.testing.assert_allclose(got.reindex(members, fill_value=0).to_numpy(), expected, atol=1)
    # uniform proportions are uniform over clusters, not experts
    k = model.effective_n_clusters()
    out = model.generate(60 * k, proportions="uniform", seed=1)
    counts = out.obs["moesim_cluster"].value_counts()
    assert (counts[counts > 0] == 60).all() and (counts > 0).sum() == k
    out = model.generate({"0": 7}, seed=2)
    assert out.n_obs == 7 and (out.obs["moesim_cluster"] == "0").all()
    model.merge_clusters(None)


def test_merge_clusters_options_and_errors(split_model):
    model, adata = split_model
    model.merge_clusters(None)
    before = model.effective_n_clusters()
    # the registered embedding (default), the latent space and an obsm key work as sources;
    # merging never creates clusters
    for rep in (None, "latent", "X_emb", "X_joined"):
        model.merge_clusters(use_rep=rep)
        assert 1 <= model.effective_n_clusters() <= before
    model.merge_clusters(None)
    with pytest.raises(KeyError, match="X_missing"):
        model.merge_clusters(use_rep="X_missing")
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="resolution"):
            model.merge_clusters(resolution=bad)
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="n_neighbors"):
            model.merge_clusters(n_neighbors=bad)
    # a bad obsm representation is named before any graph is built; the AnnData is untouched
    for key, value, err in [
        ("X_nan", np.full((600, 3), np.nan, np.float32), ValueError),
        ("X_text", np.full((600, 3), "a", dtype=object), TypeError),
    ]:
        adata.obsm[key] = value
        with pytest.raises(err, match=key):
            model.merge_clusters(use_rep=key)
        del adata.obsm[key]
    assert set(adata.obsm) == {"X_emb", "X_joined"}
    fresh = scmoesim.MoESim(adata, n_experts=4, likelihood="normal")
    with pytest.raises(RuntimeError, match="Train the model"):
        fresh.merge_clusters()


def test_merge_never_joins_two_label_classes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)).astype(np.float32)  # one blob: modularity would merge all
    adata = ad.AnnData(x)
    adata.obsm["X_emb"] = x.copy()
    adata.obs["label"] = pd.Categorical(np.where(np.arange(300) < 150, "A", "B"))
    scvi.settings.seed = 0
    scmoesim.MoESim.setup_anndata(adata, labels_key="label", embedding_key="X_emb")
    model = scmoesim.MoESim(adata, n_experts=4, likelihood="normal", n_latent=3)
    model.train(max_epochs=15, batch_size=100, enable_progress_bar=False)
    model.merge_clusters(resolution=1e-3)
    # without the rule, this resolution merges the one blob's experts into one cluster
    assert set(model.predict()) == {"A", "B"}
    assert sum(n in ("A", "B") for n in model.cluster_names_) == 2


def test_merge_graph_uses_the_registered_obsp_graph():
    rng = np.random.default_rng(2)
    adata = ad.AnnData(rng.normal(size=(40, 5)).astype(np.float32))
    graph = sparse.random(40, 40, density=0.1, random_state=0, format="csr")  # not symmetric
    adata.obsp["g"] = graph
    scmoesim.MoESim.setup_anndata(adata, graph_key="g")
    model = scmoesim.MoESim(adata, n_experts=3, likelihood="normal")
    used = model._merge_graph(15, None, latent=np.zeros((40, 2)))
    np.testing.assert_array_equal(used.toarray(), graph.maximum(graph.T).toarray())
    assert (adata.obsp["g"] != graph).nnz == 0  # the user's graph is not changed
