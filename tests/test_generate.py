"""Generation: exact count sampling, cluster numbers, library sizes, memory-bounded output."""

import anndata as ad
import numpy as np
import pytest
import scvi
import torch
from scipy import sparse, stats

from scmoesim import MoESim
from scmoesim.module import MoESimModule
from scmoesim.module._sampling import sample_sparse_counts

from .conftest import KIDNEY_SIGS, TRAIN


# ---------------------------------------------------------------- exact count sampling
def _dense_draws(likelihood, mu, theta=None, pi=None, n=100_000, seed=0, backend="auto"):
    mu_t = torch.full((n, 1), float(mu))
    th_t = torch.full((1, 1), float(theta)) if theta is not None else None
    zl = torch.full((n, 1), float(np.log(pi / (1 - pi)))) if pi is not None else None
    gen = torch.Generator().manual_seed(seed)
    indptr, cols, values = sample_sparse_counts(likelihood, mu_t, th_t, zl, gen, backend)
    assert (cols == 0).all()
    return sparse.csr_matrix((values.numpy(), cols.numpy(), indptr.numpy()), (n, 1)).toarray()[:, 0]


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize(
    ("likelihood", "mu", "theta", "pi"),
    [
        ("poisson", 0.2, None, None),  # almost all zeros: the cheap pre-test
        ("poisson", 30.0, None, None),  # rejection branch
        ("nb", 0.05, 0.3, None),
        ("nb", 4.0, 0.5, None),
        ("nb", 0.7, 0.05, None),  # P(0) high, heavy tail: inversion continued in blocks
        ("nb", 300.0, 0.4, None),  # Gamma shape < 1, PTRS Poisson
        ("nb", 1000.0, 20.0, None),  # Gamma shape > 1
        ("nb", 30.0, 0.02, None),  # P(0) ~ 0.9, long tail: inversion
        ("zinb", 2.0, 1.0, 0.4),
    ],
)
def test_sparse_count_sampler_matches_distribution(likelihood, mu, theta, pi, backend):
    x = _dense_draws(likelihood, mu, theta, pi, backend=backend)
    dist = stats.poisson(mu) if theta is None else stats.nbinom(theta, theta / (theta + mu))
    ks = np.array([0, 1, 2, 3, 5, 10, 40, 300, 1000])
    cdf = dist.cdf(ks)
    if pi is not None:
        cdf = pi + (1 - pi) * cdf
    emp = np.array([(x <= k).mean() for k in ks])
    # binomial standard error of an empirical CDF at n = 100,000 is below 0.0016
    np.testing.assert_allclose(emp, cdf, atol=0.006)
    mean = dist.mean() * (1 - (pi or 0))
    se = np.sqrt(dist.var() / x.size) + 1e-9
    assert abs(x.mean() - mean) < 5 * se + 1e-3 * mean


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_sparse_count_sampler_layout_and_seed(backend):
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(50, 40) * torch.logspace(-3, 2, 40)
    theta = torch.full((1, 40), 0.5)
    indptr, cols, values = sample_sparse_counts("nb", mu, theta, generator=gen, backend=backend)
    assert (values > 0).all() and values.dtype == torch.int32 and cols.dtype == torch.int32
    assert indptr.shape == (51,) and indptr[0] == 0 and indptr[-1] == values.shape[0]
    rows = torch.repeat_interleave(torch.arange(50), torch.diff(indptr))
    flat = rows * 40 + cols
    assert (flat[1:] > flat[:-1]).all()  # row-major, no duplicates
    seeded = torch.Generator().manual_seed(0)
    again = sample_sparse_counts("nb", mu, theta, generator=seeded, backend=backend)
    torch.testing.assert_close(values, again[2])
    # per-cell theta (dispersion="gene-expert") is used row by row: a huge theta in one row
    # makes that row Poisson-like (variance ~ mean), a tiny one very overdispersed
    big = torch.full((2000, 1), 20.0)
    per_row = torch.cat([torch.full((1000, 1), 1e4), torch.full((1000, 1), 0.5)])
    ip, _, v = sample_sparse_counts("nb", big, per_row, generator=seeded, backend=backend)
    x = sparse.csr_matrix((v.numpy(), _.numpy(), ip.numpy()), (2000, 1)).toarray()[:, 0]
    assert 15 < x[:1000].var() < 27 and x[1000:].var() > 400
    with pytest.raises(ValueError, match="needs theta"):
        sample_sparse_counts("nb", mu)
    with pytest.raises(ValueError, match="needs zi_logits"):
        sample_sparse_counts("zinb", mu, theta)
    with pytest.raises(ValueError, match="'poisson', 'nb' or 'zinb'"):
        sample_sparse_counts("normal", mu)
    with pytest.raises(ValueError, match="backend"):
        sample_sparse_counts("nb", mu, theta, backend="cuda")


