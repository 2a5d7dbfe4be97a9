import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse
from scipy.spatial.distance import cdist, pdist
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from scmoesim import metrics
from scmoesim.metrics import (
    accuracy,
    ari,
    contingency,
    f_measure,
    hungarian_f1,
    mean_f1_report,
    mmd2_unbiased,
    nmi,
)

LABEL_SCORES = [f_measure, hungarian_f1, nmi, ari, accuracy]


# ---------------------------------------------------------------------------------------------
# hand-computed examples
# ---------------------------------------------------------------------------------------------
def test_six_cell_example_three_classes():
    true = ["a", "a", "a", "b", "b", "c"]
    pred = [1, 1, 2, 2, 2, 3]
    # Contingency (rows a, b, c; cols 1, 2, 3):
    #   a: 2 1 0   (n_a = 3)
    #   b: 0 2 0   (n_b = 2)
    #   c: 0 0 1   (n_c = 1)
    # cluster sizes: n_1 = 2, n_2 = 3, n_3 = 1
    # F1 = 2 n_ck / (n_c + n_k):
    #   a: 4/5, 2/6, 0 ; b: 0, 4/5, 0 ; c: 0, 0, 2/2
    # F-measure = 3/6 * 4/5 + 2/6 * 4/5 + 1/6 * 1 = (2.4 + 1.6 + 1) / 6 = 5/6
    # Hungarian: a-1, b-2, c-3 -> (4/5 + 4/5 + 1) / 3 = 13/15
    # Accuracy: a-1 (2) + b-2 (2) + c-3 (1) = 5 of 6 cells = 5/6
    assert f_measure(true, pred) == pytest.approx(5 / 6)
    assert hungarian_f1(true, pred) == pytest.approx(13 / 15)
    assert accuracy(true, pred) == pytest.approx(5 / 6)


def test_six_cell_example_matchings_differ():
    true = ["T", "T", "T", "T", "B", "B"]
    pred = [1, 1, 1, 2, 1, 1]
    # Contingency (rows B, T; cols 1, 2):
    #   T: 3 1 (n_T = 4) ; B: 2 0 (n_B = 2) ; n_1 = 5, n_2 = 1
    # F1: T-1 = 6/9 = 2/3, T-2 = 2/5, B-1 = 4/7, B-2 = 0
    # F-measure: both classes' best match is cluster 1:
    #   4/6 * 2/3 + 2/6 * 4/7 = 4/9 + 4/21 = 40/63
    # Hungarian (one-to-one): T-1 + B-2 = 2/3 + 0 = 0.667  vs  T-2 + B-1 = 2/5 + 4/7 = 34/35
    #   -> best is T-2, B-1, mean = 17/35
    # Accuracy: T-1 + B-2 = 3 + 0 = 3, T-2 + B-1 = 1 + 2 = 3 -> 3/6 = 1/2
    assert f_measure(true, pred) == pytest.approx(40 / 63)
    score, per_class = hungarian_f1(true, pred, return_per_class=True)
    assert score == pytest.approx(17 / 35)
    assert isinstance(per_class, pd.Series)
    assert per_class.name == "f1"
    assert list(per_class.index) == ["B", "T"]
    assert per_class["T"] == pytest.approx(2 / 5)
    assert per_class["B"] == pytest.approx(4 / 7)
    assert accuracy(true, pred) == pytest.approx(1 / 2)


def test_more_clusters_than_classes():
    true = ["a", "a", "b", "b"]
    pred = [0, 1, 2, 3]
    # Every cluster is a singleton: F1(c, k) = 2 * 1 / (2 + 1) = 2/3 for the two cells of c.
    # F-measure = 2/3; Hungarian: each class gets one singleton -> 2/3;
    # Accuracy: 2 of the 4 clusters mapped, 1 cell each -> 2/4.
    assert f_measure(true, pred) == pytest.approx(2 / 3)
    assert hungarian_f1(true, pred) == pytest.approx(2 / 3)
    assert accuracy(true, pred) == pytest.approx(1 / 2)
    # All clusters are pure: the classes are perfectly homogeneous, NMI = 2 * 1 / (1 + 2)
    # (I = H(T) = ln 2, H(P) = ln 4 = 2 ln 2).
    assert nmi(true, pred) == pytest.approx(2 / 3)


