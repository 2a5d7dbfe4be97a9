"""Registry keys under which :class:`~scmoesim.MoESim` registers AnnData fields."""

from typing import Literal

X_KEY = "X"
BATCH_KEY = "batch"
LABELS_KEY = "labels"
EMBEDDING_KEY = "embedding"
GRAPH_KEY = "graph"

#: Public AnnData keys written by :meth:`scmoesim.MoESim.annotate` (defaults).
LATENT_KEY = "X_moesim"
CLUSTER_KEY = "moesim_cluster"
PROBA_KEY = "moesim_proba"
EXPERT_KEY = "moesim_expert"
UNS_KEY = "moesim"

Likelihood = Literal["nb", "zinb", "poisson", "normal", "bernoulli"]
COUNT_LIKELIHOODS = ("nb", "zinb", "poisson")
LIKELIHOODS = ("nb", "zinb", "poisson", "normal", "bernoulli")
KLKind = Literal["mixture", "paper"]
KnnRule = Literal["knn", "components", "mutual_components"]
KNN_RULES = ("knn", "components", "mutual_components")