def test_numba_sampler_does_not_depend_on_threads():
    numba = pytest.importorskip("numba")
    mu = torch.rand(64, 30) * 50
    theta = torch.full((1, 30), 0.4)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = sample_sparse_counts("nb", mu, theta, generator=torch.Generator().manual_seed(3))
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = sample_sparse_counts("nb", mu, theta, generator=torch.Generator().manual_seed(3))
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson", "normal", "bernoulli"])
def test_module_samples_every_likelihood(likelihood):
    torch.manual_seed(0)
    module = MoESimModule(n_input=30, n_experts=3, n_latent=4, likelihood=likelihood)
    module.eval()
    expert = torch.tensor([0, 0, 1, 2, 2, 2])
    library = torch.full((6, 1), 500.0)
    gen = torch.Generator().manual_seed(1)
    out = module.sample_from_experts(expert, library, None, 1.0, generator=gen)
    assert out["mean"].shape == (6, 30)
    if module.is_count:
        assert (out["values"] > 0).all()
        # the expected counts add up to the library size (zinb: minus the inflated zeros)
        totals = out["mean"].sum(1)
        assert (totals <= 500.0 + 1e-3).all()
        if likelihood != "zinb":
            torch.testing.assert_close(totals, torch.full((6,), 500.0))
    elif likelihood == "bernoulli":
        assert ((out["sample"] >= 0) & (out["sample"] <= 1)).all()
        torch.testing.assert_close(out["sample"], out["mean"])
    else:
        assert not torch.equal(out["sample"], out["mean"])


# ---------------------------------------------------------------- generate() on a model
@pytest.fixture(scope="module")
def model(kidney_full):
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(kidney_full.n_obs, 240, replace=False))
    genes = np.argsort(-np.asarray(kidney_full.layers["counts"].sum(0)).ravel())[:200]
    genes = set(genes) | set(
        kidney_full.var_names.get_indexer([g for v in KIDNEY_SIGS.values() for g in v])
    )
    adata = kidney_full[cells, sorted(genes)].copy()
    del adata.uns["provenance"]
    MoESim.setup_anndata(adata, layer="counts", batch_key="sex", signatures=KIDNEY_SIGS)
    # a module fixture is built before the autouse per-test seed: seed it here, so the model
    # does not depend on which tests ran before
    scvi.settings.seed = 0
    model = MoESim(adata, n_experts=4)
    model.train(**TRAIN)
    return model


def test_default_split_follows_training_proportions(model):
    gen = model.generate(1000, seed=0)
    usage = np.asarray(model.expert_usage_, dtype=float)
    counts = np.bincount(gen.obs["moesim_expert"], minlength=len(usage))
    assert counts.sum() == 1000
    np.testing.assert_allclose(counts, 1000 * usage / usage.sum(), atol=1)
    record = gen.uns["moesim_generate"]
    assert record["proportions"] == "training" and record["n_cells"].sum() == 1000
    # cells come grouped by cluster, expert and name agree
    assert (np.diff(gen.obs["moesim_expert"].to_numpy()) >= 0).all()
    names = np.asarray(model.cluster_names_)[gen.obs["moesim_expert"]]
    np.testing.assert_array_equal(gen.obs["moesim_cluster"].astype(str), names)