def test_fewer_clusters_than_classes():
    true = ["a", "a", "b", "b", "c", "c"]
    pred = [0, 0, 0, 0, 1, 1]
    # Contingency: a: 2 0 ; b: 2 0 ; c: 0 2 ; n_0 = 4, n_1 = 2
    # F1: a-0 = b-0 = 4/6 = 2/3, c-1 = 4/4 = 1
    # F-measure = (2/3 + 2/3 + 1) / 3 = 7/9
    # Hungarian: cluster 0 goes to a or b (2/3), c-1 (1), the third class is unmatched (0)
    #   -> (2/3 + 1 + 0) / 3 = 5/9
    # Accuracy: 2 + 2 = 4 of 6 = 2/3
    assert f_measure(true, pred) == pytest.approx(7 / 9)
    score, per_class = hungarian_f1(true, pred, return_per_class=True)
    assert score == pytest.approx(5 / 9)
    assert sorted(per_class.to_numpy()) == pytest.approx([0.0, 2 / 3, 1.0])
    assert per_class["c"] == pytest.approx(1.0)
    assert accuracy(true, pred) == pytest.approx(2 / 3)


def test_single_cluster_for_everything():
    true = ["a", "a", "a", "b"]
    pred = [7, 7, 7, 7]
    # F1: a = 2*3/(3+4) = 6/7, b = 2*1/(1+4) = 2/5
    # F-measure = 3/4 * 6/7 + 1/4 * 2/5 = 18/28 + 1/10 = 104/140 = 26/35
    # Hungarian: only one cluster -> a matched (6/7), b unmatched -> 3/7
    assert f_measure(true, pred) == pytest.approx(26 / 35)
    assert hungarian_f1(true, pred) == pytest.approx(3 / 7)
    assert accuracy(true, pred) == pytest.approx(3 / 4)
    assert nmi(true, pred) == pytest.approx(0.0)
    assert ari(true, pred) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "true, pred",
    [
        (["x", "x", "y", "y", "z"], [2, 2, 0, 0, 1]),
        ([0, 0, 1, 1, 2, 2], ["c", "c", "a", "a", "b", "b"]),
        (np.array([5, 5, 5]), np.array([9, 9, 9])),
        (pd.Series(["B", "T", "NK"]), pd.Categorical(["k3", "k1", "k2"])),
    ],
)
def test_perfect_clustering_scores_one(true, pred):
    for score in LABEL_SCORES:
        assert score(true, pred) == pytest.approx(1.0), score.__name__
    report = mean_f1_report(true, pred)
    for key in ("f_measure", "hungarian_f1", "nmi", "ari", "accuracy"):
        assert report[key] == pytest.approx(1.0)


def test_nmi_ari_match_sklearn():
    true = ["a", "a", "a", "b", "b", "c", "c", "c"]
    pred = [0, 0, 0, 0, 1, 1, 2, 2]  # cluster sizes 4, 2, 2 differ from class sizes 3, 2, 3
    codes_t = pd.factorize(pd.Series(true))[0]
    assert nmi(true, pred) == pytest.approx(normalized_mutual_info_score(codes_t, pred))
    assert ari(true, pred) == pytest.approx(adjusted_rand_score(codes_t, pred))
    # arithmetic normalisation, which differs from e.g. the geometric one here
    geometric = normalized_mutual_info_score(codes_t, pred, average_method="geometric")
    arithmetic = normalized_mutual_info_score(codes_t, pred, average_method="arithmetic")
    assert nmi(true, pred) == pytest.approx(arithmetic)
    assert not math.isclose(arithmetic, geometric, rel_tol=1e-9)


def test_contingency_table():
    table = contingency(["b", "a", "a", "b", "b"], [1, 0, 1, 1, 1])
    expected = pd.DataFrame(
        [[1, 1], [0, 3]],
        index=pd.Index(["a", "b"], name="labels_true"),
        columns=pd.Index([0, 1], name="labels_pred"),
    )
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    assert table.to_numpy().sum() == 5


def test_contingency_categorical_keeps_category_order_and_drops_unobserved():
    true = pd.Categorical(["T", "B", "T"], categories=["T", "B", "NK"])
    table = contingency(true, ["k", "k", "j"])
    assert list(table.index) == ["T", "B"]
    assert list(table.columns) == ["j", "k"]
    assert table.loc["T", "j"] == 1 and table.loc["T", "k"] == 1 and table.loc["B", "k"] == 1


