"""Clustering and generation quality metrics for single-cell clustering benchmarks.

All label-based scores accept any 1-D array-like of hashable labels (lists, numpy arrays,
pandas ``Series``/``Index``/``Categorical``; strings or integers) and are invariant to renaming
or permuting the predicted cluster ids. Notation used in the docstrings: ``N`` is the number of
cells, ``n_ck`` the number of cells of true class ``c`` assigned to predicted cluster ``k``,
``n_c`` the size of class ``c`` and ``n_k`` the size of cluster ``k``. For a (class, cluster)
pair, ``prec = n_ck / n_k``, ``rec = n_ck / n_c`` and
``F1 = 2 * prec * rec / (prec + rec) = 2 * n_ck / (n_c + n_k)``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import pdist
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = [
    "accuracy",
    "ari",
    "contingency",
    "f_measure",
    "hungarian_f1",
    "mean_f1_report",
    "mmd2_unbiased",
    "nmi",
]

# Largest number of kernel entries materialised at once by :func:`mmd2_unbiased`.
_MAX_BLOCK_ELEMENTS = 1 << 22
# Above this pooled sample size the median heuristic uses a fixed-seed random subsample.
_MEDIAN_MAX_POINTS = 2000


# ---------------------------------------------------------------------------------------------
# label validation / encoding
# ---------------------------------------------------------------------------------------------
def _as_label_series(labels: Any, name: str) -> pd.Series:
    """Convert a 1-D array-like of labels to a ``pd.Series`` with a fresh RangeIndex."""
    if isinstance(labels, pd.DataFrame):
        raise ValueError(f"{name} must be 1-D, got a DataFrame with shape {labels.shape}")
    if isinstance(labels, pd.Series | pd.Index | pd.Categorical):
        series = pd.Series(labels, copy=False).reset_index(drop=True)
    else:
        if sparse.issparse(labels):
            raise ValueError(f"{name} must be a 1-D array-like of labels, got a sparse matrix")
        try:
            arr = np.asarray(labels)
        except ValueError as err:  # ragged nested sequences
            raise ValueError(
                f"{name} must be 1-D; could not convert it to an array: {err}"
            ) from err
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got an array with shape {arr.shape}")
        if arr.dtype.kind in "USO" and not isinstance(labels, np.ndarray):
            # numpy makes ["T", nan] ['T', 'nan'] (a class, not a missing label) and [1, "1"]
            # one class: keep each label as given, as a Series of the same values would
            arr = np.empty(len(arr), dtype=object)
            arr[:] = list(labels)
        series = pd.Series(arr, copy=False)
    return series


def _validate_labels(labels_true: Any, labels_pred: Any) -> tuple[pd.Series, pd.Series]:
    """Validate a pair of label vectors and return them as aligned ``pd.Series``."""
    true = _as_label_series(labels_true, "labels_true")
    pred = _as_label_series(labels_pred, "labels_pred")
    if len(true) != len(pred):
        raise ValueError(
            f"labels_true and labels_pred have different lengths ({len(true)} != {len(pred)})"
        )
    if len(true) == 0:
        raise ValueError("labels_true and labels_pred are empty; need at least one cell")
    for name, series in (("labels_true", true), ("labels_pred", pred)):
        if bool(series.isna().any()):
            raise ValueError(f"{name} contains missing values (NaN/None); drop or fill them first")
    return true, pred


def _encode(series: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Integer-encode labels; uniques are sorted when the labels are mutually comparable."""
    try:
        codes, uniques = pd.factorize(series, sort=True)
    except TypeError:  # labels of mutually unorderable types
        codes, uniques = pd.factorize(series, sort=False)
    return np.asarray(codes, dtype=np.intp), pd.Index(uniques)


def _contingency_counts(
    true: pd.Series, pred: pd.Series
) -> tuple[np.ndarray, pd.Index, pd.Index, np.ndarray, np.ndarray]:
    """Return the (classes x clusters) count matrix, the label indexes and the codes."""
    t_codes, t_uniques = _encode(true)
    p_codes, p_uniques = _encode(pred)
    n_t, n_p = len(t_uniques), len(p_uniques)
    counts = np.bincount(t_codes * n_p + p_codes, minlength=n_t * n_p).reshape(n_t, n_p)
    return counts, t_uniques, p_uniques, t_codes, p_codes


