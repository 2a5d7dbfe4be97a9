"""The tutorial notebooks: committed with outputs, and executable with small settings.

Every notebook in ``tutorials/`` is executed in a fresh kernel with
``SCMOESIM_TUTORIAL_FAST=1`` (the notebooks then train for a few epochs on fewer genes). A
notebook whose data file is not available is skipped.
"""

import json
import os
import sys
from pathlib import Path

import pytest

from scmoesim import datasets

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
# notebook -> the shared data file it needs (None: only data bundled with scanpy)
NOTEBOOKS = {
    "tabula_muris.ipynb": "tabula_muris_kidney_facs.h5ad",
    "signatures_pbmc.ipynb": None,
    "cytometry_levine.ipynb": "levine32_cytof_subset.h5ad",
    "generation.ipynb": None,
}
KERNEL = "scmoesim-tutorial"


def _data_dir() -> Path | None:
    try:
        return datasets.shared_data_dir()
    except FileNotFoundError:
        return None


def _read(name: str):
    return nbformat.read(TUTORIALS / name, as_version=4)


def _errors(nb) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]


def _n_images(nb) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec that starts this interpreter (not whatever ``python`` is on PATH)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "scmoesim tests", "language": "python"})
    )
    return str(root)


def test_every_notebook_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_committed_notebook_is_executed(name):
    """Committed notebooks keep the outputs of a full run: every cell ran, no errors, figures."""
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    not_run = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not not_run, f"{name}: code cells {not_run} were never executed"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name} was not run top to bottom"
    assert not _errors(nb), f"{name} has error outputs: {_errors(nb)}"
    assert _n_images(nb) >= 2, f"{name} has fewer than two figures"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_fast(name, tmp_path, monkeypatch, kernel_env):
    """Execute the notebook top to bottom with SCMOESIM_TUTORIAL_FAST=1."""
    data_file = NOTEBOOKS[name]
    data_dir = _data_dir()
    if data_file is not None and (data_dir is None or not (data_dir / data_file).is_file()):
        pytest.skip(f"{data_file} is not available (set SCMOESIM_DATA)")
    monkeypatch.setenv("SCMOESIM_TUTORIAL_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("JUPYTER_PATH", kernel_env)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if data_dir is not None:
        monkeypatch.setenv("SCMOESIM_DATA", str(data_dir))
    nb = _read(name)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    assert not _errors(nb)
    assert _n_images(nb) >= 2, f"{name} drew fewer than two figures"
    assert not list(tmp_path.iterdir()), "the notebook wrote files into its working directory"
