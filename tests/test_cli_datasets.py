import anndata as ad
import numpy as np
import pytest

from scmoesim import cli, datasets


def test_demo_writes_annotated_h5ad(tmp_path, capsys):
    out = tmp_path / "demo.h5ad"
    assert cli.main(["demo", "-o", str(out), "--epochs", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "agreement with bulk_labels: f_measure" in printed
    adata = ad.read_h5ad(out)
    assert adata.obsm["X_moesim"].shape == (700, 20)
    assert "moesim_cluster" in adata.obs and "moesim_proba" in adata.obsm
    assert set(datasets.PBMC_SIGNATURES) <= set(adata.uns["moesim"]["cluster_names"])
    f = adata.uns["moesim_demo"]["metrics"]["f_measure"]
    assert 0 < f <= 1
    # never overwrites without --force
    assert cli.main(["demo", "-o", str(out), "--epochs", "1", "--quiet"]) == 1
    assert "pass --force" in capsys.readouterr().err


def test_cli_help_lists_demo(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_pbmc68k_reduced_loader():
    adata = datasets.pbmc68k_reduced()
    assert adata.shape == (700, 765)
    assert {"X_pca", "X_umap"} <= set(adata.obsm)
    genes = [g for v in datasets.PBMC_SIGNATURES.values() for g in v]
    assert set(genes) <= set(adata.var_names)


def test_shared_loaders():
    kidney = datasets.tabula_muris_kidney()
    assert kidney.n_obs == 865 and not kidney.var_names.str.startswith("ERCC").any()
    genes = [g for v in datasets.KIDNEY_SIGNATURES.values() for g in v]
    assert set(genes) <= set(kidney.var_names)
    assert (kidney.layers["counts"] != kidney.X).nnz == 0
    cytof = datasets.levine32()
    assert cytof.shape == (1500, 32)
    np.testing.assert_allclose(cytof.X, np.arcsinh(cytof.layers["raw"] / 5), rtol=1e-5)
    # 0 made every value inf or NaN and a negative cofactor flipped the data, without a word
    for bad in (0, -5.0, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="cofactor must be a positive finite number"):
            datasets.levine32(cofactor=bad)


def test_tabula_muris_local_csv_folder(tmp_path):
    (tmp_path / "Kidney-counts.csv").write_text(",c1,c2\nGeneA,1,0\nGeneB,3,4\n")
    (tmp_path / "Liver-counts.csv").write_text(",c3\nGeneA,2\nGeneC,5\n")
    adata = datasets.tabula_muris(tmp_path)
    assert adata.shape == (3, 3)
    assert adata.obs["tissue"].tolist() == ["Kidney", "Kidney", "Liver"]
    assert adata[["c3"], ["GeneC"]].X.toarray().item() == 5
    with pytest.raises(FileNotFoundError, match="figshare"):
        datasets.tabula_muris(tmp_path / "missing")
    ann = tmp_path / "annotations.csv"
    ann.write_text("cell,cell_ontology_class\nc1,B\nc2,T\nc3,H\n")
    annotated = datasets.tabula_muris(tmp_path, ann)
    assert annotated.obs["cell_ontology_class"].tolist() == ["B", "T", "H"]
    ann.write_text("cell,cell_ontology_class\nc1,B\nc1,T\nc3,H\n")
    with pytest.raises(ValueError, match=r"lists 1 cell\(s\) more than once \(e.g. \['c1'\]\)"):
        datasets.tabula_muris(tmp_path, ann)
