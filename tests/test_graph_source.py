import anndata as ad
import numpy as np
import pytest
import scvi
import torch
from scipy import sparse

import scmoesim
from scmoesim import _constants as K
from scmoesim.similarity import _graph_lists, graph_list_similarity, neighbor_table


def _graph() -> sparse.csr_matrix:
    # 0-1 (0.9), 0-2 (0.2), 3-4 (0.5, given one way only), 5 isolated; a self-loop on 1
    g = sparse.lil_matrix((6, 6))
    g[0, 1] = g[1, 0] = 0.9
    g[0, 2] = g[2, 0] = 0.2
    g[3, 4] = 0.5
    g[1, 1] = 1.0
    return g.tocsr()


def test_neighbor_table_values_and_width():
    t = neighbor_table(_graph())
    assert t.dtype == np.float32 and t.shape == (6, 3)
    np.testing.assert_array_equal(t[:, 0], np.arange(6))
    assert sorted(t[0, 1:]) == [1, 2]
    assert t[1, 1:].tolist() == [0, -1]  # self-loop dropped
    assert t[4, 1:].tolist() == [3, -1]  # symmetrised
    assert (t[5, 1:] == -1).all()
    cut = neighbor_table(_graph(), width=1)
    assert cut[0, 1] == 1  # the strongest edge is kept


def test_neighbor_table_errors(monkeypatch):
    with pytest.raises(ValueError, match="square"):
        neighbor_table(sparse.csr_matrix((3, 4)))
    bad = _graph().toarray()
    bad[2, 5] = -1.0
    with pytest.raises(ValueError, match="negative or non-finite"):
        neighbor_table(bad)
    monkeypatch.setattr(_graph_lists, "MAX_GRAPH_CELLS", 5)
    with pytest.raises(ValueError, match="at most 5 cells"):
        neighbor_table(_graph())


def test_graph_list_similarity_equals_sliced_graph():
    g = _graph()
    dense = torch.tensor((g.maximum(g.T)).toarray() > 0)
    dense.fill_diagonal_(False)
    table = torch.tensor(neighbor_table(g))
    idx = torch.tensor([4, 0, 5, 3, 1])  # a shuffled minibatch without cell 2
    s, m = graph_list_similarity(table[idx])
    assert torch.equal(s.bool(), dense[idx][:, idx])
    assert m.sum() == 5 * 4
    s, m = graph_list_similarity(table[idx], unlinked_known=False)
    assert torch.equal(m, s.bool()) and m.sum() == 4  # only the edges 4-3 and 0-1


def _adata(n=120, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = (rng.normal(size=(3, 10)) * 5)[labels] + rng.normal(size=(n, 10))
    adata = ad.AnnData(x.astype(np.float32))
    scmoesim.pp.neighbors(adata, n_neighbors=5, use_rep="X")
    return adata


def test_setup_with_graph_key_trains_and_slices():
    adata = _adata()
    obsm_before = set(adata.obsm)
    with pytest.raises(KeyError, match="graph_key 'nope' not found in adata.obsp"):
        scmoesim.MoESim.setup_anndata(adata, graph_key="nope")
    scmoesim.MoESim.setup_anndata(adata, graph_key="connectivities")
    assert set(adata.obsm) - obsm_before == {"_scmoesim_graph"}
    scvi.settings.seed = 0
    model = scmoesim.MoESim(adata, n_experts=4, likelihood="normal", n_latent=3)
    assert model.module.use_graph and model.module.kl_weight == 0.0
    assert "graph obsp['connectivities']" in model._model_summary_string
    # the module's minibatch similarity is the graph restricted to the minibatch
    idx = np.array([7, 3, 50, 99, 11, 64])
    tensors = {K.GRAPH_KEY: torch.tensor(adata.obsm["_scmoesim_graph"][idx])}
    s, m = model.module.minibatch_similarity(tensors)
    conn = adata.obsp["connectivities"][idx][:, idx].toarray() > 0
    np.testing.assert_array_equal(s.numpy().astype(bool), conn | conn.T)
    assert m.sum() == 6 * 5
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    assert np.isfinite(model.history["similarity_loss_train"].to_numpy(dtype=float)).all()
    # another AnnData without a graph still gets a latent space
    other = ad.AnnData(adata.X[:10].copy())
    assert model.get_latent_representation(other).shape == (10, 3)


def test_graph_with_embedding_knows_only_edges():
    adata = _adata(60)
    adata.obsm["X_emb"] = adata.X[:, :2].copy()
    scmoesim.MoESim.setup_anndata(adata, graph_key="connectivities", embedding_key="X_emb")
    model = scmoesim.MoESim(
        adata, n_experts=3, likelihood="normal", knn_neighbors=1, knn_far_fraction=0.5
    )
    idx = np.arange(20)
    tensors = {
        K.GRAPH_KEY: torch.tensor(adata.obsm["_scmoesim_graph"][idx]),
        K.EMBEDDING_KEY: torch.tensor(adata.obsm["X_emb"][idx]),
    }
    s, m = model.module.minibatch_similarity(tensors)
    conn = adata.obsp["connectivities"][idx][:, idx].toarray() > 0
    assert (s.numpy()[conn | conn.T] == 1).all()  # every graph edge is similar
    # pairs the graph does not link follow the kNN band
    from scmoesim.similarity import knn_band_similarity

    s_knn, m_knn = knn_band_similarity(tensors[K.EMBEDDING_KEY], 1, 0.5)
    off = ~(conn | conn.T)
    np.testing.assert_array_equal(s.numpy()[off], s_knn.numpy()[off])
    np.testing.assert_array_equal(m.numpy()[off], m_knn.numpy()[off])