def _f1_matrix(counts: np.ndarray) -> np.ndarray:
    """F1 of every (class, cluster) pair: ``2 * n_ck / (n_c + n_k)``."""
    n_c = counts.sum(axis=1, keepdims=True)
    n_k = counts.sum(axis=0, keepdims=True)
    # n_c, n_k >= 1 for observed labels, so the denominator is never zero.
    return 2.0 * counts / (n_c + n_k)


# ---------------------------------------------------------------------------------------------
# label-based scores
# ---------------------------------------------------------------------------------------------
def contingency(labels_true: Any, labels_pred: Any) -> pd.DataFrame:
    """Contingency (count) table of true classes versus predicted clusters.

    Entry ``(c, k)`` is ``n_ck``, the number of cells of true class ``c`` assigned to predicted
    cluster ``k``. Only labels that occur are included; they are sorted when comparable.

    Parameters
    ----------
    labels_true
        1-D array-like of ground-truth class labels.
    labels_pred
        1-D array-like of predicted cluster labels, same length as ``labels_true``.

    Returns
    -------
    pandas.DataFrame
        Integer counts with rows indexed by true class (index name ``"labels_true"``) and
        columns by predicted cluster (column index name ``"labels_pred"``).
    """
    true, pred = _validate_labels(labels_true, labels_pred)
    counts, t_uniques, p_uniques, _, _ = _contingency_counts(true, pred)
    return pd.DataFrame(
        counts,
        index=t_uniques.rename("labels_true"),
        columns=p_uniques.rename("labels_pred"),
    )


def f_measure(labels_true: Any, labels_pred: Any) -> float:
    """FlowCAP F-measure (MoE-Sim-VAE paper, Eq. 12).

    For every true class ``c`` take the best F1 over all predicted clusters and average these
    with weights given by the class sizes::

        F = sum_c (n_c / N) * max_k F1(c, k),   F1(c, k) = 2 * n_ck / (n_c + n_k)

    A predicted cluster may be the best match of several classes.

    Parameters
    ----------
    labels_true
        1-D array-like of ground-truth class labels.
    labels_pred
        1-D array-like of predicted cluster labels, same length as ``labels_true``.

    Returns
    -------
    float
        F-measure in ``[0, 1]``; ``1`` for a perfect clustering.
    """
    true, pred = _validate_labels(labels_true, labels_pred)
    counts = _contingency_counts(true, pred)[0]
    best = _f1_matrix(counts).max(axis=1)
    n_c = counts.sum(axis=1)
    return float(np.dot(n_c, best) / n_c.sum())


@overload
def hungarian_f1(
    labels_true: Any, labels_pred: Any, *, return_per_class: Literal[False] = ...
) -> float: ...
@overload
def hungarian_f1(
    labels_true: Any, labels_pred: Any, *, return_per_class: Literal[True]
) -> tuple[float, pd.Series]: ...
def hungarian_f1(
    labels_true: Any, labels_pred: Any, *, return_per_class: bool = False
) -> float | tuple[float, pd.Series]:
    """Mean F1 over true classes after one-to-one Hungarian matching (Weber & Robinson 2016).

    True classes are matched one-to-one to predicted clusters by the Hungarian algorithm so
    that the sum of ``F1(c, k) = 2 * n_ck / (n_c + n_k)`` over matched pairs is maximal. Classes
    left unmatched (more classes than clusters) get ``F1 = 0``; surplus clusters are ignored.
    The score is the unweighted mean over true classes::

        F = (1 / C) * sum_c F1(c, m(c))

    Parameters
    ----------
    labels_true
        1-D array-like of ground-truth class labels.
    labels_pred
        1-D array-like of predicted cluster labels, same length as ``labels_true``.
    return_per_class
        If ``True`` also return the per-class F1 values.

    Returns
    -------
    float or tuple of (float, pandas.Series)
        Mean F1 in ``[0, 1]``; with ``return_per_class=True`` also a ``Series`` named ``"f1"``
        with the F1 of every true class, indexed by class label.
    """
    true, pred = _validate_labels(labels_true, labels_pred)
    counts, t_uniques, _, _, _ = _contingency_counts(true, pred)
    f1 = _f1_matrix(counts)
    rows, cols = linear_sum_assignment(f1, maximize=True)
    per_class = np.zeros(f1.shape[0], dtype=float)
    per_class[rows] = f1[rows, cols]
    score = float(per_class.mean())
    if return_per_class:
        return score, pd.Series(per_class, index=t_uniques.rename("labels_true"), name="f1")
    return score


