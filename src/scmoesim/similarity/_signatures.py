from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch import nn

_TARGET_SUM = 1e4


def validate_signatures(
    signatures: Mapping[str, Sequence[str]], var_names: pd.Index
) -> dict[str, list[str]]:
    """Check marker-gene signatures against the genes of an AnnData.

    Parameters
    ----------
    signatures
        ``{signature name: [marker genes]}``; a single gene may be given as a string.
    var_names
        The genes of the data.

    Returns
    -------
    A clean ``{name: [genes]}`` dict with names as strings and duplicate genes in one list removed.

    Raises
    ------
    ValueError
        Not a mapping, fewer than one signature, an empty gene list, names that collide once
        turned into strings, or genes missing from ``var_names`` (all of them listed).
    """
    if not isinstance(signatures, Mapping):
        raise ValueError(
            "signatures must be a dict {signature name: [marker genes]}, "
            f"got {type(signatures).__name__}."
        )
    if len(signatures) == 0:
        raise ValueError("signatures is empty: give at least one {name: [genes]} entry.")
    clean: dict[str, list[str]] = {}
    for name, genes in signatures.items():
        key = str(name)
        if key in clean:
            raise ValueError(f"Duplicate signature name {key!r}.")
        if isinstance(genes, str):
            genes = [genes]
        genes = list(dict.fromkeys(str(g) for g in genes))
        if len(genes) == 0:
            raise ValueError(f"Signature {key!r} has no marker genes.")
        clean[key] = genes
    known = set(var_names)
    missing = {k: [g for g in v if g not in known] for k, v in clean.items()}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in missing.items())
        raise ValueError(f"Signature genes not found in adata.var_names: {listed}.")
    return clean


def _row_chunks(x, chunk_size: int = 10_000):
    for start in range(0, x.shape[0], chunk_size):
        block = x[start : start + chunk_size]
        yield sparse.csr_matrix(block) if sparse.issparse(block) else np.asarray(block)


def _transform(block, gene_idx: np.ndarray, normalize: bool) -> np.ndarray:
    markers = block[:, gene_idx]
    markers = markers.toarray() if sparse.issparse(markers) else np.asarray(markers)
    markers = markers.astype(np.float64)
    if not normalize:
        return markers
    lib = np.asarray(block.sum(axis=1), dtype=np.float64).reshape(-1, 1)
    return np.log1p(markers / np.maximum(lib, 1e-12) * _TARGET_SUM)


def signature_gene_stats(x, gene_idx: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each marker gene over all cells.

    Parameters
    ----------
    x
        Cells x genes matrix (dense, sparse, or a backed dataset slicable by rows).
    gene_idx
        Column indices of the marker genes.
    normalize
        Counts are scaled to 10,000 per cell and log1p-transformed before the statistics.

    Returns
    -------
    means, sds
        Per-marker statistics (``sds`` floored at a small positive value).
    """
    n = 0
    s1 = np.zeros(len(gene_idx))
    s2 = np.zeros(len(gene_idx))
    for block in _row_chunks(x):
        y = _transform(block, gene_idx, normalize)
        n += y.shape[0]
        s1 += y.sum(0)
        s2 += (y**2).sum(0)
    mean = s1 / max(n, 1)
    var = np.maximum(s2 / max(n, 1) - mean**2, 0.0)
    return mean, np.maximum(np.sqrt(var), 1e-6)


class SignatureScorer(nn.Module):
    """Assigns cells to marker-gene signatures from their expression (the paper's rule).

    A cell's score for a signature is the mean, over the signature's marker genes, of the marker's
    standardised expression ``(y - mean) / sd`` (``y`` = log-normalised counts for count data,
    the values as given otherwise; mean and sd over all cells of the training data). For a single
    marker gene this is the paper's rule: the cell is above that gene's average expression. A cell
    *carries* a signature when its score exceeds ``threshold``; a cell that carries exactly one
    signature gets its index, a cell that carries none or several gets -1 (unknown).

    Parameters
    ----------
    n_genes
        Number of genes of the data.
    gene_idx
        Column indices of all marker genes used (union over signatures).
    membership
        ``(n_signatures, len(gene_idx))`` 0/1 matrix: which markers belong to which signature.
    means, sds
        Statistics from :func:`signature_gene_stats`.
    normalize
        Whether inputs are counts to be library-normalised and log1p-transformed.
    threshold
        Score above which a cell carries a signature.
    """

    def __init__(
        self,
        n_genes: int,
        gene_idx: np.ndarray,
        membership: np.ndarray,
        means: np.ndarray,
        sds: np.ndarray,
        normalize: bool,
        threshold: float = 0.0,
    ):
        super().__init__()
        self.n_genes = n_genes
        self.normalize = normalize
        self.threshold = threshold
        self.register_buffer("gene_idx", torch.as_tensor(gene_idx, dtype=torch.long))
        member = torch.as_tensor(membership, dtype=torch.float32)
        self.register_buffer("weights", member / member.sum(1, keepdim=True))
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float32))
        self.register_buffer("sds", torch.as_tensor(sds, dtype=torch.float32))

    @property
    def n_signatures(self) -> int:
        """Number of signatures."""
        return self.weights.shape[0]

    def scores(self, x: torch.Tensor, library: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, n_signatures)`` signature scores of the cells in ``x`` (all genes)."""
        y = x[:, self.gene_idx].float()
        if self.normalize:
            lib = x.sum(1, keepdim=True) if library is None else library.reshape(-1, 1)
            y = torch.log1p(y / lib.float().clamp_min(1e-12) * _TARGET_SUM)
        zscores = (y - self.means) / self.sds
        return zscores @ self.weights.T

    def forward(self, x: torch.Tensor, library: torch.Tensor | None = None) -> torch.Tensor:
        """``(n,)`` signature index of each cell, -1 for none or several."""
        carries = self.scores(x, library) > self.threshold
        n_carried = carries.sum(1)
        code = carries.float().argmax(1)
        return torch.where(n_carried == 1, code, torch.full_like(code, -1))

    @classmethod
    def from_adata_matrix(
        cls,
        x,
        var_names: pd.Index,
        signatures: Mapping[str, Sequence[str]],
        normalize: bool,
        threshold: float = 0.0,
    ) -> "SignatureScorer":
        """Build a scorer from a cells x genes matrix and ``{name: [genes]}`` signatures."""
        sig = validate_signatures(signatures, var_names)
        genes = list(dict.fromkeys(g for gs in sig.values() for g in gs))
        gene_idx = var_names.get_indexer(genes)
        membership = np.array([[g in gs for g in genes] for gs in sig.values()], dtype=float)
        means, sds = signature_gene_stats(x, gene_idx, normalize)
        return cls(x.shape[1], gene_idx, membership, means, sds, normalize, threshold)
