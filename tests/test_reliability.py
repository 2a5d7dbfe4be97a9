"""Bad input fails early and clearly; the user's AnnData is never changed beyond documented keys.

Every case of issue 8's bad-input list is a row below: an error (type and message naming the
problem) raised by ``setup_anndata``, ``MoESim()``, ``train`` (before any step) or
``generate``; or a documented warning. Then one test, parametrised over every public entry
point, deep-compares the AnnData before and after.
"""

import copy
import hashlib
import warnings

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse

import scmoesim
from scmoesim import MoESim, cli

matplotlib.use("Agg")

N_CELLS, N_GENES = 90, 24
SIGS = {"A": ["g0", "g1"], "B": ["g2", "g3"]}
ONE_EPOCH = {"max_epochs": 1, "enable_progress_bar": False, "batch_size": 32}


def make_adata(seed: int = 0) -> ad.AnnData:
    """Synthetic counts: three groups of 30 cells, each high in its own marker genes."""
    rng = np.random.default_rng(seed)
    group = np.repeat([0, 1, 2], N_CELLS // 3)
    rate = np.full((N_CELLS, N_GENES), 2.0)
    for k in range(3):
        rate[group == k, 2 * k : 2 * k + 2] = 20.0
    counts = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame(
        {
            "ct": pd.Categorical(np.array(["a", "b", "c"])[group]),
            "batch": pd.Categorical(np.where(np.arange(N_CELLS) % 2, "x", "y")),
            "score": rng.normal(size=N_CELLS),
        },
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(
        X=np.log1p(counts),
        obs=obs,
        var=pd.DataFrame({"kind": ["gene"] * N_GENES}, index=[f"g{j}" for j in range(N_GENES)]),
    )
    adata.layers["counts"] = sparse.csr_matrix(counts)
    adata.obsm["X_pca"] = rng.normal(size=(N_CELLS, 4)).astype(np.float32)
    adata.varm["loadings"] = rng.normal(size=(N_GENES, 2))
    adata.obsp["connectivities"] = sparse.random(
        N_CELLS, N_CELLS, density=0.05, random_state=0, format="csr"
    )
    adata.uns["note"] = {"kept": np.arange(3), "name": "original"}
    return adata


@pytest.fixture
def adata():
    return make_adata()


# ---------------------------------------------------------------- bad input: errors
def _set(where, key, value):
    def change(a):
        getattr(a, where)[key] = value

    return change


def _x_value(value, layer=False):
    def change(a):
        if layer:
            x = a.layers["counts"].copy()
            x.data[0] = value
            a.layers["counts"] = x
        else:
            a.X[1, 2] = value

    return change


def _labels(values):
    return lambda a: a.obs.__setitem__("lab", values)


SETUP_ERRORS = {
    "nan-dense-X": (_x_value(np.nan), {}, ValueError, r"adata.X contains NaN or infinite"),
    "inf-sparse-layer": (
        _x_value(np.inf, layer=True),
        {"layer": "counts"},
        ValueError,
        r"adata.layers\['counts'\] contains NaN or infinite",
    ),
    "no-cells": (lambda a: a[:0].copy(), {}, ValueError, r"adata is empty \(0 cells x 24 genes\)"),
    "no-genes": (lambda a: a[:, :0].copy(), {}, ValueError, r"empty \(90 cells x 0 genes\)"),
    "bool-X": (
        lambda a: setattr(a, "X", a.X > 1),
        {},
        TypeError,
        "must be numeric, got dtype bool",
    ),
    "missing-layer": (None, {"layer": "raw"}, KeyError, r"layer 'raw' not found in adata.layers"),
    "missing-batch-key": (None, {"batch_key": "donor"}, KeyError, "batch_key 'donor' not found"),
    "missing-labels-key": (None, {"labels_key": "cell"}, KeyError, "labels_key 'cell' not found"),
    "missing-obsm-key": (None, {"embedding_key": "X_umap"}, KeyError, "'X_umap' not found"),
    "nan-embedding": (
        lambda a: a.obsm["X_pca"].__setitem__((0, 0), np.nan),
        {"embedding_key": "X_pca"},
        ValueError,
        r"adata.obsm\['X_pca'\] contains NaN",
    ),
    "sparse-embedding": (
        lambda a: a.obsm.__setitem__("X_pca", sparse.csr_matrix(a.obsm["X_pca"])),
        {"embedding_key": "X_pca"},
        TypeError,
        r"adata.obsm\['X_pca'\] is a sparse matrix; the kNN similarity needs a dense",
    ),
    "nan-batch": (
        lambda a: a.obs.__setitem__("batch", a.obs["batch"].astype(object).where(a.obs.score > 0)),
        {"batch_key": "batch"},
        ValueError,
        r"adata.obs\['batch'\] has \d+ missing value\(s\) \(NaN\)",
    ),
    "labels-all-unlabeled": (
        _labels(["unknown"] * N_CELLS),
        {"labels_key": "lab"},
        ValueError,
        "has no labelled cell",
    ),
    "labels-all-nan": (
        _labels([np.nan] * N_CELLS),
        {"labels_key": "lab"},
        ValueError,
        "has no labelled cell",
    ),
    "signature-unknown-gene": (
        None,
        {"signatures": {"A": ["g0", "Nope"]}},
        ValueError,
        "not found in adata.var_names: A: Nope",
    ),
    "signature-empty-genes": (None, {"signatures": {"A": []}}, ValueError, "'A' has no marker"),
    "signatures-empty": (None, {"signatures": {}}, ValueError, "signatures is empty"),
    "signature-duplicate-names": (
        None,
        {"signatures": {1: ["g0"], "1": ["g1"]}},
        ValueError,
        "Duplicate signature name '1'",
    ),
    "signatures-not-a-dict": (None, {"signatures": ["g0"]}, ValueError, "must be a dict"),
    "duplicate-var-names": (
        lambda a: setattr(a, "var_names", ["g0"] * 2 + list(a.var_names[2:])),
        {},
        ValueError,
        r"adata.var_names are not unique \(e.g. \['g0'\]\)",
    ),
    "duplicate-obs-names": (
        lambda a: setattr(a, "obs_names", ["c"] * N_CELLS),
        {},
        ValueError,
        "adata.obs_names are not unique",
    ),
}


@pytest.mark.parametrize(
    ("change", "setup", "error", "message"), SETUP_ERRORS.values(), ids=SETUP_ERRORS.keys()
)
def test_setup_rejects_bad_input(adata, change, setup, error, message):
    if change is not None:
        changed = change(adata)
        adata = changed if changed is not None else adata
    before = adata.copy()
    with pytest.raises(error, match=message):
        MoESim.setup_anndata(adata, **setup)
    assert_unchanged(before, adata)  # nothing half-registered


def test_setup_rejects_non_anndata():
    with pytest.raises(TypeError, match="Expected an AnnData object, got DataFrame"):
        MoESim.setup_anndata(pd.DataFrame({"a": [1]}))


INIT_ERRORS = {
    "negative-counts": (
        _x_value(-1.0, layer=True),
        {"layer": "counts"},
        {},
        r"adata.layers\['counts'\] has negative values, but likelihood='nb'",
    ),
    "non-integer-nb": (None, {}, {}, r"adata.X has non-integer values, but likelihood='nb'"),
    "non-integer-zinb": (None, {}, {"likelihood": "zinb"}, "non-integer values"),
    "non-integer-poisson": (None, {}, {"likelihood": "poisson"}, "non-integer values"),
    "bernoulli-out-of-range": (
        None,
        {"layer": "counts"},
        {"likelihood": "bernoulli"},
        r"needs data scaled to \[0, 1\]",
    ),
    "fewer-experts-than-signatures": (
        None,
        {"layer": "counts", "signatures": SIGS},
        {"n_experts": 1},
        r"n_experts=1 is smaller than the number of signatures \(2\)",
    ),
    "fewer-experts-than-labels": (
        None,
        {"layer": "counts", "labels_key": "ct"},
        {"n_experts": 2},
        r"n_experts=2 is smaller than the number of label classes \(3\)",
    ),
    "zero-experts": (None, {"layer": "counts"}, {"n_experts": 0}, "positive integer, got 0"),
    "float-experts": (None, {"layer": "counts"}, {"n_experts": 2.5}, "positive integer, got 2.5"),
    "likelihood-typo": (None, {"layer": "counts"}, {"likelihood": "negbin"}, "likelihood must"),
    "metric-typo": (None, {"layer": "counts"}, {"knn_metric": "manhattan"}, "knn_metric must"),
    "negative-kl-weight": (
        None,
        {"layer": "counts"},
        {"kl_weight": -1},
        r"kl_weight must be a finite number >= 0, got -1",
    ),
    "nan-anchor-weight": (
        None,
        {"layer": "counts"},
        {"anchor_weight": float("nan")},
        "anchor_weight must be a finite",
    ),
    "negative-clustering-weight": (
        None,
        {"layer": "counts"},
        {"clustering_weight": -0.5},
        "clustering_weight must",
    ),
    "string-depict-weight": (
        None,
        {"layer": "counts"},
        {"depict_weight": "1"},
        "depict_weight must",
    ),
    "zero-latent": (
        None,
        {"layer": "counts"},
        {"n_latent": 0},
        r"n_latent must be a positive integer, got 0",
    ),
    "float-hidden": (
        None,
        {"layer": "counts"},
        {"n_hidden": 64.0},
        "n_hidden must be a positive integer",
    ),
    "dropout-one": (
        None,
        {"layer": "counts"},
        {"gate_dropout": 1.0},
        r"gate_dropout must be a number in \[0, 1\)",
    ),
    "decay-above-one": (None, {"layer": "counts"}, {"centre_decay": 1.5}, "centre_decay must"),
    "zero-neighbours": (
        None,
        {"layer": "counts"},
        {"knn_neighbors": 0},
        "knn_neighbors must be a positive",
    ),
    "negative-threshold": (
        None,
        {"layer": "counts"},
        {"knn_threshold": -1.0},
        "knn_threshold must be None or a number > 0",
    ),
    **{
        f"resolution-{value!r}": (
            None,
            {"layer": "counts", "embedding_key": "X_pca"},
            {"similarity_resolution": value},
            rf"similarity_resolution must be a positive number, 'paper' or 'half', got {value!r}",
        )
        for value in (0.0, -1.0, float("nan"), float("inf"), True, "leiden")
    },
}


@pytest.mark.parametrize(
    ("change", "setup", "model_kwargs", "message"),
    INIT_ERRORS.values(),
    ids=INIT_ERRORS.keys(),
)
def test_model_rejects_bad_input(adata, change, setup, model_kwargs, message):
    if change is not None:
        change(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        MoESim.setup_anndata(adata, **setup)
        with pytest.raises(ValueError, match=message):
            MoESim(adata, **model_kwargs)


TRAIN_ERRORS = {
    "plan-kwargs-typo": ({"plan_kwargs": {"weight_decy": 0.1}}, TypeError, r"\['weight_decy'\]"),
    "plan-kwargs-not-a-dict": (
        {"plan_kwargs": ["lr", 0.1]},
        TypeError,
        r"plan_kwargs must be a dict of keyword arguments, got \['lr', 0.1\]",
    ),
    "datasplitter-kwargs-not-a-dict": (
        {"datasplitter_kwargs": False},
        TypeError,
        "datasplitter_kwargs must be a dict of keyword arguments, got False",
    ),
    "datasplitter-kwargs-non-string-key": (
        {"datasplitter_kwargs": {1: True}},
        TypeError,
        r"datasplitter_kwargs keys must be argument names \(strings\), got \[1\]",
    ),
    "batch-size-1": ({"batch_size": 1}, ValueError, "batch_size must be an integer >= 2"),
    "checkpoint-every-0": (
        {"checkpoint_dir": "unused", "checkpoint_every_n_epochs": 0},
        ValueError,
        "checkpoint_every_n_epochs must be >= 1",
    ),
    "no-checkpoint": ({"ckpt_path": "missing.ckpt"}, FileNotFoundError, "No checkpoint at"),
    "similarity-warmup-negative": (
        {"plan_kwargs": {"n_epochs_similarity_warmup": -1}},
        ValueError,
        "n_epochs_similarity_warmup must be a non-negative integer, got -1",
    ),
    # values scvi-tools or Lightning would only refuse once training had begun
    "scheduler-metric-typo": (
        {"plan_kwargs": {"reduce_lr_on_plateau": True, "lr_scheduler_metric": "elbo_validaton"}},
        ValueError,
        r"lr_scheduler_metric must be a logged validation metric, .*'similarity_loss_validation'",
    ),
    "negative-lr": ({"lr": -1.0}, ValueError, "lr must be a positive finite number, got -1.0"),
    "nan-lr-in-plan": (
        {"plan_kwargs": {"lr": float("nan")}},
        ValueError,
        "lr must be a positive finite number, got nan",
    ),
    "negative-weight-decay": (
        {"plan_kwargs": {"weight_decay": -1}},
        ValueError,
        "weight_decay must be a non-negative finite number",
    ),
    "optimizer-lowercase": (
        {"plan_kwargs": {"optimizer": "adam"}},
        ValueError,
        r"optimizer must be one of \['Adam', 'AdamW', 'Custom'\], got 'adam'",
    ),
    "custom-optimizer-without-creator": (
        {"plan_kwargs": {"optimizer": "Custom"}},
        ValueError,
        "optimizer='Custom' needs an optimizer_creator",
    ),
    "kl-warmup-negative": (
        {"plan_kwargs": {"n_epochs_kl_warmup": -3}},
        ValueError,
        "n_epochs_kl_warmup must be a non-negative integer, got -3",
    ),
    "kl-warmup-string": (
        {"plan_kwargs": {"n_epochs_kl_warmup": "2"}},
        ValueError,
        "n_epochs_kl_warmup must be a non-negative integer, got '2'",
    ),
    "no-logging": (
        {"plan_kwargs": {"on_step": False, "on_epoch": False}},
        ValueError,
        "would log no loss at all",
    ),
    "mixed-precision": (
        {"precision": "bf16-mixed"},
        ValueError,
        r"precision='bf16-mixed' is not supported",
    ),
    "similarity-warmup-fraction": (
        {"plan_kwargs": {"n_epochs_similarity_warmup": 0.25}},
        ValueError,
        "n_epochs_similarity_warmup must be a non-negative integer, got 0.25",
    ),
}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"), TRAIN_ERRORS.values(), ids=TRAIN_ERRORS.keys()
)
def test_train_rejects_bad_arguments_before_any_step(adata, kwargs, error, message, tmp_path):
    MoESim.setup_anndata(adata, layer="counts", signatures=SIGS)
    model = MoESim(adata)
    kwargs = {k: (tmp_path / v if k == "checkpoint_dir" else v) for k, v in kwargs.items()}
    with pytest.raises(error, match=message):
        model.train(**{**ONE_EPOCH, **kwargs})
    assert not model.is_trained_ and model.history_ is None
    assert not (tmp_path / "unused").exists()


def test_plan_values_accept_numpy_integers_and_logged_metrics(adata):
    from scmoesim.train import check_plan_values

    for metric in ("validation_loss", "kl_global_validation", "similarity_loss_validation"):
        check_plan_values({"lr_scheduler_metric": metric})
    check_plan_values({"n_steps_kl_warmup": np.int64(4), "lr_patience": np.int32(3)})
    MoESim.setup_anndata(adata, layer="counts", signatures=SIGS)
    model = MoESim(adata)
    model.train(**ONE_EPOCH, plan_kwargs={"n_epochs_kl_warmup": np.int64(2)})
    assert model.is_trained_


@pytest.mark.parametrize("precision", [32, "32", "32-true", None])
def test_train_accepts_full_precision(adata, precision):
    MoESim.setup_anndata(adata, layer="counts", signatures=SIGS)
    model = MoESim(adata)
    model.train(**ONE_EPOCH, precision=precision)
    assert model.is_trained_


def test_too_few_cells_to_train(adata):
    tiny = adata[:2].copy()
    MoESim.setup_anndata(tiny, layer="counts", signatures=SIGS)
    with pytest.raises(ValueError, match=r"at least 3 cells in the training split; got 2 cell"):
        MoESim(tiny).train(**ONE_EPOCH)


@pytest.mark.parametrize(
    ("kwargs", "sizes"),
    [
        # 81 training cells (90%): two minibatches of 32, the 17 left over are dropped
        ({"batch_size": 32}, [32] * 4),
        # a training split smaller than batch_size is one minibatch of all its cells
        ({"batch_size": 500}, [81] * 2),
        ({"batch_size": 32, "datasplitter_kwargs": {"drop_last": False}}, [32, 32, 17] * 2),
    ],
)
def test_training_minibatches_are_full(adata, kwargs, sizes):
    """A few left-over cells would get a similarity of their own (k neighbours among them)."""
    MoESim.setup_anndata(adata, layer="counts", embedding_key="X_pca")
    model = MoESim(adata, n_experts=3, n_latent=4)
    seen = []
    loss = model.module.loss

    def recording_loss(tensors, *args, **kwargs):
        if model.module.training:
            seen.append(tensors["X"].shape[0])
        return loss(tensors, *args, **kwargs)

    model.module.loss = recording_loss
    model.train(max_epochs=2, enable_progress_bar=False, **kwargs)
    assert sorted(seen) == sorted(sizes)


def _no_step_warnings(record) -> list:
    return [w for w in record if "No training step ran" in str(w.message)]


def test_train_warns_when_no_step_ran(adata):
    MoESim.setup_anndata(adata, layer="counts", embedding_key="X_pca")
    model = MoESim(adata, n_experts=3, n_latent=4)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.warns(UserWarning, match="No training step ran: this call left the weights"):
        model.train(max_epochs=1, limit_train_batches=0, enable_progress_bar=False)
    after = model.module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not model.is_trained_  # an untrained model stays untrained
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.train(max_epochs=1, enable_progress_bar=False)
    assert not _no_step_warnings(record)
    assert model.is_trained_ and len(model.history["elbo_train"]) == 1
    # a second call that runs no step warns too, although the history holds the first one's
    with pytest.warns(UserWarning, match="No training step ran"):
        model.train(max_epochs=1, limit_train_batches=0, enable_progress_bar=False)


def test_train_without_scvi_tools_logger_counts_as_trained(adata, tmp_path):
    """``model.history`` stays empty with ``logger=False`` or a Lightning logger of the user's:
    the steps that ran still make a trained model, named and summarised afresh."""
    from lightning.pytorch.loggers import CSVLogger

    MoESim.setup_anndata(adata, layer="counts", labels_key="ct")
    model = MoESim(adata, n_experts=4, n_latent=4)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.train(max_epochs=2, batch_size=32, logger=False, enable_progress_bar=False)
    assert not _no_step_warnings(record)
    assert model.is_trained_
    after = model.module.state_dict()
    assert not all(torch.equal(v, after[k]) for k, v in before.items())
    assert {"a", "b", "c"} & set(model.cluster_names_)  # named after the label classes
    assert model.get_latent_representation().shape == (adata.n_obs, 4)
    # a further training with the user's logger refreshes the summary of the training cells
    model.expert_usage_ = np.zeros_like(model.expert_usage_)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.train(
            max_epochs=1, batch_size=32, logger=CSVLogger(tmp_path), enable_progress_bar=False
        )
    assert not _no_step_warnings(record)
    assert model.expert_usage_.sum() == adata.n_obs


@pytest.mark.parametrize(
    ("devices", "num_nodes", "expected"),
    [
        (2, 1, 2),
        ([0, 1, 2], 1, 3),
        ("2", 1, 2),
        ("0,1", 1, 2),
        ("0,", 1, 1),
        (2, 3, 6),
        ("auto", 1, 1),
        (-1, 1, 1),
        (True, 1, 1),
    ],
)
def test_processes_from_devices(devices, num_nodes, expected):
    from scmoesim.model._validate import n_processes

    assert n_processes(devices, num_nodes) == expected


@pytest.fixture(scope="module")
def trained_model():
    adata = make_adata()
    scvi.settings.seed = 0
    MoESim.setup_anndata(
        adata, layer="counts", labels_key="ct", embedding_key="X_pca", batch_key="batch"
    )
    model = MoESim(adata, n_experts=4, n_latent=4)
    model.train(max_epochs=2, enable_progress_bar=False, batch_size=32)
    return model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_cells": 5, "clusters": ["liver"]}, r"Unknown cluster\(s\) \['liver'\]; the model's"),
        ({"n_cells": {"a": 2, "liver": 3}}, r"Unknown cluster\(s\) \['liver'\]"),
        ({"n_cells": -1}, "non-negative integers, got -1"),
        ({"n_cells": 5, "temperature": -1.0}, "temperature must be a non-negative"),
        ({"n_cells": 5, "batch": "z"}, "Unknown batch 'z'"),
    ],
    ids=["unknown-cluster", "unknown-cluster-dict", "negative-n", "temperature", "batch"],
)
def test_generate_rejects_bad_requests(trained_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trained_model.generate(**kwargs)


# ---------------------------------------------------------------- bad input: documented warnings
def _zero_cells(a):
    x = a.layers["counts"].tolil()
    x[:4] = 0
    a.layers["counts"] = x.tocsr()


def _zero_gene(a):
    x = a.layers["counts"].tocsc()
    x[:, 5] = 0
    a.layers["counts"] = x.tocsr()


WARNINGS = {
    "single-label-class": (_labels(["a"] * 10 + ["unknown"] * 80), {"labels_key": "lab"}, "single"),
    "overlapping-signature-genes": (
        None,
        {"signatures": {"A": ["g0", "g1"], "B": ["g1", "g2"]}},
        "Gene 'g1' is a marker of both 'A' and 'B'",
    ),
    "all-zero-cells": (_zero_cells, {}, r"4 cells that are 0 everywhere \(e.g. \['cell0'"),
    "all-zero-genes": (_zero_gene, {}, r"1 genes that are 0 everywhere \(e.g. \['g5'\]\)"),
}


@pytest.mark.parametrize(("change", "setup", "message"), WARNINGS.values(), ids=WARNINGS.keys())
def test_documented_warnings_and_training_still_works(adata, change, setup, message):
    if change is not None:
        change(adata)
    with pytest.warns(UserWarning, match=message):
        MoESim.setup_anndata(adata, layer="counts", **setup)
    model = MoESim(adata)
    model.train(**ONE_EPOCH)
    assert np.isfinite(model.get_latent_representation()).all()


def test_no_similarity_source_warns(adata):
    MoESim.setup_anndata(adata, layer="counts")
    with pytest.warns(UserWarning, match="No similarity source registered"):
        MoESim(adata)


@pytest.mark.parametrize(
    ("n_dims", "metric", "warns"),
    [
        (2, "correlation", True),
        (3, "correlation", False),
        (1, "cosine", True),
        (2, "cosine", False),
        (2, "euclidean", False),
    ],
)
def test_degenerate_knn_metric_warns(adata, n_dims, metric, warns):
    adata.obsm["emb"] = np.random.default_rng(0).normal(size=(adata.n_obs, n_dims))
    MoESim.setup_anndata(adata, layer="counts", embedding_key="emb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MoESim(adata, knn_metric=metric)
    hits = [w for w in caught if "only distances 0 or 2" in str(w.message)]
    assert bool(hits) == warns


# ---------------------------------------------------------------- labels that need care
def test_unused_categories_nan_and_unknown_labels(adata):
    lab = adata.obs["ct"].astype(str).to_numpy(dtype=object)
    lab[:5] = np.nan
    lab[5:10] = "unknown"
    adata.obs["lab"] = pd.Categorical(lab, categories=["ghost", "a", "b", "c", "unknown"])
    MoESim.setup_anndata(adata, layer="counts", labels_key="lab")
    codes = adata.obs["_scvi_labels"].to_numpy()
    assert (codes[:10] == -1).all() and (codes[10:] >= 0).all()
    model = MoESim(adata)
    assert model._class_names() == ["a", "b", "c"]  # "ghost" has no cell: dropped
    assert model.module.n_experts == 4
    assert "ghost" not in model.cluster_names_


def test_numeric_labels_with_nan(adata):
    adata.obs["lab"] = np.where(np.arange(N_CELLS) < 10, np.nan, np.repeat([0.0, 1.0, 2.0], 30))
    MoESim.setup_anndata(adata, layer="counts", labels_key="lab", unlabeled_category=-1)
    assert (adata.obs["_scvi_labels"].to_numpy()[:10] == -1).all()
    assert MoESim(adata).module.n_experts == 4


def test_duplicate_genes_within_a_signature_are_merged(adata):
    MoESim.setup_anndata(adata, layer="counts", signatures={"A": ["g0", "g0", "g1"], "B": "g2"})
    model = MoESim(adata)
    setup = model.adata_manager.registry["setup_args"]
    assert setup["signatures"] == {"A": ["g0", "g1"], "B": ["g2"]}
    assert model.module.signature_scorer.weights.shape == (2, 3)


# ---------------------------------------------------------------- storage formats
def _as(fmt, x):
    dense = x.toarray()
    return {
        "csr-float32": sparse.csr_matrix(dense.astype(np.float32)),
        "csc-float64": sparse.csc_matrix(dense.astype(np.float64)),
        "dense-float32": dense.astype(np.float32),
        "dense-int64": dense.astype(np.int64),
        "csr-int32": sparse.csr_matrix(dense.astype(np.int32)),
    }[fmt]


@pytest.fixture(scope="module")
def reference_latent():
    adata = make_adata()
    scvi.settings.seed = 1
    MoESim.setup_anndata(adata, layer="counts", signatures=SIGS)
    model = MoESim(adata)
    model.train(**ONE_EPOCH)
    return model.get_latent_representation(), np.asarray(model.predict())


@pytest.mark.parametrize(
    "fmt", ["csr-float32", "csc-float64", "dense-float32", "dense-int64", "csr-int32"]
)
def test_storage_format_does_not_change_the_result(adata, fmt, reference_latent):
    adata.layers["counts"] = _as(fmt, adata.layers["counts"])
    scvi.settings.seed = 1
    MoESim.setup_anndata(adata, layer="counts", signatures=SIGS)
    model = MoESim(adata)
    model.train(**ONE_EPOCH)
    latent, clusters = reference_latent
    np.testing.assert_array_equal(model.get_latent_representation(), latent)
    np.testing.assert_array_equal(np.asarray(model.predict()), clusters)


# ---------------------------------------------------------------- nothing changed
REGISTRATION_OBS = {"_scvi_batch", "_scvi_labels"}
REGISTRATION_UNS = {"_scvi_uuid", "_scvi_manager_uuid"}
ANNOTATE_KEYS = {
    "obs": {"moesim_cluster"},
    "obsm": {"X_moesim", "moesim_proba"},
    "uns": {"moesim"},
}


def _same(a, b, where: str) -> None:
    assert type(a) is type(b), f"{where}: type {type(a).__name__} -> {type(b).__name__}"
    if sparse.issparse(a):
        assert a.format == b.format and a.dtype == b.dtype and a.shape == b.shape, where
        assert (a != b).nnz == 0, where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} -> {b.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} -> {sorted(b)}"
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    else:
        assert a == b, where


def assert_unchanged(before: ad.AnnData, after: ad.AnnData, allowed=None) -> None:
    """Deep comparison of every AnnData slot, dtypes included, except ``allowed`` keys."""
    allowed = {k: set(v) for k, v in (allowed or {}).items()}
    assert after.obs_names.equals(before.obs_names) and after.var_names.equals(before.var_names)
    _same(before.X, after.X, "X")
    for slot in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
        skip = allowed.get(slot, set())
        b = {k: v for k, v in getattr(before, slot).items() if k not in skip}
        a = {k: v for k, v in getattr(after, slot).items() if k not in skip}
        _same(b, a, slot)
    for slot in ("obs", "var"):
        skip = allowed.get(slot, set())
        b, a = getattr(before, slot), getattr(after, slot)
        _same(
            b.drop(columns=[c for c in b if c in skip]),
            a.drop(columns=[c for c in a if c in skip]),
            slot,
        )


def _registration(extra=None):
    out = {"obs": set(REGISTRATION_OBS), "uns": set(REGISTRATION_UNS)}
    for k, v in (extra or {}).items():
        out.setdefault(k, set()).update(v)
    return out


def _setup(a, m, tmp):
    MoESim.setup_anndata(a, layer="counts", labels_key="ct", embedding_key="X_pca")


def _init(a, m, tmp):
    MoESim(a, n_experts=4)


def _train(a, m, tmp):
    m.train(**ONE_EPOCH)


def _query(a):
    """An unregistered copy of the training cells, as a user maps new data."""
    q = a.copy()
    q.obs = q.obs.drop(columns=sorted(REGISTRATION_OBS), errors="ignore")
    for key in REGISTRATION_UNS:
        q.uns.pop(key, None)
    return q


def _save_load(a, m, tmp):
    m.save(tmp / "model")
    MoESim.load(tmp / "model", adata=a)


def _pl(fn):
    def call(a, m, tmp):
        import matplotlib.pyplot as plt

        fn(a, m)
        plt.close("all")

    return call


ENTRY_POINTS = {
    # name: (stage the AnnData is at, call(adata, model, tmp_path), keys it may write)
    "setup_anndata": ("raw", _setup, _registration()),
    "MoESim()": ("registered", _init, {}),
    "train": ("model", _train, {}),
    "get_latent_representation": ("trained", lambda a, m, t: m.get_latent_representation(), {}),
    "get_latent_representation(query)": (
        "query",
        lambda a, m, t: m.get_latent_representation(a),
        _registration(),
    ),
    "predict": ("trained", lambda a, m, t: m.predict(), {}),
    "predict(soft)": ("trained", lambda a, m, t: m.predict(soft=True), {}),
    "predict(query)": ("query", lambda a, m, t: m.predict(a), _registration()),
    "annotate": ("trained", lambda a, m, t: m.annotate(a), ANNOTATE_KEYS),
    "annotate(query)": ("query", lambda a, m, t: m.annotate(a), _registration(ANNOTATE_KEYS)),
    "expert_usage": ("trained", lambda a, m, t: m.expert_usage(a), {}),
    "generate": ("trained", lambda a, m, t: m.generate(20, seed=0), {}),
    "save/load": ("query", _save_load, _registration()),
    "pl.training_curves": ("trained", _pl(lambda a, m: scmoesim.pl.training_curves(m)), {}),
    "pl.expert_usage": ("trained", _pl(lambda a, m: scmoesim.pl.expert_usage(m)), {}),
    "pl.similarity": ("trained", _pl(lambda a, m: scmoesim.pl.similarity(m, n_cells=32)), {}),
    "pl.confusion": (
        "annotated",
        _pl(lambda a, m: scmoesim.pl.confusion(a, truth_key="ct")),
        {},
    ),
    "pl.generated_vs_real": (
        "annotated",
        _pl(
            lambda a, m: scmoesim.pl.generated_vs_real(
                a, m.generate(30, seed=0), layer="counts", n_pcs=5, n_neighbors=5
            )
        ),
        {},
    ),
}


@pytest.fixture(scope="module")
def shared_model():
    """One trained model for the read-only entry points (each test snapshots its AnnData)."""
    adata = make_adata()
    scvi.settings.seed = 0
    MoESim.setup_anndata(adata, layer="counts", labels_key="ct", embedding_key="X_pca")
    model = MoESim(adata, n_experts=4)
    model.train(**ONE_EPOCH)
    return model


@pytest.mark.parametrize(
    ("stage", "call", "allowed"), ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys()
)
def test_entry_point_changes_only_documented_keys(stage, call, allowed, tmp_path, request):
    model = None
    if stage in ("trained", "query", "annotated"):
        model = request.getfixturevalue("shared_model")
        adata = model.adata
        if stage == "annotated":
            model.annotate(adata)
    else:
        adata = make_adata()
        scvi.settings.seed = 0
        if stage != "raw":
            MoESim.setup_anndata(adata, layer="counts", labels_key="ct", embedding_key="X_pca")
        if stage == "model":
            model = MoESim(adata, n_experts=4)
    target = _query(adata) if stage == "query" else adata
    before = copy.deepcopy(target)
    call(target, model, tmp_path)
    assert_unchanged(before, target, allowed)
    # registration keys, where allowed, hold what scvi-tools documents
    if "_scvi_labels" in target.obs and "_scvi_labels" not in before.obs:
        assert target.obs["_scvi_labels"].min() >= -1


def test_cli_fit_leaves_its_input_file_alone(tmp_path):
    adata = make_adata()
    adata.X = adata.layers["counts"].copy()
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    argv = ["fit", str(path), "-o", str(tmp_path / "out.h5ad"), "--labels-key", "ct"]
    argv += ["--epochs", "1", "--batch-size", "32", "--n-latent", "4", "--quiet"]
    assert cli.main(argv) == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    written = {"obs": set(out.obs) - set(adata.obs), "obsm": set(out.obsm) - set(adata.obsm)}
    assert written["obsm"] == {"X_moesim", "moesim_proba"}
    assert written["obs"] <= {"moesim_cluster"} | REGISTRATION_OBS
    assert_unchanged(
        adata,
        out,
        _registration({"uns": {"moesim"}, "obs": {"moesim_cluster"}, "obsm": written["obsm"]}),
    )


# ---------------------------------------------------------------- reproducibility
def _run(seed: int):
    adata = make_adata()
    scvi.settings.seed = seed
    MoESim.setup_anndata(adata, layer="counts", signatures=SIGS, embedding_key="X_pca")
    model = MoESim(adata, n_experts=4, depict_weight=1.0)  # DEPICT: the dropout pass too
    model.train(max_epochs=2, enable_progress_bar=False, batch_size=32)
    return model


def test_same_seed_same_everything_on_cpu():
    a, b = _run(11), _run(11)
    for key, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[key]), key
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    sampled = []
    for model in (a, b):  # sampled z draws from the global RNG: equal from an equal state
        torch.manual_seed(5)
        sampled.append(model.get_latent_representation(give_mean=False))
    np.testing.assert_array_equal(*sampled)
    np.testing.assert_array_equal(np.asarray(a.predict()), np.asarray(b.predict()))
    np.testing.assert_array_equal(a.predict(soft=True), b.predict(soft=True))
    assert a.cluster_names_ == b.cluster_names_
    assert sorted(a.history) == sorted(b.history)
    for key in a.history:
        np.testing.assert_array_equal(
            a.history[key].to_numpy(dtype=float), b.history[key].to_numpy(dtype=float), key
        )
    ga, gb = a.generate(40, seed=2), b.generate(40, seed=2)
    assert (ga.X != gb.X).nnz == 0
    np.testing.assert_array_equal(ga.layers["mean"], gb.layers["mean"])
    # the control: another seed gives other weights
    c = _run(12)
    assert not torch.equal(
        a.module.state_dict()["z_mean.weight"], c.module.state_dict()["z_mean.weight"]
    )