def test_uniform_and_given_proportions(model):
    two = ["leukocyte", "endothelial cell"]
    gen = model.generate(11, clusters=two, proportions="uniform")
    assert sorted(gen.obs["moesim_cluster"].value_counts()[two].tolist()) == [5, 6]
    gen = model.generate(10, proportions={"leukocyte": 3, "kidney tubule cell": 1.0})
    got = gen.obs["moesim_cluster"].value_counts()
    assert got["leukocyte"] == 8 and got["kidney tubule cell"] == 2 and got.sum() == 10
    assert gen.uns["moesim_generate"]["proportions"] == "given"
    with pytest.raises(ValueError, match="either clusters or proportions"):
        model.generate(10, clusters=two, proportions={"leukocyte": 1})
    with pytest.raises(ValueError, match="no clusters or proportions"):
        model.generate({"leukocyte": 2}, proportions={"leukocyte": 1})
    with pytest.raises(ValueError, match="non-negative numbers"):
        model.generate(10, proportions={"leukocyte": -1})
    with pytest.raises(ValueError, match="at least one positive weight"):
        model.generate(10, proportions={"leukocyte": 0})
    with pytest.raises(ValueError, match="'training', 'uniform'"):
        model.generate(10, proportions="equal")
    with pytest.raises(ValueError, match="Unknown cluster"):
        model.generate(10, proportions={"liver": 1})


def test_clusters_takes_names_only(model):
    """One name may be given bare; a dict of counts or weights is pointed to the right argument
    (iterating it used to take its keys and drop the numbers without a word)."""
    gen = model.generate(5, clusters="leukocyte")
    assert (gen.obs["moesim_cluster"] == "leukocyte").all() and gen.n_obs == 5
    with pytest.raises(TypeError, match=r"give \{cluster: n\} as n_cells"):
        model.generate(10, clusters={"leukocyte": 3})
    with pytest.raises(ValueError, match="Unknown cluster"):
        model.generate(10, clusters=3)


def test_library_sizes_come_from_the_clusters_real_cells(model):
    real = model._pass()
    gen = model.generate(400, seed=2, batch="F")
    assert (gen.obs["batch"] == "F").all()
    batch_names = list(model._batch_categories())
    for k in np.unique(gen.obs["moesim_expert"]):
        lib = gen.obs["library_size"].to_numpy()[gen.obs["moesim_expert"] == k]
        sel = real["expert"] == k
        in_batch = sel & (real["batch"] == batch_names.index("F"))
        ref = real["library"][in_batch] if in_batch.any() else real["library"][sel]
        assert lib.min() >= ref.min() * 0.999 and lib.max() <= ref.max() * 1.001
    # the sampled counts follow the drawn library sizes
    totals = np.asarray(gen.X.sum(1)).ravel()
    assert np.corrcoef(np.log1p(totals), np.log(gen.obs["library_size"]))[0, 1] > 0.8


def test_temperature_zero_decodes_the_centre(model):
    gen = model.generate({"leukocyte": 300}, temperature=0.0, seed=1, batch="M", latent="fitted")
    mean = gen.layers["mean"]
    profile = mean / mean.sum(1, keepdims=True)
    np.testing.assert_allclose(profile, profile[:1].repeat(len(profile), 0), rtol=1e-4, atol=1e-7)
    # counts are still sampled: their average matches the expected values
    np.testing.assert_allclose(gen.X.sum() / mean.sum(), 1.0, rtol=0.05)
    assert gen.X.max() > 0 and not np.allclose(gen.X.toarray(), mean)
    # numpy scalars are numbers too (a temperature taken from np.linspace, say)
    for t in (np.float32(0.5), np.float64(0.5), np.int64(1)):
        assert model.generate(3, temperature=t).uns["moesim_generate"]["temperature"] == float(t)
    for bad in (-1.0, float("nan"), True, np.bool_(True), "1", None):
        with pytest.raises(ValueError, match="temperature must be a non-negative"):
            model.generate(5, temperature=bad)


