import os
import warnings

import numpy as np
import pytest
import scvi
import torch

from scmoesim import datasets

torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available.*")

KIDNEY_SIGS = {
    "leukocyte": ["Ptprc", "Cd52"],
    "kidney tubule cell": ["Slc34a1", "Lrp2"],
    "endothelial cell": ["Emcn", "Pecam1"],
}
TRAIN = {"max_epochs": 3, "enable_progress_bar": False, "batch_size": 64}


@pytest.fixture(scope="session")
def kidney_full():
    return datasets.tabula_muris_kidney()


@pytest.fixture
def kidney(kidney_full):
    """240 Tabula Muris kidney cells x ~300 genes of raw counts (markers included)."""
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(kidney_full.n_obs, 240, replace=False))
    x = kidney_full.layers["counts"]
    totals = np.asarray(x.sum(0)).ravel()
    top = set(np.argsort(-totals)[:300])
    top |= set(kidney_full.var_names.get_indexer([g for v in KIDNEY_SIGS.values() for g in v]))
    adata = kidney_full[cells, sorted(top)].copy()
    del adata.uns["provenance"]
    return adata


@pytest.fixture
def pbmc():
    return datasets.pbmc68k_reduced()


@pytest.fixture(autouse=True)
def _seed():
    scvi.settings.seed = 0