@pytest.mark.parametrize(("warmup", "epochs_off"), [(None, 0), (1, 1), (3, 3)])
def test_similarity_warmup_holds_the_clustering_loss_off(adata, warmup, epochs_off):
    """Default: no warm-up; with n, the first n epochs train without the clustering loss."""
    MoESim.setup_anndata(adata, layer="counts", embedding_key="X_pca")
    model = MoESim(adata, n_experts=3, n_latent=4)
    plan = {} if warmup is None else {"plan_kwargs": {"n_epochs_similarity_warmup": warmup}}
    model.train(max_epochs=4, batch_size=32, enable_progress_bar=False, **plan)
    for key in ("known_pair_fraction_train", "similarity_loss_train", "clustering_loss_train"):
        values = model.history[key].to_numpy(dtype=float).ravel()
        assert len(values) == 4
        assert (values[:epochs_off] == 0).all() and (values[epochs_off:] > 0).all(), key
    assert (model.history["reconstruction_loss_train"].to_numpy(dtype=float) > 0).all()


@pytest.mark.parametrize(
    ("source", "model_kwargs"),
    [
        ({"embedding_key": "X_pca"}, {}),
        # the paper's KL weighs its clusters by the gate: it must not train the gate either
        ({"labels_key": "ct"}, {"kl": "paper", "kl_weight": 2.0}),
    ],
)
def test_gate_does_not_train_during_the_similarity_warmup(adata, source, model_kwargs):
    MoESim.setup_anndata(adata, layer="counts", **source)
    model = MoESim(adata, n_experts=3, n_latent=4, **model_kwargs)
    gate = {k: v.clone() for k, v in model.module.state_dict().items() if k.startswith("gate")}
    encoder = {k: v.clone() for k, v in model.module.encoder.state_dict().items()}
    train = {"batch_size": 32, "enable_progress_bar": False}
    model.train(max_epochs=2, plan_kwargs={"n_epochs_similarity_warmup": 2}, **train)
    after = model.module.state_dict()
    assert gate and all(torch.equal(after[k], v) for k, v in gate.items())
    assert any(not torch.equal(model.module.encoder.state_dict()[k], v) for k, v in encoder.items())
    # once the warm-up is over, the gate learns
    model.train(max_epochs=1, plan_kwargs={"n_epochs_similarity_warmup": 0}, **train)
    assert any(not torch.equal(model.module.state_dict()[k], v) for k, v in gate.items())