def test_latent_moments_streamed_and_shrunk():
    from scmoesim.model._latent import LatentMoments

    rng = np.random.default_rng(0)
    d = 3
    z = rng.normal(size=(40, d)) @ np.array([[2.0, 0, 0], [1.5, 0.5, 0], [0, 0, 0.2]]) + 5
    v = rng.uniform(0.1, 0.3, size=(40, d))
    expert = np.r_[np.zeros(30, int), np.ones(3, int), np.full(7, 3)]
    expert[-1] = 2  # expert 2 holds a single cell
    acc = LatentMoments(n_experts=4, n_latent=d)
    for part in (slice(0, 11), slice(11, 40)):  # two minibatches
        acc.add(expert[part], z[part], v[part])
    centres = np.arange(4 * d, dtype=float).reshape(4, d)
    loc, tril = acc.fit(centres)
    assert loc.dtype == np.float32 and loc.shape == (4, d) and tril.shape == (4, d, d)
    # expert 0: 30 cells > 3 dimensions, shrinkage 3/30 of the way to the diagonal
    cov = np.cov(z[:30].T) + np.diag(v[:30].mean(0))
    cov = 0.9 * cov + 0.1 * np.diag(np.diag(cov))
    np.testing.assert_allclose(loc[0], z[:30].mean(0), rtol=1e-6)
    np.testing.assert_allclose(tril[0] @ tril[0].T, cov, rtol=1e-5)
    assert abs(cov[0, 1]) > 0.3  # the correlated directions are kept (0.75 before shrinkage)
    # expert 1: 3 cells, not more than the dimensions: diagonal
    var = z[30:33].var(0, ddof=1) + v[30:33].mean(0)
    np.testing.assert_allclose(tril[1], np.diag(np.sqrt(var)), rtol=1e-5)
    # expert 3: six cells, half-way to the diagonal; expert 2 (one cell) keeps the prior
    cov3 = np.cov(z[33:39].T) + np.diag(v[33:39].mean(0))
    cov3 = 0.5 * cov3 + 0.5 * np.diag(np.diag(cov3))
    np.testing.assert_allclose(tril[3] @ tril[3].T, cov3, rtol=1e-5)
    np.testing.assert_array_equal(loc[2], centres[2])
    np.testing.assert_array_equal(tril[2], np.eye(d))
    acc_empty = LatentMoments(n_experts=2, n_latent=d)
    loc_e, tril_e = acc_empty.fit(centres[:2])
    np.testing.assert_array_equal(loc_e, centres[:2])
    np.testing.assert_array_equal(tril_e, np.tile(np.eye(d), (2, 1, 1)))


def test_latent_fitted_or_prior(model):
    # the largest cluster: an expert with fewer than two training cells keeps the prior
    name = model.expert_usage().idxmax()
    fitted = model.generate({name: 50}, temperature=0.0, seed=1, batch="M", latent="fitted")
    prior = model.generate({name: 50}, temperature=0.0, seed=1, batch="M", latent="prior")
    assert fitted.uns["moesim_generate"]["latent"] == "fitted"
    assert prior.uns["moesim_generate"]["latent"] == "prior"
    # temperature 0 decodes the centre: the fitted mean of the cluster's cells, not mu_k
    k = model.cluster_names_.index(name)
    assert not np.allclose(model.latent_loc_[k], model.module.centres[k].detach().numpy())
    f, p = (x / x.sum(1, keepdims=True) for x in (fitted.layers["mean"], prior.layers["mean"]))
    np.testing.assert_allclose(f, f[:1].repeat(len(f), 0), rtol=1e-4, atol=1e-7)
    assert not np.allclose(f[0], p[0], rtol=1e-3)
    with pytest.raises(ValueError, match="'fitted', 'posterior' or 'prior', got 'gmm'"):
        model.generate(5, latent="gmm")
    for bad in (np.array(["fitted"]), np.array(["fitted", "prior"]), None):
        with pytest.raises(ValueError, match="latent must be 'fitted', 'posterior' or 'prior'"):
            model.generate(5, latent=bad)


