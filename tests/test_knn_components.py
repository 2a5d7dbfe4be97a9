"""Connected components of the minibatch kNN graph as a similarity source."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from scmoesim.similarity import (
    connected_component_labels,
    knn_components_similarity,
    knn_similarity,
)


def _same(labels: np.ndarray) -> np.ndarray:
    return labels[:, None] == labels[None, :]


def _islands_and_chain() -> torch.Tensor:
    """Two tight islands far apart, and a chain of evenly spaced cells far from both."""
    a = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]])
    b = a + torch.tensor([10.0, 0.0])
    chain = torch.stack([torch.tensor([0.0, 20.0 + i]) for i in range(6)])
    return torch.cat([a, b, chain])


def test_islands_and_chain_by_hand():
    x = _islands_and_chain()
    s, mask = knn_components_similarity(x, n_neighbors=2)
    expected = torch.tensor([0] * 4 + [1] * 4 + [2] * 6)
    ref = (expected[:, None] == expected[None, :]).float()
    ref.fill_diagonal_(0.0)
    assert torch.equal(s, ref)
    # the chain's ends are 5 apart and never neighbours, yet similar through the chain
    assert s[8, 13] == 1.0 and knn_similarity(x, 2)[0][8, 13] == 0.0
    assert mask.sum() == 14 * 13 and not mask.diagonal().any()


def test_symmetric_and_mask_for_small_components():
    x = torch.tensor([[0.0], [0.1], [5.0], [5.1], [20.0]])
    # mutual 1-NN: two pairs, and the last cell (its nearest cell has a nearer one) alone
    s, mask = knn_components_similarity(x, n_neighbors=1, mutual=True, min_component_size=2)
    assert torch.equal(s, s.T) and torch.equal(mask, mask.T)
    expected_s = torch.zeros(5, 5)
    expected_s[0, 1] = expected_s[1, 0] = expected_s[2, 3] = expected_s[3, 2] = 1.0
    assert torch.equal(s, expected_s)
    expected_mask = ~torch.eye(5, dtype=torch.bool)
    expected_mask[4, :] = expected_mask[:, 4] = False
    assert torch.equal(mask, expected_mask)
    # without the size cut every pair is known; with a cut above every component, none
    assert knn_components_similarity(x, 1, mutual=True)[1].sum() == 20
    assert not knn_components_similarity(x, 1, min_component_size=100)[1].any()
    with pytest.raises(ValueError, match="min_component_size"):
        knn_components_similarity(x, min_component_size=0)


def test_mutual_graph_does_not_bridge_through_a_stray_cell():
    # islands {0, 0.1, 0.2} and {4.05, 4.15, 4.25}; the stray cell's 2 nearest are 0.2 and
    # 4.05, but it is no one's: only the union graph links the islands through it
    x = torch.tensor([[0.0], [0.1], [0.2], [4.05], [4.15], [4.25], [2.1]])
    s_union, _ = knn_components_similarity(x, n_neighbors=2)
    s_mutual, _ = knn_components_similarity(x, n_neighbors=2, mutual=True)
    assert s_union[0, 5] == 1.0 and s_union.sum() == 7 * 6
    assert s_mutual[0, 5] == 0.0 and s_mutual[0, 2] == 1.0 and s_mutual[3, 5] == 1.0
    assert s_mutual[6].sum() == 0.0


def test_permutation_equivariance():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(30, 3, generator=gen) + 6 * i for i in range(3)])
    perm = torch.randperm(x.shape[0], generator=gen)
    for mutual in (False, True):
        s, mask = knn_components_similarity(x, 4, mutual=mutual, min_component_size=3)
        sp_, maskp = knn_components_similarity(x[perm], 4, mutual=mutual, min_component_size=3)
        assert torch.equal(sp_, s[perm][:, perm]) and torch.equal(maskp, mask[perm][:, perm])


@pytest.mark.parametrize("kind", ["random", "chains"])
def test_labels_equal_scipy(kind):
    rng = np.random.default_rng({"random": 0, "chains": 1}[kind])
    for _ in range(25):
        n = int(rng.integers(2, 1100))
        if kind == "random":
            m = int(rng.integers(0, 2 * n))
            src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
        else:  # long paths in random order: the slow case for propagation
            order = rng.permutation(n)
            cut = rng.random(n - 1) < 0.005
            src, dst = order[:-1][~cut], order[1:][~cut]
        labels = connected_component_labels(
            n, torch.as_tensor(src, dtype=torch.long), torch.as_tensor(dst, dtype=torch.long)
        ).numpy()
        graph = sp.coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
        _, ref = connected_components(graph, directed=False)
        assert np.array_equal(_same(labels), _same(ref)), (kind, n)


@pytest.mark.parametrize("n", [256, 1024])
def test_similarity_equals_scipy_on_knn_graphs(n):
    gen = torch.Generator().manual_seed(n)
    centres = torch.randn(12, 2, generator=gen) * 8
    x = centres[torch.randint(0, 12, (n,), generator=gen)] + torch.randn(n, 2, generator=gen)
    union = knn_similarity(x, 3)[0].numpy()
    directed = np.zeros((n, n), dtype=bool)
    dist = torch.cdist(x, x).fill_diagonal_(float("inf"))
    idx = dist.topk(3, largest=False).indices.numpy()
    directed[np.arange(n)[:, None], idx] = True
    for mutual, adj in ((False, union > 0), (True, directed & directed.T)):
        s, mask = knn_components_similarity(x, 3, mutual=mutual)
        n_comp, ref = connected_components(sp.csr_matrix(adj), directed=False)
        expected = _same(ref).astype(np.float32)
        np.fill_diagonal(expected, 0.0)
        assert np.array_equal(s.numpy(), expected), mutual
        assert 1 < n_comp < n and mask.sum() == n * (n - 1)
