"""AnnData fields specific to MoESim (registered through scvi-tools' AnnDataManager)."""

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.data.fields import CategoricalObsField, ObsmField

from scmoesim.similarity import neighbor_table


class PartialLabelsObsField(CategoricalObsField):
    """Labels where some cells are unknown (NaN or ``unlabeled_category``).

    Known labels are coded ``0..C-1`` (in the column's category order when it is categorical,
    sorted otherwise; categories without cells are dropped). Unknown cells are coded ``-1`` and
    are left out of the label similarity. The codes go to ``adata.obs["_scvi_labels"]``, the
    scvi-tools convention.
    """

    UNLABELED_CATEGORY = "unlabeled_category"

    def __init__(self, registry_key: str, obs_key: str, unlabeled_category) -> None:
        super().__init__(registry_key, obs_key)
        self._unlabeled_category = unlabeled_category

    def _known_categories(self, col: pd.Series) -> np.ndarray:
        known = col[col.notna() & (col.astype(object) != self._unlabeled_category)]
        if isinstance(col.dtype, pd.CategoricalDtype):
            present = set(known.astype(object))
            return np.array([c for c in col.cat.categories if c in present], dtype=object)
        return np.array(sorted(pd.unique(known.astype(object)), key=str), dtype=object)

    def _write_codes(self, adata: AnnData, mapping: np.ndarray) -> None:
        col = adata.obs[self._original_attr_key].astype(object)
        lookup = {c: i for i, c in enumerate(mapping)}
        codes = np.array([lookup.get(v, -1) for v in col], dtype=np.int64)
        adata.obs[self.attr_key] = codes

    def register_field(self, adata: AnnData) -> dict:
        """Register the field: code the known labels, ``-1`` for unknown cells."""
        self.validate_field(adata)
        mapping = self._known_categories(adata.obs[self._original_attr_key])
        self._write_codes(adata, mapping)
        return {
            self.CATEGORICAL_MAPPING_KEY: mapping,
            self.ORIGINAL_ATTR_KEY: self._original_attr_key,
            self.UNLABELED_CATEGORY: self._unlabeled_category,
        }

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Code a query's labels with the reference mapping; missing column -> all unknown."""
        mapping = state_registry[self.CATEGORICAL_MAPPING_KEY]
        if self._original_attr_key in adata_target.obs:
            self._write_codes(adata_target, mapping)
        else:
            adata_target.obs[self.attr_key] = np.full(adata_target.n_obs, -1, dtype=np.int64)
        return {
            self.CATEGORICAL_MAPPING_KEY: mapping,
            self.ORIGINAL_ATTR_KEY: self._original_attr_key,
            self.UNLABELED_CATEGORY: self._unlabeled_category,
        }

    def get_summary_stats(self, state_registry: dict) -> dict:
        """Number of known label classes."""
        return {self.count_stat_key: len(state_registry[self.CATEGORICAL_MAPPING_KEY])}


class GraphNeighborsField(ObsmField):
    """A cell-cell graph (``obsp``) registered as per-cell neighbour lists.

    At registration, ``adata.obsp[graph_key]`` becomes the table of
    :func:`~scmoesim.similarity.neighbor_table` (own index, then neighbour indices, -1 pads) in
    ``adata.obsm["_scmoesim_graph"]``, so that minibatches carry the rows they need. Another
    AnnData (e.g. for :meth:`~scmoesim.MoESim.get_latent_representation`) gets a table of the
    same width from its own graph, or one without neighbours when it has none: the graph only
    matters for training.
    """

    TABLE_KEY = "_scmoesim_graph"
    GRAPH_KEY = "graph_key"

    def __init__(self, registry_key: str, graph_key: str) -> None:
        super().__init__(registry_key, self.TABLE_KEY, correct_data_format=False)
        self._graph_key = graph_key

    def _write(self, adata: AnnData, width: int | None) -> None:
        if self._graph_key in adata.obsp:
            table = neighbor_table(adata.obsp[self._graph_key], width)
        else:
            table = np.full((adata.n_obs, 1 + (width or 0)), -1.0, dtype=np.float32)
            table[:, 0] = np.arange(adata.n_obs, dtype=np.float32)
        adata.obsm[self.TABLE_KEY] = table

    def register_field(self, adata: AnnData) -> dict:
        """Build the neighbour table from ``adata.obsp[graph_key]``."""
        if self._graph_key not in adata.obsp:
            raise KeyError(
                f"graph_key {self._graph_key!r} not found in adata.obsp (keys: "
                f"{list(adata.obsp)}); e.g. run scmoesim.pp.neighbors(adata) for "
                "'connectivities'."
            )
        self._write(adata, None)
        state = super().register_field(adata)
        return {**state, self.GRAPH_KEY: self._graph_key}

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Same-width table for another AnnData (no neighbours when it has no graph)."""
        width = len(state_registry[self.COLUMN_NAMES_KEY]) - 1
        self._write(adata_target, width)
        state = super().transfer_field(state_registry, adata_target, **kwargs)
        return {**state, self.GRAPH_KEY: self._graph_key}
