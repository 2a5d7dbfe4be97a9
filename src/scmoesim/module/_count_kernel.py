"""Fused numba kernel: exact Poisson / NB / ZINB count matrices straight into CSR parts.

Each row (cell) has its own random stream (xoshiro256+ seeded by splitmix64 from a 64-bit key
and the row number), so rows can be sampled in parallel and the result does not depend on the
number of threads. Every entry uses the inverse transform for ``x = 0`` (one uniform, and
``P(x = 0)`` only where ``u >= 1 - mu``, since ``P(x = 0) >= 1 - mu``); non-zero entries are
drawn from the distribution conditioned on ``x > 0``: by continuing the same inverse transform
where that is short (``P(x = 0) >= 1/2`` or ``E[x | x > 0] < 16``), otherwise by independent
draws (Gamma-Poisson; Marsaglia-Tsang Gamma, Hoermann's PTRS Poisson) repeated until positive.
All of these are exact samplers.
"""

import math

import numba
import numpy as np

POISSON, NB, ZINB = 0, 1, 2
_INVERT_MEAN = 24.0
_SCREEN = 1e-4
_TINY = 1e-30
_INT32_MAX = 2**31 - 1
_U64 = numba.uint64


@numba.njit(inline="always", cache=True)
def _rotl(x, k):
    return (x << _U64(k)) | (x >> _U64(64 - k))


@numba.njit(inline="always", cache=True)
def _next(s):
    """xoshiro256+: the top 53 bits as a float in [0, 1)."""
    result = s[0] + s[3]
    t = s[1] << _U64(17)
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = _rotl(s[3], 45)
    return float(result >> _U64(11)) * (1.0 / 9007199254740992.0)


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
        boost = (1.0 - _next(s)) ** (1.0 / shape)
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
def _poisson(s, lam):
    """Poisson(lam): inversion for lam < 10, Hoermann's PTRS otherwise."""
    if lam < 10.0:
        u = _next(s)
        p = math.exp(-lam)
        cdf = p
        k = 0
        while u >= cdf:
            k += 1
            p *= lam / k
            new = cdf + p
            if new == cdf:
                break
            cdf = new
        return float(k)
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
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
        if math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return k


@numba.njit(cache=True)
def _p0(kind, m, th):
    """P(x = 0), float64."""
    if kind == POISSON:
        return math.exp(-m)
    return math.exp(-th * math.log1p(m / th))


@numba.njit(cache=True)
def _positive(s, kind, m, th, u, p0_approx, p0):
    """One draw of x | x > 0 (``u``: the entry's uniform, already known to be >= P(0)).

    ``p0_approx`` (float32) chooses the method; ``p0`` is the exact P(0) or < 0 if not known.
    """
    if p0_approx >= 0.5 or m < _INVERT_MEAN * (1.0 - p0_approx):
        # continue the inverse transform from F(0) = p0 (exact)
        if p0 < 0.0:
            p0 = _p0(kind, m, th)
        pmf = p0
        cdf = p0
        ratio = m if kind == POISSON else m / (m + th)
        k = 0
        while True:
            if kind == POISSON:
                pmf *= ratio / (k + 1)
            else:
                pmf *= (k + th) / (k + 1) * ratio
            k += 1
            new = cdf + pmf
            if u < new or new == cdf:  # new == cdf: rounding has stalled the tail at u ~ 1
                return float(k)
            cdf = new
    while True:
        lam = m if kind == POISSON else _gamma(s, th) * (m / th)
        x = _poisson(s, lam)
        if x > 0.0:
            return x


@numba.njit(parallel=True, cache=True)
def sample_rows(mu, p0_approx, theta, zi_logits, kind, key, values, cols, row_nnz):
    """Sample every entry of ``mu`` (rows x genes), writing row ``i``'s non-zeros at ``i * genes``.

    ``p0_approx``: P(x = 0) of the Poisson / NB in float32 (vectorised outside; relative error
    far below ``_SCREEN``): entries with ``u`` clearly below or above it are settled without
    computing P(0) here, the others (a fraction of about ``2 * _SCREEN``) get the exact float64
    value. ``theta`` and ``zi_logits`` are ``(1 or rows, genes)`` (ignored when not needed).
    """
    n, g = mu.shape
    theta_step = 1 if theta.shape[0] > 1 else 0
    for i in numba.prange(n):
        s = np.empty(4, np.uint64)
        _seed(s, key, i)
        ti = i * theta_step
        base = i * g
        nz = 0
        for j in range(g):
            m = float(mu[i, j])
            u = _next(s)
            if m <= 0.0:
                continue
            if kind == ZINB:
                pi = 1.0 / (1.0 + math.exp(-float(zi_logits[i, j])))
                if u < pi:
                    continue
                u = (u - pi) / (1.0 - pi)
            if u < 1.0 - m:  # P(0) >= 1 - mu: zero without computing P(0)
                continue
            q = float(p0_approx[i, j])
            if q > _TINY and u < q * (1.0 - _SCREEN):
                continue
            th = 1.0 if kind == POISSON else float(theta[ti, j])
            p0 = -1.0
            if u < q * (1.0 + _SCREEN) + _TINY:  # too close to call: exact P(0)
                p0 = _p0(kind, m, th)
                if u < p0:
                    continue
            x = _positive(s, kind, m, th, u, q, p0)
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
