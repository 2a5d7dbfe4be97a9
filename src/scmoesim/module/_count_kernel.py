"""Fused numba kernel: exact Poisson / NB / ZINB count matrices straight into CSR parts.

Each row (cell) has its own random stream (xoshiro256+ seeded by splitmix64 from a 64-bit key
and the row number), so rows can be sampled in parallel and the result does not depend on the
number of threads. Every entry uses the inverse transform for ``x = 0`` with one uniform ``u``:

1. ``u`` below a cheap lower bound of ``P(x = 0) = pi + (1 - pi) P_NB(0)`` is zero: the bounds
   use no transcendental functions (``1 / (1 + mu)`` for an NB with ``theta <= 1``, else the
   alternating series of ``exp(-mu)``; for ``pi = sigmoid(logit)`` a Taylor polynomial of
   ``exp``), so this branch-free test settles most entries for the price of a uniform;
2. zero inflation (ZINB): ``u < pi`` (float64) is a structural zero; otherwise ``u`` is
   rescaled onto the NB's CDF;
3. ``P(x = 0)`` is computed in float64 and ``u < P(x = 0)`` gives zero.

Non-zero entries are drawn from the distribution conditioned on ``x > 0``: by continuing the
same inverse transform where that is short (``P(x = 0) >= 1/2`` or ``E[x | x > 0]`` small; a
multiply-only pmf recursion with a table of reciprocals), otherwise by independent draws
(Gamma-Poisson; Marsaglia-Tsang Gamma, Hoermann's PTRS Poisson) repeated until positive. All
of these are exact samplers.
"""

import math

import numba
import numpy as np

POISSON, NB, ZINB = 0, 1, 2
#: Continue the inversion when E[x | x > 0] is below this (else Gamma-Poisson rejection).
_INVERT_MEAN = 96.0
_INT32_MAX = 2**31 - 1
_U64 = numba.uint64
_UNIT = 1.0 / 9007199254740992.0
#: 1 / (k + 1) for the pmf recursion (a multiply instead of a divide per step).
_RECIP = 1.0 / np.arange(1.0, 1025.0)
_N_RECIP = 1024


@numba.njit(inline="always", cache=True)
def _rotl(x, k):
    return (x << _U64(k)) | (x >> _U64(64 - k))


@numba.njit(inline="always", cache=True)
def _step(s0, s1, s2, s3):
    """One xoshiro256+ step on a state held in locals: (uniform in [0, 1), new state)."""
    result = s0 + s3
    t = s1 << _U64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = _rotl(s3, 45)
    return float(result >> _U64(11)) * _UNIT, s0, s1, s2, s3


@numba.njit(inline="always", cache=True)
def _next(s):
    """xoshiro256+ on a state array (the rare paths): the top 53 bits as a float in [0, 1)."""
    u, s[0], s[1], s[2], s[3] = _step(s[0], s[1], s[2], s[3])
    return u


@numba.njit(inline="always", cache=True)
def _splitmix(x):
    x = x + _U64(0x9E3779B97F4A7C15)
    z = x
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x, z ^ (z >> _U64(31))


@numba.njit(cache=True)
def _seed(s, key, row):
    x = _U64(key) ^ (_U64(row) * _U64(0xD1B54A32D192ED03))
    for i in range(4):
        x, z = _splitmix(x)
        s[i] = z


@numba.njit(cache=True)
def _normal(s):
    """Marsaglia's polar method (one of the pair is used)."""
    while True:
        a = 2.0 * _next(s) - 1.0
        b = 2.0 * _next(s) - 1.0
        r = a * a + b * b
        if 0.0 < r < 1.0:
            return a * math.sqrt(-2.0 * math.log(r) / r)


@numba.njit(cache=True)
def _gamma(s, shape):
    """Gamma(shape, 1): Marsaglia-Tsang; shape < 1 via Gamma(shape + 1) * U^(1 / shape)."""
    boost = 1.0
    if shape < 1.0:
        boost = math.exp(math.log(1.0 - _next(s)) / shape)
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = _normal(s)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = 1.0 - _next(s)
        if u < 1.0 - 0.0331 * x * x * x * x:
            return d * v * boost
        if math.log(u) < 0.5 * x * x + d * (1.0 - v + math.log(v)):
            return d * v * boost