def test_mixed_type_labels_are_accepted():
    true = [1, "a", 1, "a"]
    pred = ["x", 2, "x", 2]
    assert accuracy(true, pred) == pytest.approx(1.0)
    assert contingency(true, pred).to_numpy().sum() == 4


def test_list_labels_score_as_a_series_of_them():
    """numpy would make 1 and "1" one class; a Series (and now a list) keeps them apart."""
    true, pred = [1, 1, "1", "1"], [0, 0, 1, 1]
    assert ari(true, pred) == ari(pd.Series(true, dtype=object), pred) == pytest.approx(1.0)
    assert nmi(tuple(true), pred) == pytest.approx(1.0)
    # a column read with .tolist() keeps its missing labels missing
    column = pd.Series(pd.Categorical(["T", "T", "B", None]))
    with pytest.raises(ValueError, match="labels_true contains missing values"):
        hungarian_f1(column.tolist(), [0, 0, 1, 2])


def test_series_with_non_default_index_is_not_aligned():
    true = pd.Series(["a", "a", "b"], index=[10, 11, 12])
    pred = pd.Series([0, 0, 1], index=[2, 1, 0])
    assert accuracy(true, pred) == pytest.approx(1.0)


def test_mean_f1_report_ignore():
    true = ["a", "a", "unassigned", "b", "b", "unassigned"]
    pred = [0, 0, 5, 1, 1, 0]
    report = mean_f1_report(true, pred, ignore={"unassigned"})
    assert set(report) == {"f_measure", "hungarian_f1", "nmi", "ari", "accuracy", "n_clusters"}
    for key in ("f_measure", "hungarian_f1", "nmi", "ari", "accuracy"):
        assert report[key] == pytest.approx(1.0)
    assert report["n_clusters"] == 2  # cluster 5 only contained an ignored cell
    # a bare string is one label, not a collection of characters
    assert mean_f1_report(true, pred, ignore="unassigned") == report
    unfiltered = mean_f1_report(true, pred)
    assert unfiltered["n_clusters"] == 3
    # unfiltered: a-0 (2) + b-1 (2) + unassigned-5 (1) = 5 of 6 cells
    assert unfiltered["accuracy"] == pytest.approx(5 / 6)


def test_mean_f1_report_ignore_everything_raises():
    with pytest.raises(ValueError, match="no cells left"):
        mean_f1_report(["u", "u"], [0, 1], ignore=["u"])


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", [*LABEL_SCORES, contingency, mean_f1_report])
def test_length_mismatch(score):
    with pytest.raises(ValueError, match=r"different lengths \(3 != 2\)"):
        score([0, 1, 1], [0, 1])


@pytest.mark.parametrize("score", [*LABEL_SCORES, contingency, mean_f1_report])
def test_empty_inputs(score):
    with pytest.raises(ValueError, match="empty"):
        score([], [])


