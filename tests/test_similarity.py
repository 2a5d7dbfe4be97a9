import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scmoesim.similarity import (
    SignatureScorer,
    combine_similarities,
    graph_similarity,
    knn_band_similarity,
    knn_similarity,
    label_similarity,
    pairwise_distances,
    validate_signatures,
)


def test_label_similarity_values_and_mask():
    s, m = label_similarity(torch.tensor([0.0, 0.0, 1.0, -1.0]))
    assert s.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    # unknown cell 3 and the diagonal are masked
    expected = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(m.numpy(), expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-1, 3), min_size=1, max_size=30))
def test_label_similarity_properties(codes):
    s, m = label_similarity(torch.tensor(codes, dtype=torch.float32))
    assert torch.equal(s, s.T) and torch.equal(m, m.T)
    assert not m.diagonal().any()
    c = np.array(codes)
    for i in range(len(c)):
        for j in range(len(c)):
            if i != j:
                assert bool(m[i, j]) == (c[i] >= 0 and c[j] >= 0)
                if m[i, j]:
                    assert s[i, j] == float(c[i] == c[j])


def test_knn_similarity_two_groups():
    x = torch.tensor([[0.0, 0], [0.1, 0], [0, 0.1], [10, 10], [10.1, 10], [10, 10.1]])
    s, m = knn_similarity(x, n_neighbors=2)
    block = torch.zeros(6, 6)
    block[:3, :3] = 1
    block[3:, 3:] = 1
    block.fill_diagonal_(0)
    assert torch.equal(s, block)
    assert m.sum() == 30 and not m.diagonal().any()


def test_knn_distance_threshold_and_cap():
    x = torch.tensor([[0.0], [1.0], [5.0]])
    s, _ = knn_similarity(x, distance_threshold=1.5)
    assert s.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    s, _ = knn_similarity(x, n_neighbors=50)  # capped at n - 1
    assert s.sum() == 6


def test_euclidean_distances_exact_far_from_the_origin():
    """UMAP coordinates sit near 10: cdist's float32 matmul shortcut gave duplicates ~5e-3
    apart and cells 2e-3 apart a distance of 0, so a threshold misjudged both."""
    rng = np.random.default_rng(0)
    e = (10 + rng.normal(size=(64, 2))).astype(np.float32)
    e[3] = e[2] + np.float32([2e-3, 0.0])
    x = torch.tensor(np.vstack([e, e[:16]]))  # rows 64.. duplicate rows 0..15
    d = pairwise_distances(x)
    ref = np.sqrt(((x.double()[:, None] - x.double()[None]) ** 2).sum(-1)).numpy()
    np.testing.assert_allclose(d.numpy(), ref, atol=1e-5)
    s, _ = knn_similarity(x, distance_threshold=1e-3)
    assert all(s[i, 64 + i] == 1 for i in range(16))
    assert s[2, 3] == 0
    # the k nearest: each duplicate finds its twin first
    s, _ = knn_similarity(x, n_neighbors=1)
    assert all(s[64 + i, i] == 1 for i in range(16))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 25),
    st.integers(1, 6),
    st.sampled_from(["euclidean", "correlation", "canberra", "cosine"]),
    st.integers(0, 10_000),
)
def test_knn_symmetric_and_at_least_k(n, k, metric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    s, m = knn_similarity(x, n_neighbors=k, metric=metric)
    assert torch.equal(s, s.T)
    assert (s.diagonal() == 0).all()
    assert (s.sum(1) >= min(k, n - 1)).all()
    assert m.sum() == n * (n - 1)


@pytest.mark.parametrize("metric", ["euclidean", "correlation", "canberra", "cosine"])
def test_knn_equals_topk_of_the_distances(metric):
    # the euclidean path ranks by |x_j|^2 - 2 x_i.x_j instead of cdist: same neighbours
    x = torch.randn(300, 20, generator=torch.Generator().manual_seed(1))
    d = pairwise_distances(x, metric)
    d.fill_diagonal_(float("inf"))
    idx = d.topk(7, dim=1, largest=False).indices
    expected = torch.zeros(300, 300).scatter_(1, idx, 1.0)
    expected = torch.maximum(expected, expected.T)
    s, m = knn_similarity(x, n_neighbors=7, metric=metric)
    assert torch.equal(s, expected)
    assert torch.equal(m, ~torch.eye(300, dtype=torch.bool))


def test_knn_band_hand_made_case():
    # 1-D points 0, 1, 2, 3 (one group) and 10, 11 (another); k = 1, m = ceil(0.4 * 5) = 2
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0]])
    s, m = knn_band_similarity(x, n_neighbors=1, far_fraction=0.4)
    near = {(0, 1), (1, 2), (2, 3), (3, 2), (4, 5)}  # first-index ties resolved by topk
    sym_near = near | {(j, i) for i, j in near}
    for i in range(6):
        for j in range(6):
            assert s[i, j] == float((i, j) in sym_near), (i, j)
    # 0-2: 2 is 0's 2nd nearest, not beyond it -> unknown; 0-3 is beyond both ways -> dissimilar
    assert not m[0, 2] and m[0, 3] and s[0, 3] == 0
    # 3-4: 4 is beyond 3's 2nd nearest (1 away, 1 away), but 3 is 4's 2nd nearest -> unknown
    assert not m[3, 4]
    # the two groups are dissimilar far apart
    assert m[0, 4] and m[1, 5] and s[0, 4] == 0
    assert not m.diagonal().any()
    # far_fraction 1: no pair is dissimilar, only the neighbours are known
    s1, m1 = knn_band_similarity(x, n_neighbors=1, far_fraction=1.0)
    assert torch.equal(s1, s) and torch.equal(m1, s1.bool())