def test_posterior_sample_is_uniform_and_capped():
    from scmoesim.model._latent import PosteriorSample

    rng = np.random.default_rng(0)
    n, d = 60, 2
    expert = np.r_[np.zeros(40, int), np.full(17, 2), np.full(3, 1)]
    rng.shuffle(expert)
    z = rng.normal(size=(n, d)).astype(np.float32)  # as the model keeps them
    v = rng.uniform(0.1, 2.0, size=(n, d)).astype(np.float32)
    lib, batch = rng.integers(100, 1000, n).astype(float), rng.integers(0, 2, n)
    kept = np.zeros(n)
    for seed in range(300):
        acc = PosteriorSample(n_experts=3, per_expert=5, seed=seed)
        for part in np.array_split(np.arange(n), 7):  # seven minibatches, pruned on the way
            acc.add(expert[part], z[part], v[part], lib[part], batch[part])
            assert acc._buffered <= 2 * 5 * 3 + len(part)
        out = acc.result()
        rows = np.flatnonzero(np.isin(z[:, 0], out["loc"][:, 0]))
        kept[rows] += 1
        # the kept cells are whole rows of the input, in the data's order
        np.testing.assert_array_equal(out["loc"], z[rows])
        np.testing.assert_allclose(out["scale"], np.sqrt(v[rows]), rtol=1e-6)
        np.testing.assert_array_equal(out["library"], lib[rows].astype(np.float32))
        np.testing.assert_array_equal(out["batch"], batch[rows])
        np.testing.assert_array_equal(np.bincount(out["expert"], minlength=3), [5, 3, 5])
    # each cell is kept with probability min(1, 5 / cells of its expert)
    share = kept / 300
    np.testing.assert_array_equal(share[expert == 1], 1.0)
    for k, n_k in ((0, 40), (2, 17)):
        assert abs(share[expert == k].mean() - 5 / n_k) < 1e-9  # exactly 5 kept per run
        assert np.abs(share[expert == k] - 5 / n_k).max() < 0.11  # none favoured (4.5 sd)
    assert PosteriorSample(n_experts=2).result() is None
    no_lib = PosteriorSample(n_experts=1)
    no_lib.add(np.zeros(3, int), z[:3], v[:3])
    assert "library" not in no_lib.result()


def test_latent_posterior_starts_from_training_cells(model):
    cells = model.latent_cells_
    assert len(cells["expert"]) == model.adata.n_obs  # 240 cells, below the cap
    real = model._pass()
    np.testing.assert_allclose(cells["loc"], real["z"], atol=1e-5)
    gen = model.generate(200, latent="posterior", temperature=0.0, seed=0)
    assert gen.uns["moesim_generate"]["latent"] == "posterior"
    # at temperature 0 each cell decodes a training cell's posterior mean with its library:
    # the library sizes are those of training cells of the same expert and batch
    batch_names = list(model._batch_categories())
    for e, b, lib in zip(
        gen.obs["moesim_expert"], gen.obs["batch"], gen.obs["library_size"], strict=True
    ):
        same = (cells["expert"] == e) & (cells["batch"] == batch_names.index(b))
        assert np.isclose(cells["library"][same], lib, rtol=1e-6).any()
    profile = gen.layers["mean"] / gen.layers["mean"].sum(1, keepdims=True)
    assert len(np.unique(profile.round(5), axis=0)) > 20  # many starting cells, not one centre
    # with a batch the cells come from that batch where the expert has some
    only_f = model.generate(100, latent="posterior", seed=1, batch="F")
    assert (only_f.obs["batch"] == "F").all()
    for e, lib in zip(only_f.obs["moesim_expert"], only_f.obs["library_size"], strict=True):
        in_f = (cells["expert"] == e) & (cells["batch"] == batch_names.index("F"))
        if in_f.any():
            assert np.isclose(cells["library"][in_f], lib, rtol=1e-6).any()
    a = model.generate(50, latent="posterior", seed=2)
    b = model.generate(50, latent="posterior", seed=2)
    assert (a.X != b.X).nnz == 0