@numba.njit(cache=True)
def _poisson(s, lam, recip):
    """Poisson(lam): inversion for lam < 10, Hoermann's PTRS otherwise."""
    if lam < 10.0:
        u = _next(s)
        p = math.exp(-lam)
        cdf = p
        k = 0
        while u >= cdf:
            p *= lam * recip[k] if k < _N_RECIP else lam / (k + 1)
            k += 1
            new = cdf + p
            if new == cdf:
                break
            cdf = new
        return float(k)
    slam = math.sqrt(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = _next(s) - 0.5
        v = _next(s)
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        # log(v) + log(invalpha) - log(a / us^2 + b), as one logarithm
        if math.log(v * invalpha / (a / (us * us) + b)) <= (
            -lam + k * math.log(lam) - math.lgamma(k + 1.0)
        ):
            return k


@numba.njit(inline="always", cache=True)
def _p0_lower(kind, m, th):
    """A lower bound of P(x = 0) without transcendental functions (1e-12 slack for rounding)."""
    if kind != POISSON and th <= 1.0:
        # (1 + m / th)^th <= 1 + m for th <= 1 (Bernoulli), so P(0) >= 1 / (1 + m)
        return 1.0 / (1.0 + m) - 1e-12
    # P(0) >= exp(-m) for the Poisson and every NB; the series cut after a negative term
    # is below exp(-m)
    return 1.0 - m * (1.0 - m * (0.5 - m * (1.0 / 6.0))) - 1e-12


@numba.njit(inline="always", cache=True)
def _sigmoid_lower(logit):
    """A lower bound of ``sigmoid(logit)`` without transcendental functions (1e-12 slack).

    ``sigmoid(l) = t / (1 + t)`` with ``t = exp(l)`` grows with ``t``; below ``exp(l)`` lie its
    Taylor polynomial for ``l >= 0`` and the series of ``exp(-|l|)`` cut after a negative term.
    """
    a = abs(logit)
    if logit >= 0.0:
        t = 1.0 + a * (1.0 + a * (0.5 + a * (1.0 / 6.0 + a * (1.0 / 24.0))))
    else:
        t = max(0.0, 1.0 - a * (1.0 - a * (0.5 - a * (1.0 / 6.0))))
    return t / (1.0 + t) - 1e-12


@numba.njit(inline="always", cache=True)
def _p0(kind, m, th):
    """P(x = 0), float64."""
    if kind == POISSON:
        return math.exp(-m)
    x = m / th
    # log(1 + x) is as accurate as log1p(x) (to a few ulp) from x = 1/4 on, and cheaper
    return math.exp(-th * (math.log(1.0 + x) if x > 0.25 else math.log1p(x)))


@numba.njit(inline="always", cache=True)
def _factor(kind, k, th, ratio, recip):
    """P(k + 1) / P(k): ``ratio / (k + 1)`` (Poisson) or ``(k + th) / (k + 1) * ratio`` (NB)."""
    r = recip[k] if k < _N_RECIP else 1.0 / (k + 1)
    return ratio * r if kind == POISSON else (k + th) * r * ratio


@numba.njit(inline="always", cache=True)
def _invert(kind, m, th, u, p0, recip):
    """``min{k > 0 : F(k) > u}`` by the pmf recursion from ``F(0) = p0``, four steps at a time.

    Returns the same ``k`` as a step-by-step search: the first ``k`` with ``u < F(k)``, or where
    rounding has stalled the sum in the tail (``F(k) == F(k - 1)``, only for ``u`` ~ 1).
    """
    pmf = p0
    cdf = p0
    ratio = m if kind == POISSON else m / (m + th)
    k = 0
    while True:
        p1 = pmf * _factor(kind, k, th, ratio, recip)
        p2 = p1 * _factor(kind, k + 1, th, ratio, recip)
        p3 = p2 * _factor(kind, k + 2, th, ratio, recip)
        p4 = p3 * _factor(kind, k + 3, th, ratio, recip)
        c1 = cdf + p1
        c2 = c1 + p2
        c3 = c2 + p3
        c4 = c3 + p4
        # F is non-decreasing, and a stall (an addend below rounding) only happens in the
        # decreasing tail, where it persists: one test decides whether the block ends it
        if u < c4 or c4 == c3:
            if u < c1 or c1 == cdf:
                return float(k + 1)
            if u < c2 or c2 == c1:
                return float(k + 2)
            if u < c3 or c3 == c2:
                return float(k + 3)
            return float(k + 4)
        pmf = p4
        cdf = c4
        k += 4


@numba.njit(inline="always", cache=True)
def _positive(s, kind, m, th, u, p0, recip):
    """One draw of x | x > 0 (``u``: the entry's uniform, known to be >= ``p0`` = P(0))."""
    if p0 >= 0.5 or m < _INVERT_MEAN * (1.0 - p0):
        return _invert(kind, m, th, u, p0, recip)  # continue the inverse transform (exact)
    while True:
        lam = m if kind == POISSON else _gamma(s, th) * (m / th)
        x = _poisson(s, lam, recip)
        if x > 0.0:
            return x


@numba.njit(parallel=True, cache=True)
def sample_rows(mu, theta, theta_rows, zi_logits, kind, key, values, cols, row_nnz):
    """Sample every entry of ``mu`` (rows x genes), writing row ``i``'s non-zeros at ``i * genes``.

    ``theta`` is ``(R, genes)``; row ``i`` uses ``theta[theta_rows[i]]`` (ignored for the
    Poisson). ``zi_logits`` (``ZINB`` only) is ``(rows, genes)``.

    Each row runs two passes: a branch-free one draws the uniform of every entry (in column
    order) and lists the entries that the cheap tests leave open; the second settles those
    (the extra draws of the rejection samplers continue the row's stream).
    """
    n, g = mu.shape
    recip = _RECIP
    for i in numba.prange(n):
        s = np.empty(4, np.uint64)
        _seed(s, key, i)
        s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
        ti = theta_rows[i]
        us = np.empty(g, np.float64)
        open_ = np.empty(g, np.int32)
        n_open = 0
        for j in range(g):
            u, s0, s1, s2, s3 = _step(s0, s1, s2, s3)
            m = float(mu[i, j])
            th = 1.0 if kind == POISSON else float(theta[ti, j])
            low = _p0_lower(kind, m, th)
            if kind == ZINB:
                pi_low = _sigmoid_lower(float(zi_logits[i, j]))
                low = pi_low + (1.0 - pi_low) * low
            us[j] = u
            open_[n_open] = j
            n_open += (u >= low) & (m > 0.0)
        s[0], s[1], s[2], s[3] = s0, s1, s2, s3
        base = i * g
        nz = 0
        for c in range(n_open):
            j = open_[c]
            u = us[j]
            m = float(mu[i, j])
            th = 1.0 if kind == POISSON else float(theta[ti, j])
            if kind == ZINB:
                e = math.exp(-float(zi_logits[i, j]))
                pi = 1.0 / (1.0 + e)
                if u < pi:
                    continue
                u = (u - pi) / (1.0 / (1.0 + 1.0 / e))  # (u - pi) / (1 - pi), also for e = inf
                if u < _p0_lower(kind, m, th):
                    continue
            p0 = _p0(kind, m, th)
            if u < p0:
                continue
            x = _positive(s, kind, m, th, u, p0, recip)
            values[base + nz] = int(min(x, _INT32_MAX))
            cols[base + nz] = j
            nz += 1
        row_nnz[i] = nz


@numba.njit(parallel=True, cache=True)
def compact(values, cols, row_nnz, indptr, out_values, out_cols):
    """Copy each row's non-zeros from its ``i * genes`` slot to ``indptr[i]``."""
    n = row_nnz.shape[0]
    g = values.shape[0] // max(n, 1)
    for i in numba.prange(n):
        src, dst, k = i * g, indptr[i], row_nnz[i]
        out_values[dst : dst + k] = values[src : src + k]
        out_cols[dst : dst + k] = cols[src : src + k]
