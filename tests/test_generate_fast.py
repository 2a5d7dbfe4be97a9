"""The generation fast path: segment decoder, in-place softmax, lazy-P(0) count kernel."""

import numpy as np
import pytest
import torch
from scipy import special, stats

from scmoesim.module import MoESimModule
from scmoesim.module._sampling import sample_sparse_counts, scaled_softmax_
from scmoesim.nn import RoutedExperts

numba = pytest.importorskip("numba")
from scmoesim.module import _count_kernel as K  # noqa: E402


# ---------------------------------------------------------------- decoder
@pytest.mark.parametrize("n_cat", [0, 2])
@pytest.mark.parametrize("sort", [True, False])
def test_decode_matches_forward(n_cat, sort):
    torch.manual_seed(0)
    experts = RoutedExperts(4, 3, {"scale": 7, "dropout": 7}, n_hidden=6, n_layers=2, n_cat=n_cat)
    with torch.no_grad():  # non-trivial biases and LayerNorm affines
        for p in experts.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    expert = torch.tensor([3, 0, 3, 1, 1, 0, 3, 3, 1, 0])  # expert 2 unused
    cat = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 0]) if n_cat else None
    if sort:
        order = torch.argsort(expert, stable=True)
        expert, cat = expert[order], cat[order] if cat is not None else None
    z = torch.randn(10, 3)
    ref = experts(z, expert, cat)
    out = experts.decode(z, expert, cat)
    assert set(out) == {"scale", "dropout"}
    for name in out:
        assert out[name].shape == (10, 7)
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-5)
    assert not out["scale"].requires_grad


def test_decode_errors_and_empty_input():
    experts = RoutedExperts(2, 2, {"loc": 3}, n_cat=2)
    with pytest.raises(ValueError, match="pass `cat`"):
        experts.decode(torch.randn(2, 2), torch.tensor([0, 1]))
    plain = RoutedExperts(2, 2, {"loc": 3})
    with pytest.raises(ValueError, match="below 2"):
        plain.decode(torch.randn(2, 2), torch.tensor([0, 2]))
    assert plain.decode(torch.randn(0, 2), torch.zeros(0, dtype=torch.long))["loc"].shape == (0, 3)


def test_scaled_softmax_in_place():
    logits = torch.randn(5, 9) * 20
    library = torch.rand(5, 1) * 1000 + 1
    ref = library * torch.softmax(logits, -1)
    out = scaled_softmax_(logits, library)
    assert out.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------- count kernel
def test_p0_lower_bound_is_below_p0():
    m = np.concatenate([np.logspace(-9, 3, 400), np.linspace(0.01, 5, 400)])
    for th in [1e-3, 0.05, 0.45, 0.999, 1.0, 1.001, 3.0, 50.0, 1e4]:
        for mi in m:
            assert K._p0_lower(K.NB, mi, th) <= K._p0(K.NB, mi, th)
    for mi in m:
        assert K._p0_lower(K.POISSON, mi, 1.0) <= K._p0(K.POISSON, mi, 1.0)
    # it is tight enough to matter: 1 / (1 + mu) for theta <= 1 beats 1 - mu
    assert K._p0_lower(K.NB, 0.5, 0.45) > 0.66


def test_sigmoid_lower_bound_is_below_sigmoid():
    logits = np.concatenate([np.linspace(-40, 40, 2001), [-800.0, 800.0, 0.0]])
    lower = np.array([K._sigmoid_lower(x) for x in logits])
    assert (lower <= special.expit(logits)).all()
    # tight enough to settle most inflated zeros: within 0.01 of pi at pi = 0.9
    assert K._sigmoid_lower(np.log(9.0)) > 0.89


def _draws(likelihood, mu, theta=None, logit=None, n=60_000, seed=0):
    mu_t = torch.full((n, 1), float(mu))
    th_t = torch.full((1, 1), float(theta)) if theta is not None else None
    zl = torch.full((n, 1), float(logit)) if logit is not None else None
    gen = torch.Generator().manual_seed(seed)
    indptr, _, values = sample_sparse_counts(likelihood, mu_t, th_t, zl, gen, "numba")
    x = np.zeros(n, np.int64)
    x[np.repeat(np.arange(n), np.diff(indptr.numpy()))] = values.numpy()
    return x