def test_latent_posterior_errors(model, monkeypatch):
    cells = model.latent_cells_
    without_0 = {key: value[cells["expert"] != 0] for key, value in cells.items()}
    monkeypatch.setattr(model, "latent_cells_", without_0)
    name, other = model.cluster_names_[0], model.cluster_names_[1]
    with pytest.raises(ValueError, match=rf"Cluster '{name}' \(expert 0\) kept no"):
        model.generate({name: 3, other: 2}, latent="posterior")
    assert model.generate({other: 2}, latent="posterior").n_obs == 2


def test_model_without_cell_sample_falls_back_to_the_fitted_latent(model, monkeypatch):
    monkeypatch.setattr(model, "latent_cells_", None)
    with pytest.warns(UserWarning, match="no sample of its training cells"):
        old = model.generate(40, seed=3)
    fitted = model.generate(40, seed=3, latent="fitted")
    assert old.uns["moesim_generate"]["latent"] == "fitted"
    assert (old.X != fitted.X).nnz == 0


def test_model_without_fitted_latent_falls_back_to_the_prior(model, monkeypatch):
    monkeypatch.setattr(model, "latent_loc_", None)
    with pytest.warns(UserWarning, match="no fitted latent distributions"):
        old = model.generate(40, seed=3, latent="fitted")
    prior = model.generate(40, seed=3, latent="prior")
    assert old.uns["moesim_generate"]["latent"] == "prior"
    assert (old.X != prior.X).nnz == 0


def test_seed_chunks_and_store_mean(model):
    a = model.generate(300, seed=4, chunk_size=64)
    b = model.generate(300, seed=4, chunk_size=64, store_mean=False)
    assert (a.X != b.X).nnz == 0 and "mean" not in b.layers
    assert sparse.isspmatrix_csr(a.X) and a.X.dtype == np.int32
    c = model.generate(300, seed=5, chunk_size=64)
    assert (a.X != c.X).nnz > 0
    d = model.generate(300, seed=4, chunk_size=1000)  # one chunk: other draws, same layout
    np.testing.assert_array_equal(a.obs["moesim_expert"], d.obs["moesim_expert"])
    np.testing.assert_array_equal(a.obs["library_size"], d.obs["library_size"])
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        model.generate(5, chunk_size=0)


