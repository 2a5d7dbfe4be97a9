"""Synthetic negative-binomial count data for the speed and scale benchmarks.

Cells belong to ``n_types`` groups with their own gene means (log-normal fold changes around a
log-normal baseline), a log-normal cell-specific size factor, and gamma-Poisson (NB, theta=2)
counts. An ``obsm["X_pca"]`` stand-in (group centre + noise, 20-D) serves the kNN similarity.
Large files are written chunk by chunk, so 1M cells never sit in memory; their cells are drawn
(with replacement, in random order) from a pool of generated cells, which keeps writing 1M cells
to a few minutes while the file has the size and sparsity of real data.
"""

import h5py
import numpy as np
import pandas as pd
from anndata import AnnData
from anndata.io import sparse_dataset, write_elem
from scipy import sparse

THETA = 2.0


class SyntheticCounts:
    """A reproducible generator of NB count chunks with ``n_types`` cell groups."""

    def __init__(self, n_genes: int = 2000, n_types: int = 10, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n_genes = n_genes
        self.n_types = n_types
        self.seed = seed
        base = rng.lognormal(-3.0, 1.5, n_genes)
        self.means = base * rng.lognormal(0.0, 1.0, (n_types, n_genes))
        self.centres = rng.normal(size=(n_types, 20))

    def chunk(self, n: int, chunk_id: int) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
        """``n`` cells: CSR float32 counts, group codes, a 20-D embedding."""
        rng = np.random.default_rng((self.seed, chunk_id))
        types = rng.integers(0, self.n_types, n)
        mu = self.means[types] * rng.lognormal(0.0, 0.3, (n, 1))
        x = rng.poisson(rng.gamma(THETA, mu / THETA)).astype(np.float32)
        emb = self.centres[types] + 0.5 * rng.normal(size=(n, 20))
        return sparse.csr_matrix(x), types, emb.astype(np.float32)

    def anndata(self, n_cells: int, chunk: int = 10_000, pool: int | None = None) -> AnnData:
        """An in-memory AnnData (sparse X) of ``n_cells`` cells.

        With ``pool``, cells are resampled from ``pool`` generated cells (fast for large N).
        """
        if pool is None:
            parts = [
                self.chunk(min(chunk, n_cells - s), i)
                for i, s in enumerate(range(0, n_cells, chunk))
            ]
            x = sparse.vstack([p[0] for p in parts]).tocsr()
            types = np.concatenate([p[1] for p in parts])
            emb = np.concatenate([p[2] for p in parts])
        else:
            pool_x, pool_t, pool_e = self.chunk(min(pool, n_cells), 10**6)
            idx = np.random.default_rng((self.seed, n_cells)).integers(0, pool_x.shape[0], n_cells)
            x, types, emb = pool_x[idx], pool_t[idx], pool_e[idx]
        adata = AnnData(
            x,
            obs=pd.DataFrame(
                {"type": pd.Categorical(types.astype(str))},
                index=[f"c{i}" for i in range(n_cells)],
            ),
            var=pd.DataFrame(index=[f"g{j}" for j in range(self.n_genes)]),
        )
        adata.obsm["X_pca"] = emb
        return adata

    def write_h5ad(self, path: str, n_cells: int, chunk: int = 20_000, pool: int = 20_000) -> None:
        """Write ``n_cells`` cells to ``path`` chunk by chunk (sparse CSR ``X``).

        Cells are resampled from a pool of ``pool`` generated cells (see the module docstring).
        """
        pool_x, pool_t, pool_e = self.chunk(min(pool, n_cells), 10**6)
        rng = np.random.default_rng((self.seed, n_cells))
        types, embs = [], []
        with h5py.File(path, "w") as f:
            for i, start in enumerate(range(0, n_cells, chunk)):
                idx = rng.integers(0, pool_x.shape[0], min(chunk, n_cells - start))
                x = pool_x[idx]
                if i == 0:
                    write_elem(f, "X", x)
                    x_ds = sparse_dataset(f["X"])
                else:
                    x_ds.append(x)
                types.append(pool_t[idx])
                embs.append(pool_e[idx])
            obs = pd.DataFrame(
                {"type": pd.Categorical(np.concatenate(types).astype(str))},
                index=[f"c{i}" for i in range(n_cells)],
            )
            write_elem(f, "obs", obs)
            write_elem(f, "var", pd.DataFrame(index=[f"g{j}" for j in range(self.n_genes)]))
            write_elem(f, "obsm", {"X_pca": np.concatenate(embs)})
            for key in ("layers", "obsp", "varm", "varp", "uns"):
                write_elem(f, key, {})