def accuracy(labels_true: Any, labels_pred: Any) -> float:
    """Clustering accuracy under the best one-to-one mapping of clusters to classes.

    Predicted clusters are mapped one-to-one to true classes with the Hungarian algorithm so as
    to maximise the number of correctly assigned cells; cells in unmapped clusters count as
    wrong::

        ACC = max_m (1 / N) * sum_k n_{m(k), k}

    Parameters
    ----------
    labels_true
        1-D array-like of ground-truth class labels.
    labels_pred
        1-D array-like of predicted cluster labels, same length as ``labels_true``.

    Returns
    -------
    float
        Fraction of correctly assigned cells, in ``(0, 1]``.
    """
    true, pred = _validate_labels(labels_true, labels_pred)
    counts = _contingency_counts(true, pred)[0]
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / counts.sum())


def nmi(labels_true: Any, labels_pred: Any) -> float:
    """Compute the normalised mutual information (arithmetic-mean normalisation).

    ``NMI = I(T; P) / ((H(T) + H(P)) / 2)``, computed with
    :func:`sklearn.metrics.normalized_mutual_info_score` (``average_method="arithmetic"``).

    Parameters
    ----------
    labels_true
        1-D array-like of ground-truth class labels.
    labels_pred
        1-D array-like of predicted cluster labels, same length as ``labels_true``.

    Returns
    -------
    float
        NMI in ``[0, 1]``; symmetric in its arguments.
    """
    true, pred = _validate_labels(labels_true, labels_pred)
    t_codes, p_codes = _encode(true)[0], _encode(pred)[0]
    score = normalized_mutual_info_score(t_codes, p_codes, average_method="arithmetic")
    return float(score)


def ari(labels_true: Any, labels_pred: Any) -> float:
    """Compute the adjusted Rand index.

    The Rand index corrected for chance, ``ARI = (RI - E[RI]) / (max(RI) - E[RI])``, computed
    with :func:`sklearn.metrics.adjusted_rand_score`.

    Parameters
    ----------
    labels_true
        1-D array-like of ground-truth class labels.
    labels_pred
        1-D array-like of predicted cluster labels, same length as ``labels_true``.

    Returns
    -------
    float
        ARI in ``[-1, 1]`` (about ``0`` for random labelings, ``1`` for a perfect match);
        symmetric in its arguments.
    """
    true, pred = _validate_labels(labels_true, labels_pred)
    t_codes, p_codes = _encode(true)[0], _encode(pred)[0]
    return float(adjusted_rand_score(t_codes, p_codes))


def mean_f1_report(
    labels_true: Any, labels_pred: Any, *, ignore: Collection[Any] | None = None
) -> dict[str, float | int]:
    """Compute the standard clustering scores in one call.

    Cells whose true label is in ``ignore`` (for example ``"unassigned"`` in cytometry or
    ``"unannotated"`` in Tabula Muris) are dropped before scoring.

    Parameters
    ----------
    labels_true
        1-D array-like of ground-truth class labels.
    labels_pred
        1-D array-like of predicted cluster labels, same length as ``labels_true``.
    ignore
        Optional collection of true-label values to drop. A single string is treated as one
        label, not as a collection of characters.

    Returns
    -------
    dict
        Keys ``"f_measure"``, ``"hungarian_f1"``, ``"nmi"``, ``"ari"``, ``"accuracy"`` (floats,
        see the respective functions) and ``"n_clusters"`` (number of distinct predicted
        clusters among the scored cells).

    Raises
    ------
    ValueError
        If the inputs are invalid or no cells remain after dropping ``ignore`` labels.
    """
    true, pred = _validate_labels(labels_true, labels_pred)
    if ignore is not None:
        if isinstance(ignore, str | bytes):
            ignore = [ignore]
        keep = ~true.isin(list(ignore)).to_numpy()
        if not keep.any():
            raise ValueError("no cells left after dropping the labels in `ignore`")
        true = true[keep].reset_index(drop=True)
        pred = pred[keep].reset_index(drop=True)
    return {
        "f_measure": f_measure(true, pred),
        "hungarian_f1": hungarian_f1(true, pred),
        "nmi": nmi(true, pred),
        "ari": ari(true, pred),
        "accuracy": accuracy(true, pred),
        "n_clusters": int(pred.nunique()),
    }