def test_freed_chunk_memory_is_released_every_so_many_cells(model, monkeypatch):
    """Not after every chunk (page faults on the next chunk's buffers), but periodically."""
    from scmoesim.model import _generate

    calls = []
    monkeypatch.setattr(_generate, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(_generate, "_RELEASE_EVERY_CELLS", 100)
    model.generate(330, seed=0, chunk_size=40)  # 9 chunks; past 100 cells at 120, 240
    assert len(calls) == 2
    calls.clear()
    model.generate(330, seed=0, chunk_size=200)  # every chunk reaches the count
    assert len(calls) == 2


def test_filename_writes_backed_h5ad(model, tmp_path):
    path = tmp_path / "gen.h5ad"
    mem = model.generate(250, seed=6, chunk_size=64)
    disk = model.generate(250, seed=6, chunk_size=64, filename=path)
    assert disk.isbacked and "mean" not in disk.layers  # store_mean defaults to off on disk
    assert (disk.X.to_memory() != mem.X).nnz == 0
    back = ad.read_h5ad(path)
    assert (back.X != mem.X).nnz == 0
    assert back.obs.equals(mem.obs) and back.var_names.equals(mem.var_names)
    assert back.uns["moesim_generate"]["seed"] == 6
    with_mean = model.generate(
        250, seed=6, chunk_size=64, filename=tmp_path / "m.h5ad", store_mean=True, progress_bar=True
    )
    np.testing.assert_array_equal(with_mean.layers["mean"], mem.layers["mean"])
    with pytest.raises(FileExistsError, match="exists"):
        model.generate(5, filename=path)
    with pytest.raises(ValueError, match="must end in .h5ad"):
        model.generate(5, filename=tmp_path / "gen.csv")
    empty = model.generate(0, filename=tmp_path / "empty.h5ad", seed=None)
    assert empty.shape == (0, mem.n_vars)


def test_merged_cluster_cells_and_record_are_grouped_by_cluster(model, monkeypatch):
    """Experts 0 and 2 share a name (as merge_clusters leaves them): their cells come together,
    and uns, read by the command line's summary, counts clusters, not experts."""
    names = list(model.cluster_names_)
    merged = [names[0], names[1], names[0], names[3]]
    monkeypatch.setattr(model, "cluster_names_", merged)
    gen = model.generate({names[1]: 5, names[0]: 12, names[3]: 4}, seed=0)
    got = gen.obs["moesim_cluster"].astype(str).to_numpy()
    expected = [names[0]] * 12 + [names[1]] * 5 + [names[3]] * 4
    np.testing.assert_array_equal(got, expected)
    experts = gen.obs["moesim_expert"].to_numpy()
    assert set(experts[:12]) <= {0, 2} and (np.diff(experts[:12]) >= 0).all()
    assert (experts[12:17] == 1).all() and (experts[17:] == 3).all()
    record = gen.uns["moesim_generate"]
    assert record["clusters"] == [names[0], names[1], names[3]]
    np.testing.assert_array_equal(record["n_cells"], [12, 5, 4])
    assert record["proportions"] == "n_cells" and record["batch"] == "drawn"
    # clusters given no cells are left out of the record
    gen = model.generate({names[0]: 0, names[3]: 2}, seed=0)
    assert gen.uns["moesim_generate"]["clusters"] == [names[3]]


def test_generate_needs_a_trained_model(kidney_full):
    adata = kidney_full[:60, :50].copy()
    MoESim.setup_anndata(adata, layer="counts")
    fresh = MoESim(adata, n_experts=3)
    with pytest.raises(RuntimeError, match=r"Train the model \(model.train\(\)\) before"):
        fresh.generate(10)


def test_no_cells_write_an_empty_file_for_every_kind(model, tmp_path):
    """An empty dense dataset cannot be chunked: it used to fail, leaving the file behind."""
    empty = model.generate(0, filename=tmp_path / "mean.h5ad", store_mean=True)
    assert empty.shape == (0, model.adata.n_vars) and empty.layers["mean"].shape == empty.shape
    assert ad.read_h5ad(tmp_path / "mean.h5ad").shape == empty.shape


def test_failed_write_leaves_no_file(model, tmp_path, monkeypatch):
    calls = []
    original = model.module.sample_from_experts

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(model.module, "sample_from_experts", failing)
    path = tmp_path / "partial.h5ad"
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(100, chunk_size=40, filename=path)
    assert not path.exists()
    # nor does a failure while the file is being laid out, before the first chunk
    from scmoesim.model import _generate

    def no_dataset(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_generate, "_dense_dataset", no_dataset)
    with pytest.raises(OSError, match="disk full"):
        model.generate(10, filename=path, store_mean=True)
    assert not path.exists()


def test_dense_likelihood_generates_float_and_writes(pbmc, tmp_path):
    small = pbmc[:200].copy()
    MoESim.setup_anndata(small, signatures={"B": ["CD79A", "MS4A1"], "NK": ["NKG7", "GNLY"]})
    model = MoESim(small, likelihood="normal")
    model.train(**{**TRAIN, "max_epochs": 1})
    mem = model.generate(90, seed=0, chunk_size=32)
    assert mem.X.dtype == np.float32 and not sparse.issparse(mem.X)
    assert "library_size" not in mem.obs
    disk = model.generate(90, seed=0, chunk_size=32, filename=tmp_path / "n.h5ad")
    np.testing.assert_array_equal(np.asarray(disk.X[:]), mem.X)
    assert mem.uns["moesim_generate"]["batch"] == "none"  # no batch covariate registered
    empty = model.generate(0, filename=tmp_path / "empty.h5ad")
    assert empty.shape == (0, small.n_vars) and ad.read_h5ad(tmp_path / "empty.h5ad").n_obs == 0