def test_not_one_dimensional():
    with pytest.raises(ValueError, match=r"labels_true must be 1-D.*\(3, 1\)"):
        f_measure(np.zeros((3, 1)), [0, 1, 2])
    with pytest.raises(ValueError, match="labels_pred must be 1-D"):
        accuracy([0, 1], [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="labels_pred must be 1-D"):
        nmi([0, 1], pd.DataFrame({"a": [0, 1]}))
    with pytest.raises(ValueError, match="labels_true must be 1-D"):
        ari("abc", "abc")
    with pytest.raises(ValueError, match="labels_true must be 1-D"):
        hungarian_f1([[0], [1, 2]], [0, 1])


@pytest.mark.parametrize(
    "missing",
    [
        [0.0, np.nan, 1.0],
        ["a", None, "b"],
        ["a", np.nan, "b"],  # numpy alone would make it the class 'nan'
        pd.Categorical(["a", None, "b"]),
        pd.Series(["a", pd.NA, "b"]),
    ],
)
@pytest.mark.parametrize("score", LABEL_SCORES)
def test_missing_values_in_labels_true(score, missing):
    msg = r"labels_true contains missing values \(NaN/None\); drop or fill them first"
    with pytest.raises(ValueError, match=msg):
        score(missing, [0, 1, 2])


def test_missing_values_in_labels_pred():
    msg = r"labels_pred contains missing values \(NaN/None\); drop or fill them first"
    with pytest.raises(ValueError, match=msg):
        hungarian_f1(["a", "b", "c"], [0, None, 2])
    with pytest.raises(ValueError, match=msg):
        contingency(["a", "b", "c"], np.array([0.0, 1.0, np.nan]))


# ---------------------------------------------------------------------------------------------
# MMD^2
# ---------------------------------------------------------------------------------------------
def test_mmd2_hand_computed_two_plus_two():
    # x = {0, 1}, y = {2, 3} in 1-D, gamma = ln 2 so k(a, b) = 2 ** -(a - b) ** 2
    # K_xx off-diagonal: 2**-1 = 0.5 (mean 0.5); K_yy off-diagonal: 0.5 (mean 0.5)
    # K_xy: d^2 = 4, 9, 1, 4 -> 1/16 + 1/512 + 1/2 + 1/16 = 0.626953125, mean 0.15673828125
    # MMD^2 = 0.5 + 0.5 - 2 * 0.15673828125 = 0.6865234375
    value = mmd2_unbiased([[0.0], [1.0]], [[2.0], [3.0]], gamma=math.log(2))
    assert value == pytest.approx(0.6865234375, rel=1e-12)
    # a 1-D input is treated as one-dimensional points
    assert mmd2_unbiased([0.0, 1.0], [2.0, 3.0], gamma=math.log(2)) == pytest.approx(value)


def test_mmd2_can_be_negative_unbiased():
    # x = {0, 1}, y = {0, 2}, gamma = 1:
    # K_xx = e^-1, K_yy = e^-4, K_xy mean = (1 + e^-4 + e^-1 + e^-1) / 4
    # MMD^2 = e^-1 + e^-4 - (1 + e^-4 + 2 e^-1) / 2 = e^-4 / 2 - 1/2
    value = mmd2_unbiased([[0.0], [1.0]], [[0.0], [2.0]], gamma=1.0)
    assert value == pytest.approx(math.exp(-4) / 2 - 0.5)


def _naive_mmd2(x, y, gamma):
    kxx = np.exp(-gamma * cdist(x, x, "sqeuclidean"))
    kyy = np.exp(-gamma * cdist(y, y, "sqeuclidean"))
    kxy = np.exp(-gamma * cdist(x, y, "sqeuclidean"))
    m, n = len(x), len(y)
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def test_mmd2_matches_naive_with_median_heuristic_and_different_sizes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(17, 3))
    y = rng.normal(loc=0.5, size=(11, 3))
    dists = pdist(np.vstack([x, y]))
    gamma = 1 / (2 * np.median(dists[dists > 0]) ** 2)
    assert mmd2_unbiased(x, y) == pytest.approx(_naive_mmd2(x, y, gamma), rel=1e-10)
    assert mmd2_unbiased(x, y, gamma=0.3) == pytest.approx(_naive_mmd2(x, y, 0.3), rel=1e-10)


def test_mmd2_chunked_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(23, 4))
    y = rng.normal(size=(9, 4))
    full = mmd2_unbiased(x, y, gamma=0.2)
    monkeypatch.setattr(metrics, "_MAX_BLOCK_ELEMENTS", 7)
    assert mmd2_unbiased(x, y, gamma=0.2) == pytest.approx(full, rel=1e-12)


def test_mmd2_median_subsample_is_deterministic(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 2))
    y = rng.normal(size=(30, 2))
    monkeypatch.setattr(metrics, "_MEDIAN_MAX_POINTS", 25)
    first = mmd2_unbiased(x, y)
    assert mmd2_unbiased(x, y) == first
    assert np.isfinite(first)


def test_mmd2_sparse_and_list_inputs():
    rng = np.random.default_rng(3)
    x = rng.poisson(0.5, size=(12, 5)).astype(float)
    y = rng.poisson(1.0, size=(8, 5)).astype(float)
    dense = mmd2_unbiased(x, y, gamma=0.1)
    assert mmd2_unbiased(sparse.csr_matrix(x), sparse.csc_matrix(y), gamma=0.1) == (
        pytest.approx(dense)
    )
    assert mmd2_unbiased(x.tolist(), y.tolist(), gamma=0.1) == pytest.approx(dense)