# ---------------------------------------------------------------------------------------------
# generation quality: MMD
# ---------------------------------------------------------------------------------------------
def _as_sample(x: Any, name: str) -> np.ndarray:
    """Convert a sample to a dense 2-D float64 array of shape (n_samples, n_features)."""
    if sparse.issparse(x):
        x = x.toarray()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array-like: {err}") from err
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (n_samples, n_features), got {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(
            f"{name} needs at least 2 samples for the unbiased MMD^2, got {arr.shape[0]}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN/inf)")
    return arr


def _median_heuristic_gamma(pooled: np.ndarray) -> float:
    """``1 / (2 * median^2)`` with the median of the non-zero pairwise distances."""
    if pooled.shape[0] > _MEDIAN_MAX_POINTS:
        rng = np.random.default_rng(0)
        idx = rng.choice(pooled.shape[0], size=_MEDIAN_MAX_POINTS, replace=False)
        pooled = pooled[idx]
    dists = pdist(pooled)
    dists = dists[dists > 0]
    if dists.size == 0:
        # All points coincide: every kernel value is 1 and MMD^2 is 0 for any gamma.
        return 1.0
    med = float(np.median(dists))
    return 1.0 / (2.0 * med * med)


def _rbf_kernel_sum(a: np.ndarray, b: np.ndarray, gamma: float, *, same: bool) -> float:
    """Sum of ``exp(-gamma * ||a_i - b_j||^2)`` over all pairs, in row blocks.

    With ``same=True`` (``a is b``) the diagonal ``i == j`` is excluded.
    """
    a_sq = np.einsum("ij,ij->i", a, a)
    b_sq = np.einsum("ij,ij->i", b, b)
    step = max(1, _MAX_BLOCK_ELEMENTS // max(1, b.shape[0]))
    total = 0.0
    for start in range(0, a.shape[0], step):
        stop = min(start + step, a.shape[0])
        d2 = a_sq[start:stop, None] + b_sq[None, :] - 2.0 * (a[start:stop] @ b.T)
        np.maximum(d2, 0.0, out=d2)
        k = np.exp(-gamma * d2)
        if same:
            rows = np.arange(stop - start)
            k[rows, rows + start] = 0.0
        total += float(k.sum())
    return total


def mmd2_unbiased(x: Any, y: Any, *, gamma: float | None = None) -> float:
    """Unbiased estimate of the squared maximum mean discrepancy with an RBF kernel.

    With ``k(a, b) = exp(-gamma * ||a - b||^2)``, samples ``x`` (size ``m``) and ``y``
    (size ``n``), the U-statistic (cf. MoE-Sim-VAE paper, Eq. 14) is::

        MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j)
                + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                - 2/(m n)    sum_{i, j}   k(x_i, y_j)

    It is unbiased and can therefore be slightly negative when both samples come from the same
    distribution. Kernel sums are accumulated in row blocks to bound memory use.

    Parameters
    ----------
    x
        First sample, shape ``(m, d)`` with ``m >= 2``; numpy array, list, or scipy sparse
        matrix (densified). A 1-D input is treated as ``m`` one-dimensional points.
    y
        Second sample, shape ``(n, d)`` with ``n >= 2`` and the same ``d``; ``m`` and ``n`` may
        differ.
    gamma
        RBF bandwidth parameter (``> 0``). ``None`` uses the median heuristic
        ``gamma = 1 / (2 * median^2)``, with the median of the non-zero pairwise Euclidean
        distances of the pooled sample (computed on a fixed-seed random subsample of
        2000 points when the pooled sample is larger).

    Returns
    -------
    float
        The unbiased MMD^2 estimate.

    Raises
    ------
    ValueError
        If the samples are not numeric 1-D/2-D arrays, have fewer than 2 points, contain
        non-finite values, differ in the number of features, or ``gamma`` is not positive.
    """
    xa = _as_sample(x, "x")
    ya = _as_sample(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(
            f"x and y must have the same number of features ({xa.shape[1]} != {ya.shape[1]})"
        )
    if gamma is None:
        gamma = _median_heuristic_gamma(np.vstack([xa, ya]))
    else:
        gamma = float(gamma)
        if not (np.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    m, n = xa.shape[0], ya.shape[0]
    k_xx = _rbf_kernel_sum(xa, xa, gamma, same=True) / (m * (m - 1))
    k_yy = _rbf_kernel_sum(ya, ya, gamma, same=True) / (n * (n - 1))
    k_xy = _rbf_kernel_sum(xa, ya, gamma, same=False) / (m * n)
    return float(k_xx + k_yy - 2.0 * k_xy)
