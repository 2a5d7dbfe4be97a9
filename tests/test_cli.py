import contextlib
import io
import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from scmoesim import cli, datasets

from .conftest import KIDNEY_SIGS

SIGS = {k: datasets.PBMC_SIGNATURES[k] for k in ("CD14+ Monocyte", "CD19+ B", "CD56+ NK")}
FAST = ["--epochs", "2", "--batch-size", "64", "--n-latent", "5", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small pbmc .h5ad (log data, partial labels) and signature files."""
    root = tmp_path_factory.mktemp("cli")
    adata = datasets.pbmc68k_reduced()[::3].copy()
    partial = adata.obs["bulk_labels"].astype(str).to_numpy(dtype=object)
    partial[::2] = "unknown"
    adata.obs["partial"] = pd.Categorical(partial)
    adata.write_h5ad(root / "pbmc.h5ad")
    (root / "sigs.json").write_text(json.dumps(SIGS))
    lines = ["signature,gene"] + [f"{k},{g}" for k, v in SIGS.items() for g in v]
    (root / "sigs.csv").write_text("\n".join(lines) + "\n")
    return root, adata


@pytest.fixture(scope="module")
def fitted(files):
    """``scmoesim fit`` once: output .h5ad, saved model and what it printed."""
    root, adata = files
    out, model_dir = root / "fit.h5ad", root / "model"
    argv = ["fit", str(root / "pbmc.h5ad"), "-o", str(out), "--likelihood", "normal"]
    argv += ["--signatures", str(root / "sigs.json"), "--labels-key", "partial"]
    argv += ["--save-model", str(model_dir), "--n-experts", "12", *FAST]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = cli.main(argv)
    return rc, out, model_dir, buffer.getvalue()


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- fit
def test_fit_writes_annotated_adata_and_summary(files, fitted):
    _, src = files
    rc, out, model_dir, printed = fitted
    assert rc == 0
    adata = ad.read_h5ad(out)
    assert adata.obsm["X_moesim"].shape == (src.n_obs, 5)
    assert adata.obsm["moesim_proba"].shape == (src.n_obs, 12)
    assert "moesim_cluster" in adata.obs and "moesim" in adata.uns
    assert adata.uns["moesim"]["params"]["likelihood"] == "normal"
    assert (model_dir / "model.pt").is_file()
    # clusters and sizes, then the scores on the labelled cells only
    counts = adata.obs["moesim_cluster"].value_counts()
    assert "experts hold cells" in printed
    for name, n in counts.items():
        assert any(ln.split() == [*str(name).split(), str(n)] for ln in printed.splitlines())
    n_labelled = int((adata.obs["partial"] != "unknown").sum())
    assert f"agreement with partial on {n_labelled} labelled cells: f_measure" in printed
    assert "nmi" in printed and "ari" in printed


def test_fit_never_overwrites(files, fitted, capsys):
    root, _ = files
    _, out, model_dir, _ = fitted
    before = out.stat().st_mtime_ns
    argv = ["fit", str(root / "pbmc.h5ad"), "-o", str(out), "--likelihood", "normal", *FAST]
    assert cli.main(argv) == 1
    assert "pass --force" in _error_line(capsys.readouterr().err)
    assert out.stat().st_mtime_ns == before
    other = root / "other.h5ad"
    argv = ["fit", str(root / "pbmc.h5ad"), "-o", str(other), "--save-model", str(model_dir)]
    assert cli.main([*argv, "--likelihood", "normal", *FAST]) == 1
    assert "model directory" in _error_line(capsys.readouterr().err)
    assert not other.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "counts"], "layer 'counts' not found"),
        (["--labels-key", "nope"], "labels_key 'nope' not found"),
        (["--batch-key", "nope"], "batch_key 'nope' not found"),
        (["--embedding-key", "X_nope"], "embedding_key 'X_nope' not found"),
        (["--likelihood", "nb"], "needs raw counts"),
        (["--signatures", "BADSIGS"], "not found in adata.var_names"),
        (["--signatures", "MISSING"], "does not exist"),
    ],
)
def test_fit_input_errors_are_one_line(files, capsys, extra, message):
    root, _ = files
    (root / "bad_sigs.tsv").write_text("B cell\tCD79A\nB cell\tNOT_A_GENE\n")
    extra = [
        str(root / "bad_sigs.tsv")
        if e == "BADSIGS"
        else str(root / "no.json")
        if e == "MISSING"
        else e
        for e in extra
    ]
    argv = ["fit", str(root / "pbmc.h5ad"), "-o", str(root / "never.h5ad"), *extra, "--quiet"]
    if "--likelihood" not in extra:
        argv += ["--likelihood", "normal"]
    assert cli.main(argv) == 1
    line = _error_line(capsys.readouterr().err)
    assert message in line
    assert not line.startswith("error: '")  # KeyError messages without repr quotes
    assert not (root / "never.h5ad").exists()


def test_fit_checks_output_locations_before_training(files, tmp_path, capsys, monkeypatch):
    """A file where a folder must go, or the reverse, used to fail after the training."""
    from scmoesim import MoESim

    root, _ = files
    monkeypatch.setattr(MoESim, "train", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    base = ["fit", str(root / "pbmc.h5ad"), "--likelihood", "normal", *FAST, "--force"]
    cases = [
        (["-o", str(tmp_path / "afile" / "x.h5ad")], "afile is a file"),
        (["-o", str(tmp_path / "adir")], "adir is a folder"),
        (["-o", str(tmp_path / "o.h5ad"), "--save-model", str(tmp_path / "afile")], "is a file"),
    ]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 1
        assert message in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "o.h5ad").exists()


def test_fit_interrupted_exits_130_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    """The Python API keeps an interrupted model; the command must not write it as done."""
    from lightning.pytorch.callbacks import Callback

    from scmoesim import MoESim

    class CtrlC(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise KeyboardInterrupt

    train = MoESim.train
    monkeypatch.setattr(MoESim, "train", lambda self, **kw: train(self, callbacks=[CtrlC()], **kw))
    root, _ = files
    out, model_dir = tmp_path / "int.h5ad", tmp_path / "model"
    argv = ["fit", str(root / "pbmc.h5ad"), "-o", str(out), "--likelihood", "normal", *FAST]
    assert cli.main([*argv, "--save-model", str(model_dir)]) == 130
    err = capsys.readouterr().err
    assert "error: interrupted" in err and "can be used, saved" not in err
    assert not out.exists() and not model_dir.exists()
    # also when the user silences warnings (PYTHONWARNINGS=ignore), which the CLI listens to
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv) == 130
    assert not out.exists()


def test_fit_bad_input_files(tmp_path, capsys):
    assert cli.main(["fit", str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "o.h5ad")]) == 1
    assert "does not exist" in _error_line(capsys.readouterr().err)
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not an h5ad file")
    assert cli.main(["fit", str(bad), "-o", str(tmp_path / "o.h5ad")]) == 1
    assert "cannot read" in _error_line(capsys.readouterr().err)


def test_fit_counts_layer_with_csv_signatures(kidney, tmp_path, capsys):
    kidney.X = sparse.csr_matrix(np.log1p(kidney.layers["counts"].toarray()))  # X is not counts
    kidney.write_h5ad(tmp_path / "kidney.h5ad")
    (tmp_path / "sigs.tsv").write_text(
        "".join(f"{k}\t{g}\n" for k, v in KIDNEY_SIGS.items() for g in v)
    )
    out, model_dir = tmp_path / "k.h5ad", tmp_path / "kmodel"
    argv = ["fit", str(tmp_path / "kidney.h5ad"), "-o", str(out), "--layer", "counts"]
    argv += ["--signatures", str(tmp_path / "sigs.tsv"), "--save-model", str(model_dir), *FAST]
    assert cli.main(argv) == 0
    adata = ad.read_h5ad(out)
    assert set(KIDNEY_SIGS) <= set(adata.uns["moesim"]["cluster_names"])
    assert adata.uns["moesim"]["params"]["likelihood"] == "nb"
    capsys.readouterr()
    gen = tmp_path / "g.h5ad"
    argv = ["generate", str(model_dir), "--adata", str(tmp_path / "kidney.h5ad")]
    assert cli.main([*argv, "--n-cells", "30", "-o", str(gen)]) == 0
    assert "generating" in capsys.readouterr().err  # progress bar without --quiet
    new = ad.read_h5ad(gen)
    assert new.n_obs == 30 and sparse.issparse(new.X)
    assert np.array_equal(new.X.data, np.round(new.X.data))


def test_fit_restarts(files, tmp_path, capsys):
    """--restarts N: N trainings, the lowest similarity loss kept, reported in one line."""
    root, _ = files
    out = tmp_path / "r.h5ad"
    argv = ["fit", str(root / "pbmc.h5ad"), "-o", str(out), "--likelihood", "normal"]
    argv += ["--embedding-key", "X_pca", "--n-experts", "6", "--restarts", "2", *FAST]
    assert cli.main(argv) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("restarts")]
    assert len(line) == 1 and re.search(r"0: \d\.\d{4} \(\d clusters\), 1: ", line[0])
    assert re.search(r"kept restart [01]$", line[0])
    assert ad.read_h5ad(out).obsm["moesim_proba"].shape[1] == 6
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--restarts", "0"])
    assert exc.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_fit_umap_for_the_knn_similarity(files, tmp_path, capsys):
    """--umap: unlabelled data need no Python step; the projection goes to its own key, and the
    input's 2-D X_umap (a plotting layout) and neighbour graph come through unchanged."""
    root, src = files
    out = tmp_path / "u.h5ad"
    argv = ["fit", str(root / "pbmc.h5ad"), "-o", str(out), "--likelihood", "normal"]
    umap = ["--umap", "--umap-components", "3", "--umap-min-dist", "0.1"]
    assert cli.main([*argv, *umap, "--n-experts", "6", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "UMAP projection (3-D) in obsm['X_umap_moesim']" in printed
    adata = ad.read_h5ad(out)
    emb = adata.obsm["X_umap_moesim"]
    assert emb.shape == (src.n_obs, 3) and np.isfinite(emb).all() and emb.std(0).min() > 0
    np.testing.assert_array_equal(adata.obsm["X_umap"], src.obsm["X_umap"])
    assert set(adata.obsp) == set(src.obsp)
    assert {k for k in adata.uns if not k.startswith("_scvi")} == set(src.uns) | {"moesim"}
    assert adata.obsm["moesim_proba"].shape == (src.n_obs, 6)
    # generate loads the model on data holding the projection: fit's output, not its input
    model_dir = tmp_path / "umodel"
    argv[3] = str(tmp_path / "u2.h5ad")
    assert cli.main([*argv, "--umap", "--save-model", str(model_dir), *FAST]) == 0
    gen = ["generate", str(model_dir), "--n-cells", "20", "-o", str(tmp_path / "g.h5ad")]
    assert cli.main([*gen, "--adata", str(root / "pbmc.h5ad"), "--quiet"]) == 1
    assert "needs the output of `scmoesim fit` as --adata" in _error_line(capsys.readouterr().err)
    assert cli.main([*gen, "--adata", str(tmp_path / "u2.h5ad"), "--quiet"]) == 0
    assert ad.read_h5ad(tmp_path / "g.h5ad").n_obs == 20
    argv[3] = str(tmp_path / "never.h5ad")
    assert cli.main([*argv, "--umap", "--embedding-key", "X_pca", *FAST]) == 1
    assert "either --umap or --embedding-key" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "never.h5ad").exists()


def test_umap_projection_of_counts_uses_log_pca(kidney):
    """With a count likelihood the projection is of the PCA of the log-normalised counts: the
    same as computing that by hand, and the input is not touched."""
    import scanpy as sc

    from scmoesim import pp

    before = kidney.copy()
    args = cli.build_parser().parse_args(
        ["fit", "in.h5ad", "-o", "o.h5ad", "--layer", "counts", "--umap", "--seed", "1"]
    )
    emb = cli._umap_projection(kidney, args)
    ref = ad.AnnData(kidney.layers["counts"].astype(np.float32))
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.pca(ref, n_comps=50, random_state=1)
    pp.umap_embedding(ref, use_rep="X_pca", random_state=1)
    np.testing.assert_allclose(emb, ref.obsm["X_umap"], rtol=1e-5, atol=1e-5)
    assert emb.shape == (kidney.n_obs, 2)
    assert set(kidney.obsm) == set(before.obsm) and set(kidney.uns) == set(before.uns)
    assert (kidney.layers["counts"] != before.layers["counts"]).nnz == 0
    args.umap_min_dist = -1.0
    with pytest.raises(ValueError, match="min_dist must be a finite number >= 0"):
        cli._umap_projection(kidney, args)
    args.umap_min_dist = 0.5
    bad = kidney.copy()
    bad.layers["counts"] = bad.layers["counts"].astype(np.float32)
    bad.layers["counts"].data[0] = np.nan
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        cli._umap_projection(bad, args)
    with pytest.raises(ValueError, match="adata is empty"):
        cli._umap_projection(kidney[:0].copy(), args)
    args.layer = "nope"
    with pytest.raises(KeyError, match="layer 'nope' not found"):
        cli._umap_projection(kidney, args)
    args.layer = None
    no_x = ad.AnnData(obs=kidney.obs, var=kidney.var)
    with pytest.raises(ValueError, match="adata.X is None"):
        cli._umap_projection(no_x, args)


# ---------------------------------------------------------------- generate
def test_generate_chosen_clusters_reproducible(files, fitted, capsys):
    root, _ = files
    _, _, model_dir, _ = fitted
    names = ad.read_h5ad(root / "fit.h5ad").obs["moesim_cluster"].value_counts().index[:2]
    out = root / "gen.h5ad"
    argv = ["generate", str(model_dir), "--adata", str(root / "pbmc.h5ad"), "--n-cells", "40"]
    argv += ["--clusters", *map(str, names), "--seed", "3", "--temperature", "0.5", "--quiet"]
    argv += ["--latent", "prior"]
    assert cli.main([*argv, "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "generated 40 cells" in printed.out and "generating" not in printed.err
    first = ad.read_h5ad(out)
    assert first.n_obs == 40
    assert set(first.obs["moesim_cluster"].astype(str)) <= set(map(str, names))
    assert first.uns["moesim_generate"]["temperature"] == 0.5
    assert first.uns["moesim_generate"]["latent"] == "prior"
    assert cli.main([*argv, "-o", str(out)]) == 1  # no --force
    assert "pass --force" in _error_line(capsys.readouterr().err)
    assert cli.main([*argv, "-o", str(out), "--force"]) == 0
    np.testing.assert_array_equal(ad.read_h5ad(out).X, first.X)
    # without --latent: the training cells' posteriors, the model's default
    default = argv[: argv.index("--latent")] + ["-o", str(root / "gen_default.h5ad")]
    assert cli.main(default) == 0
    assert ad.read_h5ad(root / "gen_default.h5ad").uns["moesim_generate"]["latent"] == "posterior"


def test_generate_errors(files, fitted, tmp_path, capsys):
    root, _ = files
    _, _, model_dir, _ = fitted
    base = ["--n-cells", "5", "-o", str(tmp_path / "g.h5ad"), "--quiet"]
    assert cli.main(["generate", str(tmp_path / "nomodel"), *base]) == 1
    assert "does not exist" in _error_line(capsys.readouterr().err)
    assert cli.main(["generate", str(model_dir), *base]) == 1
    assert "--adata" in _error_line(capsys.readouterr().err)
    argv = ["generate", str(model_dir), "--adata", str(root / "pbmc.h5ad"), *base]
    assert cli.main([*argv, "--clusters", "no such cluster"]) == 1
    assert "Unknown cluster" in _error_line(capsys.readouterr().err)
    wrong = tmp_path / "wrong.h5ad"
    ad.read_h5ad(root / "pbmc.h5ad")[:, :100].copy().write_h5ad(wrong)
    assert cli.main(["generate", str(model_dir), "--adata", str(wrong), *base]) == 1
    assert "cannot load the model" in _error_line(capsys.readouterr().err)
    # a damaged model.pt (a copy cut short) is one line too, not torch's traceback
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.pt").write_bytes((model_dir / "model.pt").read_bytes()[:2000])
    argv = ["generate", str(damaged), "--adata", str(root / "pbmc.h5ad"), *base]
    assert cli.main(argv) == 1
    assert f"cannot load the model from {damaged}" in _error_line(capsys.readouterr().err)
    # an untrained model saved with its data: one line, not generate()'s RuntimeError
    from scmoesim import MoESim

    query = ad.read_h5ad(root / "pbmc.h5ad")
    MoESim.setup_anndata(query)
    MoESim(query, likelihood="normal").save(tmp_path / "untrained", save_anndata=True)
    argv = ["generate", str(tmp_path / "untrained"), *base]
    assert cli.main(argv) == 1
    assert "saved untrained; train it first" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "g.h5ad").exists()


# ---------------------------------------------------------------- signatures files
def test_read_signatures_formats(tmp_path):
    genes = ["CD79A", "MS4A1", "LYZ"]
    expected = {"B": ["CD79A", "MS4A1"], "Mono": ["LYZ"]}
    (tmp_path / "a.json").write_text('{"B": ["CD79A", "MS4A1"], "Mono": "LYZ"}')
    assert cli.read_signatures(tmp_path / "a.json", genes) == {
        "B": ["CD79A", "MS4A1"],
        "Mono": "LYZ",  # single genes are accepted by setup_anndata
    }
    (tmp_path / "b.csv").write_text("cluster,gene\nB,CD79A\nB,MS4A1\n\n# comment\nMono,LYZ\n")
    assert cli.read_signatures(tmp_path / "b.csv", genes) == expected
    (tmp_path / "c.csv").write_text("B,CD79A\nB,MS4A1\nMono,LYZ\n")  # no header
    assert cli.read_signatures(tmp_path / "c.csv", genes) == expected
    (tmp_path / "d.tsv").write_text("cell type\tmarker\nB\tCD79A\nB\tMS4A1\nMono\tLYZ\n")
    assert cli.read_signatures(tmp_path / "d.tsv", genes) == expected
    (tmp_path / "e.txt").write_text("B\tCD79A\nB\tMS4A1\nMono\tLYZ\n")
    assert cli.read_signatures(tmp_path / "e.txt", genes) == expected
    (tmp_path / "bad.csv").write_text("B,CD79A,extra\n")
    with pytest.raises(cli.CLIError, match="line 1: expected two columns"):
        cli.read_signatures(tmp_path / "bad.csv", genes)
    (tmp_path / "bad.json").write_text('["CD79A"]')
    with pytest.raises(cli.CLIError, match="JSON object"):
        cli.read_signatures(tmp_path / "bad.json", genes)
    (tmp_path / "broken.json").write_text('{"B": [')
    with pytest.raises(cli.CLIError, match="cannot parse"):
        cli.read_signatures(tmp_path / "broken.json", genes)
    with pytest.raises(cli.CLIError, match="is a folder; give a .json"):
        cli.read_signatures(tmp_path, genes)


def test_unlabeled_category_follows_column_type():
    assert cli._coerce_category(pd.Series([0, 1, -1]), "-1") == -1
    assert cli._coerce_category(pd.Series(pd.Categorical([0, 1, -1])), "-1") == -1
    assert cli._coerce_category(pd.Series([0.5, np.nan]), "0.5") == 0.5
    assert cli._coerce_category(pd.Series(["a", "unknown"]), "unknown") == "unknown"


def test_cli_copies_of_model_constants_agree(capsys):
    """The CLI keeps its own copies (importing the model loads torch before --help); the help
    once said 10 experts without labels where the model used 20."""
    from scmoesim._constants import LIKELIHOODS
    from scmoesim.model._moesim import UNSUPERVISED_N_EXPERTS

    assert cli._LIKELIHOODS == LIKELIHOODS
    assert cli._UNSUPERVISED_N_EXPERTS == UNSUPERVISED_N_EXPERTS
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    assert f"else {UNSUPERVISED_N_EXPERTS})" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- help, demo
@pytest.mark.parametrize(
    ("command", "options"),
    [
        (
            "fit",
            ["--layer", "--batch-key", "--labels-key", "--unlabeled-category", "--signatures"]
            + ["--embedding-key", "--n-experts", "--n-latent", "--likelihood", "--epochs"]
            + ["--batch-size", "--accelerator", "--seed", "--save-model", "--force", "--quiet"]
            + ["--restarts"]
            + ["--umap", "--umap-components", "--umap-min-dist"],
        ),
        (
            "generate",
            ["--adata", "--n-cells", "--clusters", "--seed", "--temperature", "--latent", "-o"]
            + ["--force"],
        ),
        ("demo", ["--output", "--epochs", "--figure", "--force", "--quiet"]),
    ],
)
def test_help_explains_options(capsys, command, options):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text


def test_bad_option_values_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "x.h5ad", "-o", "y.h5ad", "--likelihood", "gamma"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["generate", "m", "--n-cells", "0", "-o", "g.h5ad"])
    assert "must be >= 1" in capsys.readouterr().err
    # seeds outside numpy's range are usage errors, not tracebacks after reading the data
    for command in (["fit", "x.h5ad", "-o", "y.h5ad"], ["demo"], ["generate", "m", "-o", "g"]):
        for seed in ("-1", str(2**32)):
            with pytest.raises(SystemExit) as exc:
                cli.main([*command, "--seed", seed])
            assert exc.value.code == 2
            assert "--seed" in capsys.readouterr().err


def test_demo_refuses_a_figure_over_its_output(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "-o", str(out), "--epochs", "1", "--quiet"]) == 1
    assert "the figure and the output are both" in _error_line(capsys.readouterr().err)
    argv = ["demo", "-o", str(tmp_path / "d.h5ad"), "--figure", str(tmp_path / "d.h5ad")]
    assert cli.main([*argv, "--quiet"]) == 1
    assert not out.exists() and not (tmp_path / "d.h5ad").exists()


def test_demo_writes_figure(tmp_path, capsys):
    out = tmp_path / "demo.h5ad"
    assert cli.main(["demo", "-o", str(out), "--epochs", "1", "--quiet"]) == 0
    png = tmp_path / "demo.png"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    assert "agreement with bulk_labels: f_measure" in capsys.readouterr().out
    out.unlink()  # the figure alone also blocks a rerun without --force
    assert cli.main(["demo", "-o", str(out), "--epochs", "1", "--quiet"]) == 1
    assert "pass --force" in _error_line(capsys.readouterr().err)
