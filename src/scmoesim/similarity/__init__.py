"""Minibatch similarity matrices ``S`` and their masks, one builder per source.

Every builder returns ``(S, mask)``: two ``(n, n)`` tensors for the ``n`` cells of a minibatch.
``S[i, j]`` is 1 when cells ``i`` and ``j`` should share a cluster and 0 when they should not;
``mask[i, j]`` is ``True`` where the source knows the answer. The similarity loss is computed over
known pairs only (the diagonal is never used).

Sources
-------
labels
    :func:`label_similarity`: cells with the same (known) label are similar; pairs involving an
    unlabeled cell are unknown.
signatures
    :class:`SignatureScorer` turns marker-gene expression into a per-cell signature (or none),
    which is then used exactly as a label.
kNN
    :func:`knn_similarity`: ``j`` is among the ``k`` nearest neighbours of ``i`` in an embedding,
    within the minibatch (or closer than a distance threshold); every pair is known.
    :func:`knn_band_similarity`: the same similar pairs, but only pairs far apart within the
    minibatch (beyond a rank cut-off, both ways) are dissimilar; the band in between is unknown.
    :func:`knn_components_similarity`: cells in one connected component of the minibatch's
    (mutual) kNN graph are similar, cells of different components dissimilar
    (:func:`connected_component_labels` finds the components without host synchronisation).
graph
    :func:`graph_similarity`: a precomputed cell-cell graph (e.g. ``obsp["connectivities"]``
    from :func:`scmoesim.pp.neighbors`) sliced to the minibatch, given as a matrix.
    :meth:`~scmoesim.MoESim.setup_anndata` (``graph_key``) registers the graph as per-cell
    neighbour lists (:func:`neighbor_table`), and the module slices it to each minibatch with
    :func:`graph_list_similarity`: linked cells are similar; unlinked pairs are dissimilar,
    unless an embedding is registered too, in which case the kNN source decides them.

Several sources are combined by :func:`combine_similarities`: sources are ranked and, for each
pair, the highest-ranked source that knows the pair decides it (labels > signatures > graph >
kNN). So a known label pair overrides what the neighbourhood says, and the neighbourhood fills in
the pairs that the labels leave unknown.
"""

from ._combine import combine_similarities
from ._graph import graph_similarity
from ._graph_lists import MAX_GRAPH_CELLS, graph_list_similarity, neighbor_table
from ._knn import KNN_METRICS, knn_similarity, pairwise_distances
from ._knn_band import knn_band_similarity
from ._knn_components import connected_component_labels, knn_components_similarity
from ._labels import label_similarity
from ._signatures import SignatureScorer, signature_gene_stats, validate_signatures

__all__ = [
    "KNN_METRICS",
    "MAX_GRAPH_CELLS",
    "SignatureScorer",
    "combine_similarities",
    "connected_component_labels",
    "graph_list_similarity",
    "graph_similarity",
    "knn_band_similarity",
    "knn_components_similarity",
    "knn_similarity",
    "label_similarity",
    "neighbor_table",
    "pairwise_distances",
    "signature_gene_stats",
    "validate_signatures",
]