def test_knn_band_threshold_and_errors():
    x = torch.tensor([[0.0], [0.5], [5.0], [9.0], [9.4]])
    s, m = knn_band_similarity(x, far_fraction=0.5, distance_threshold=1.0)
    assert s.nonzero().tolist() == [[0, 1], [1, 0], [3, 4], [4, 3]]
    assert m[0, 3] and m[0, 4] and not m[0, 2]  # 2 is 0's 2nd nearest: inside the band
    with pytest.raises(ValueError, match="far_fraction must be in"):
        knn_band_similarity(x, far_fraction=0.0)
    s, m = knn_band_similarity(x[:1])
    assert s.shape == (1, 1) and not m.any()


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 40),
    st.integers(1, 6),
    st.floats(0.05, 1.0),
    st.sampled_from(["euclidean", "correlation", "canberra"]),
    st.integers(0, 10_000),
)
def test_knn_band_properties(n, k, frac, metric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    s, m = knn_band_similarity(x, n_neighbors=k, far_fraction=frac, metric=metric)
    plain, _ = knn_similarity(x, n_neighbors=k, metric=metric)
    assert torch.equal(s, s.T) and torch.equal(m, m.T)
    assert not m.diagonal().any()
    assert torch.equal(s, plain)  # the same similar pairs as plain kNN, all of them known
    assert (m | ~s.bool()).all()
    # a dissimilar pair lies beyond the cut-off rank for both cells
    d = pairwise_distances(x, metric) + torch.diag(torch.full((n,), float("inf")))
    rank = d.argsort(1).argsort(1)  # 0 = nearest other cell
    cut = max(1, int(np.ceil(frac * (n - 1))))
    dissim = m & ~s.bool()
    assert (rank[dissim] >= cut).all() and (rank.T[dissim] >= cut).all()


def test_pairwise_distances_match_scipy():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    x[0, 1] = x[1, 1] = 0.0  # a 0/0 term in canberra
    for metric in ("euclidean", "correlation", "canberra", "cosine"):
        ours = pairwise_distances(torch.tensor(x), metric, chunk_size=3).numpy()
        np.testing.assert_allclose(ours, cdist(x, x, metric), atol=1e-6)
    with pytest.raises(ValueError, match="metric must be one of"):
        pairwise_distances(torch.tensor(x), "manhattan")


def test_combine_priority_and_union():
    s1 = torch.tensor([[0.0, 1], [1, 0]])
    m1 = torch.tensor([[False, True], [True, False]])
    s2 = torch.zeros(2, 2)
    m2 = torch.ones(2, 2, dtype=torch.bool)
    s, m = combine_similarities([(s1, m1), (s2, m2)])
    assert s[0, 1] == 1  # first source wins on known pairs
    assert s[0, 0] == 0 and m.all()
    s, m = combine_similarities([(s2, torch.zeros(2, 2, dtype=torch.bool)), (s1, m1)])
    assert s[0, 1] == 1 and not m[0, 0]
    with pytest.raises(ValueError, match="at least one"):
        combine_similarities([])


def test_graph_similarity_symmetrises():
    a = torch.tensor([[0.0, 0.3, 0], [0, 0, 0], [0, 0.9, 0]])
    s, m = graph_similarity(a)
    assert s.tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    assert not m.diagonal().any()


def test_validate_signatures_errors():
    genes = pd.Index(["A", "B", "C"])
    assert validate_signatures({"x": "A", "y": ["B", "B"]}, genes) == {"x": ["A"], "y": ["B"]}
    with pytest.raises(ValueError, match="not found in adata.var_names: x: Z, Q"):
        validate_signatures({"x": ["A", "Z", "Q"]}, genes)
    with pytest.raises(ValueError, match="has no marker genes"):
        validate_signatures({"x": []}, genes)
    with pytest.raises(ValueError, match="is empty"):
        validate_signatures({}, genes)
    with pytest.raises(ValueError, match="must be a dict"):
        validate_signatures(["A"], genes)
    with pytest.raises(ValueError, match="Duplicate signature name"):
        validate_signatures({1: ["A"], "1": ["B"]}, genes)


def test_signature_scorer_paper_rule():
    # genes: A marks s1, B marks s2; cell 0 high A, cell 1 high B, cell 2 both, cell 3 none
    x = np.array([[10.0, 0, 5], [0, 10, 5], [10, 10, 5], [0, 0, 5]])
    scorer = SignatureScorer.from_adata_matrix(
        x, pd.Index(["A", "B", "C"]), {"s1": ["A"], "s2": ["B"]}, normalize=False
    )
    codes = scorer(torch.tensor(x, dtype=torch.float32))
    assert codes.tolist() == [0, 1, -1, -1]
    np.testing.assert_allclose(scorer.means.numpy(), [5.0, 5.0])


def test_signature_scorer_normalises_counts():
    # same relative expression at 10x depth must give the same code
    x = np.array([[9.0, 1, 0], [90, 10, 0], [0, 1, 9], [0, 10, 90]])
    scorer = SignatureScorer.from_adata_matrix(
        x, pd.Index(["A", "B", "C"]), {"a": ["A"], "c": ["C"]}, normalize=True
    )
    assert scorer(torch.tensor(x, dtype=torch.float32)).tolist() == [0, 0, 1, 1]