def test_mmd2_shifted_sample_larger_than_same_distribution():
    rng = np.random.default_rng(42)
    x = rng.normal(size=(200, 2))
    y = rng.normal(size=(200, 2))
    shifted = mmd2_unbiased(x, x + 1.0)
    same = mmd2_unbiased(x, y)
    assert shifted > same
    assert shifted > 0.1


def test_mmd2_near_zero_for_same_gaussian():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(800, 3))
    y = rng.normal(size=(600, 3))
    assert abs(mmd2_unbiased(x, y)) < 0.05


def test_mmd2_identical_points():
    # all pooled points coincide: all kernel values are 1 and MMD^2 = 1 + 1 - 2 = 0
    assert mmd2_unbiased(np.ones((3, 2)), np.ones((4, 2))) == pytest.approx(0.0)


def test_mmd2_errors():
    with pytest.raises(ValueError, match="x needs at least 2 samples"):
        mmd2_unbiased([[0.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="y needs at least 2 samples"):
        mmd2_unbiased([[0.0], [1.0]], [[0.0]])
    with pytest.raises(ValueError, match=r"same number of features \(2 != 3\)"):
        mmd2_unbiased(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="gamma must be a positive"):
        mmd2_unbiased(np.zeros((3, 2)), np.ones((3, 2)), gamma=0.0)
    with pytest.raises(ValueError, match="x contains non-finite"):
        mmd2_unbiased([[0.0], [np.nan]], [[0.0], [1.0]])
    with pytest.raises(ValueError, match="x must be 1-D or 2-D"):
        mmd2_unbiased(np.zeros((2, 2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="y must be a numeric"):
        mmd2_unbiased([[0.0], [1.0]], [["a"], ["b"]])


# ---------------------------------------------------------------------------------------------
# hypothesis property tests
# ---------------------------------------------------------------------------------------------
@st.composite
def label_pairs(draw, max_size=25, max_true=5, max_pred=6):
    n = draw(st.integers(min_value=1, max_value=max_size))
    true = draw(st.lists(st.integers(0, max_true - 1), min_size=n, max_size=n))
    pred = draw(st.lists(st.integers(0, max_pred - 1), min_size=n, max_size=n))
    return true, pred


@settings(max_examples=50, deadline=None)
@given(data=label_pairs(), perm=st.permutations(range(6)), as_str=st.booleans())
def test_relabelling_predicted_clusters_is_invariant(data, perm, as_str):
    true, pred = data
    mapping = {k: (f"c{perm[k]}" if as_str else perm[k] + 100) for k in range(6)}
    relabelled = [mapping[k] for k in pred]
    for score in LABEL_SCORES:
        assert score(true, relabelled) == pytest.approx(score(true, pred), abs=1e-12), (
            score.__name__
        )


@settings(max_examples=50, deadline=None)
@given(data=label_pairs())
def test_scores_are_in_range(data):
    true, pred = data
    for score in (f_measure, hungarian_f1, nmi, accuracy):
        value = score(true, pred)
        assert -1e-12 <= value <= 1 + 1e-12, score.__name__
    assert accuracy(true, pred) > 0
    assert -1 - 1e-12 <= ari(true, pred) <= 1 + 1e-12
    # Per class, the one-to-one matched F1 can never beat the best F1 over all clusters
    _, per_class = hungarian_f1(true, pred, return_per_class=True)
    table = contingency(true, pred).to_numpy()
    f1 = 2 * table / (table.sum(axis=1)[:, None] + table.sum(axis=0)[None, :])
    best = f1.max(axis=1)
    assert np.all(per_class.to_numpy() <= best + 1e-12)
    assert per_class.between(0, 1).all()


@settings(max_examples=50, deadline=None)
@given(data=label_pairs())
def test_nmi_ari_symmetric(data):
    true, pred = data
    assert nmi(true, pred) == pytest.approx(nmi(pred, true), abs=1e-12)
    assert ari(true, pred) == pytest.approx(ari(pred, true), abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(data=label_pairs())
def test_identity_clustering_scores_one(data):
    true, _ = data
    renamed = [f"k{t}" for t in true]
    for score in LABEL_SCORES:
        assert score(true, renamed) == pytest.approx(1.0), score.__name__
