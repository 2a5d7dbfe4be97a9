"""Property-based tests (hypothesis) of the similarity builders and the metrics.

Complements the examples in ``test_similarity.py`` and ``test_metrics.py``: here the inputs
are searched. Example counts are kept small so the file runs in seconds on a 2-core CI runner.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scmoesim.metrics import accuracy, ari, f_measure, hungarian_f1, mmd2_unbiased, nmi
from scmoesim.similarity import (
    KNN_METRICS,
    SignatureScorer,
    combine_similarities,
    graph_similarity,
    knn_similarity,
    label_similarity,
    pairwise_distances,
)

FAST = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PARTITION_SCORES = (f_measure, hungarian_f1, nmi, ari, accuracy)


def _check_s_mask(s: torch.Tensor, mask: torch.Tensor, symmetric: bool = True) -> None:
    n = s.shape[0]
    assert s.shape == mask.shape == (n, n)
    assert mask.dtype == torch.bool
    assert set(torch.unique(s).tolist()) <= {0.0, 1.0}
    assert not mask.diagonal().any()  # a cell is never paired with itself
    if symmetric:
        assert torch.equal(s, s.T) and torch.equal(mask, mask.T)


def _permute(m: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return m[perm][:, perm]


@st.composite
def codes_and_perm(draw, low=-1, high=4, max_size=30):
    codes = draw(st.lists(st.integers(low, high), min_size=1, max_size=max_size))
    perm = draw(st.permutations(range(len(codes))))
    return torch.tensor(codes, dtype=torch.float32), torch.tensor(perm)


@st.composite
def embedding_and_perm(draw, max_n=25, min_d=1):
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(min_d, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3
    perm = torch.tensor(draw(st.permutations(range(n))))
    return x, perm


# ---------------------------------------------------------------- similarity builders
@FAST
@given(codes_and_perm())
def test_labels_s_mask_consistent_and_permutation_equivariant(data):
    codes, perm = data
    s, mask = label_similarity(codes)
    _check_s_mask(s, mask)
    known = codes >= 0
    # masked exactly where a cell is unlabeled (or on the diagonal)
    expected = known[:, None] & known[None, :] & ~torch.eye(len(codes), dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(s[mask].bool(), (codes[:, None] == codes[None, :])[mask])
    s_p, mask_p = label_similarity(codes[perm])
    assert torch.equal(s_p[mask_p], _permute(s, perm)[mask_p])
    assert torch.equal(mask_p, _permute(mask, perm))


# At least 3 dimensions: correlation in 1-2 D (and cosine in 1 D) only takes the values 0 and 2,
# and with such ties the k nearest depend on the order of the cells, as they must.
@FAST
@given(embedding_and_perm(min_d=3), st.integers(1, 8), st.sampled_from(KNN_METRICS))
def test_knn_each_metric_symmetric_known_and_permutation_equivariant(data, k, metric):
    x, perm = data
    s, mask = knn_similarity(x, n_neighbors=k, metric=metric)
    _check_s_mask(s, mask)
    n = x.shape[0]
    assert mask.sum() == n * (n - 1)  # kNN knows every pair
    assert (s.sum(1) >= min(k, n - 1)).all()
    # Equivariance holds unless the k-th and (k+1)-th nearest are tied (to float32 rounding):
    # then either choice is right and the order of the cells decides.
    if k < n - 1:
        d = pairwise_distances(x, metric).masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
        v = d.sort(dim=1).values
        assume(bool(((v[:, k] - v[:, k - 1]) > 1e-4).all()))
    s_p, _ = knn_similarity(x[perm], n_neighbors=k, metric=metric)
    assert torch.equal(s_p, _permute(s, perm))


@FAST
@given(embedding_and_perm(), st.floats(0.0, 6.0), st.sampled_from(KNN_METRICS))
def test_knn_threshold_matches_distances(data, threshold, metric):
    x, perm = data
    s, mask = knn_similarity(x, metric=metric, distance_threshold=threshold)
    _check_s_mask(s, mask)
    d = pairwise_distances(x, metric)
    off = ~torch.eye(x.shape[0], dtype=torch.bool)
    clear = (d - threshold).abs() > 1e-4  # pairs on the threshold may round either way
    assert torch.equal(s.bool()[off & clear], (d <= threshold)[off & clear])
    s_p, _ = knn_similarity(x[perm], metric=metric, distance_threshold=threshold)
    agree = _permute(clear, perm)
    assert torch.equal(s_p[agree], _permute(s, perm)[agree])


@FAST
@given(st.integers(2, 20), st.integers(0, 2**31 - 1), st.floats(0.0, 0.9))
def test_graph_symmetric_and_permutation_equivariant(n, seed, threshold):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.3)
    s, mask = graph_similarity(weights, threshold)
    _check_s_mask(s, mask)
    assert mask.sum() == n * (n - 1)
    either = torch.maximum(weights, weights.T) > threshold
    off = ~torch.eye(n, dtype=torch.bool)
    assert torch.equal(s.bool()[off], either[off])
    perm = torch.randperm(n, generator=g)
    s_p, _ = graph_similarity(weights[perm][:, perm], threshold)
    assert torch.equal(s_p, _permute(s, perm))


@FAST
@given(codes_and_perm(max_size=20), st.integers(0, 2**31 - 1))
def test_combine_labels_over_knn(data, seed):
    codes, perm = data
    x = torch.randn(len(codes), 3, generator=torch.Generator().manual_seed(seed))
    labels = label_similarity(codes)
    knn = knn_similarity(x, n_neighbors=3)
    s, mask = combine_similarities([labels, knn])
    _check_s_mask(s, mask)
    assert torch.equal(mask, labels[1] | knn[1])  # union of what the sources know
    assert torch.equal(s[labels[1]], labels[0][labels[1]])  # labels decide where they know
    rest = mask & ~labels[1]
    assert torch.equal(s[rest], knn[0][rest])  # kNN fills in the rest
    one, one_mask = combine_similarities([labels])
    assert torch.equal(one, labels[0]) and torch.equal(one_mask, labels[1])
    s_p, mask_p = combine_similarities(
        [label_similarity(codes[perm]), knn_similarity(x[perm], n_neighbors=3)]
    )
    assert torch.equal(mask_p, _permute(mask, perm))
    assert torch.equal(s_p[mask_p], _permute(s, perm)[mask_p])


@FAST
@given(st.integers(3, 30), st.integers(0, 2**31 - 1), st.floats(-1.0, 1.0))
def test_signature_codes_are_per_cell(n, seed, threshold):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n, 6)).astype(np.float32)
    import pandas as pd

    genes = pd.Index([f"g{i}" for i in range(6)])
    scorer = SignatureScorer.from_adata_matrix(
        x, genes, {"A": ["g0", "g1"], "B": ["g2"], "C": ["g3", "g4"]}, True, threshold
    )
    codes = scorer(torch.from_numpy(x))
    assert ((codes >= -1) & (codes < 3)).all()
    carries = scorer.scores(torch.from_numpy(x)) > threshold
    assert torch.equal(codes >= 0, carries.sum(1) == 1)
    perm = torch.from_numpy(rng.permutation(n))
    assert torch.equal(scorer(torch.from_numpy(x)[perm]), codes[perm])
    s, mask = label_similarity(codes)
    _check_s_mask(s, mask)


# ---------------------------------------------------------------- metrics
@st.composite
def partitions(draw, max_size=30, max_k=5):
    n = draw(st.integers(2, max_size))
    true = np.array(draw(st.lists(st.integers(0, max_k - 1), min_size=n, max_size=n)))
    pred = np.array(draw(st.lists(st.integers(0, max_k), min_size=n, max_size=n)))
    cells = np.array(draw(st.permutations(range(n))))
    rename_true = draw(st.permutations(range(max_k)))
    rename_pred = draw(st.permutations(range(max_k + 1)))
    return true, pred, cells, rename_true, rename_pred


@FAST
@given(partitions())
def test_scores_invariant_to_names_and_cell_order(data):
    true, pred, cells, rename_true, rename_pred = data
    new_true = np.array([f"class{rename_true[t]}" for t in true])
    new_pred = np.array([f"cluster{rename_pred[p]}" for p in pred])
    for score in PARTITION_SCORES:
        base = score(true, pred)
        assert score(new_true, new_pred) == pytest.approx(base, abs=1e-12), score.__name__
        assert score(true[cells], pred[cells]) == pytest.approx(base, abs=1e-12), score.__name__


@FAST
@given(partitions())
def test_scores_in_range_and_one_on_identical_partitions(data):
    true, pred, *_ = data
    for score in (f_measure, hungarian_f1, nmi, accuracy):
        assert -1e-12 <= score(true, pred) <= 1 + 1e-12, score.__name__
    assert -1 - 1e-12 <= ari(true, pred) <= 1 + 1e-12
    same = np.array([f"k{t}" for t in true])
    for score in PARTITION_SCORES:
        assert score(true, same) == pytest.approx(1.0), score.__name__


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_mmd2_near_zero_for_the_same_distribution(seed, dim):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(150, dim))
    y = rng.normal(size=(150, dim))
    shifted = rng.normal(loc=2.0, size=(150, dim))
    same = mmd2_unbiased(x, y, gamma=0.5)
    assert abs(same) < 0.05
    assert mmd2_unbiased(x, shifted, gamma=0.5) > same + 0.1
    # symmetric and invariant to the order of the cells
    assert mmd2_unbiased(y, x, gamma=0.5) == pytest.approx(same, abs=1e-10)
    assert mmd2_unbiased(x[rng.permutation(150)], y, gamma=0.5) == pytest.approx(same, abs=1e-10)