@pytest.mark.parametrize(
    ("likelihood", "mu", "theta", "logit"),
    [
        ("poisson", 0.9, None, None),  # polynomial lower bound, inversion
        ("poisson", 2.5, None, None),
        ("nb", 0.6, 0.45, None),  # 1 / (1 + mu) bound
        ("nb", 0.6, 4.0, None),  # theta > 1: polynomial bound
        ("nb", 12.0, 0.45, None),  # inversion continued with the reciprocal table
        ("nb", 200.0, 0.45, None),  # Gamma-Poisson rejection
        ("nb", 40.0, 30.0, None),  # Gamma shape > 1, PTRS
        ("zinb", 3.0, 0.5, 1.5),  # pi ~ 0.82
        ("zinb", 80.0, 0.6, -0.5),  # zero inflation, then rejection
        ("zinb", 1.5, 2.0, -800.0),  # pi = 0 (exp overflows): the NB itself
        ("zinb", 1.5, 2.0, 800.0),  # pi = 1: all zeros
    ],
)
def test_kernel_matches_pmf(likelihood, mu, theta, logit):
    x = _draws(likelihood, mu, theta, logit)
    if theta is None:
        dist = stats.poisson(mu)
    else:
        dist = stats.nbinom(theta, theta / (theta + mu))
    pi = 0.0 if logit is None else float(special.expit(logit))
    edges = np.unique(np.concatenate([[0, 1, 2, 3], np.ceil(dist.ppf([0.3, 0.5, 0.7, 0.9, 0.99]))]))
    edges = edges.astype(np.int64)
    cdf = pi + (1 - pi) * dist.cdf(edges)  # P(x <= edge)
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    observed = np.histogram(x, bins=np.concatenate([[-0.5], edges + 0.5, [np.inf]]))[0]
    if pi == 1.0:
        assert (x == 0).all()
        return
    keep = probs > 0
    expected = probs[keep] * x.size
    assert observed[~keep].sum() == 0
    chi2 = ((observed[keep] - expected) ** 2 / expected).sum()
    # a 1e-4 false alarm rate at these degrees of freedom
    assert chi2 < stats.chi2.ppf(1 - 1e-4, keep.sum() - 1), (chi2, observed, expected)
    mean, var = dist.mean() * (1 - pi), None
    var = (1 - pi) * (dist.var() + dist.mean() ** 2) - mean**2
    assert abs(x.mean() - mean) < 5 * np.sqrt(var / x.size) + 1e-12


def test_theta_index_same_as_gathered_theta_and_seeded():
    torch.manual_seed(0)
    mu = torch.rand(40, 25) * torch.logspace(-3, 2.5, 25)
    table = torch.rand(3, 25) * 2 + 0.05
    idx = torch.randint(0, 3, (40,))
    zl = torch.randn(40, 25)
    for likelihood, zi in (("nb", None), ("zinb", zl)):
        a = sample_sparse_counts(
            likelihood, mu, table, zi, torch.Generator().manual_seed(5), theta_index=idx
        )
        b = sample_sparse_counts(likelihood, mu, table[idx], zi, torch.Generator().manual_seed(5))
        c = sample_sparse_counts(likelihood, mu, table[idx], zi, torch.Generator().manual_seed(6))
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v)
        assert not torch.equal(a[2], c[2]) or not torch.equal(a[1], c[1])
    with pytest.raises(ValueError, match="theta_index must lie"):
        sample_sparse_counts("nb", mu, table, theta_index=torch.full((40,), 3))
    with pytest.raises(ValueError, match="40 entries"):
        sample_sparse_counts("nb", mu, table, theta_index=idx[:5])


def test_kernel_does_not_depend_on_threads_zinb():
    torch.manual_seed(1)
    mu = torch.rand(64, 30) * torch.logspace(-2, 2.5, 30)
    table = torch.rand(4, 30) + 0.2
    idx = torch.randint(0, 4, (64,))
    zl = torch.randn(64, 30)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = sample_sparse_counts(
            "zinb", mu, table, zl, torch.Generator().manual_seed(3), theta_index=idx
        )
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = sample_sparse_counts(
            "zinb", mu, table, zl, torch.Generator().manual_seed(3), theta_index=idx
        )
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b)


def test_module_gene_expert_dispersion_uses_the_table():
    torch.manual_seed(0)
    module = MoESimModule(
        n_input=20, n_experts=3, n_latent=4, likelihood="nb", dispersion="gene-expert"
    )
    module.eval()
    with torch.no_grad():
        module.log_dispersion.copy_(torch.log(torch.tensor([[1e4], [1e4], [0.3]]).expand(3, 20)))
    expert = torch.tensor([0, 1, 2])
    theta, index = module.dispersion_table(expert)
    assert theta.shape == (3, 20) and torch.equal(index, expert)
    torch.testing.assert_close(theta[index], module.dispersion_for(expert))
    # the expert with theta = 0.3 is far more overdispersed than the Poisson-like ones
    expert = torch.repeat_interleave(torch.tensor([0, 2]), 300)
    out = module.sample_from_experts(
        expert, torch.full((600, 1), 2000.0), generator=torch.Generator().manual_seed(0)
    )
    x = np.zeros((600, 20))
    rows = np.repeat(np.arange(600), np.diff(out["indptr"].numpy()))
    x[rows, out["cols"].numpy()] = out["values"].numpy()
    ratio = x / np.maximum(out["mean"].numpy(), 1e-9)
    assert ratio[300:].var() > 5 * ratio[:300].var()
