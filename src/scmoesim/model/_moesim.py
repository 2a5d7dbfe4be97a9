import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scmoesim import _constants as K
from scmoesim.module import MoESimModule
from scmoesim.similarity import KNN_METRICS, SignatureScorer, validate_signatures
from scmoesim.train import (
    InterruptFlag,
    MoESimTrainingPlan,
    PeriodicCheckpoint,
    check_checkpoint_fits,
    check_plan_values,
    epochs_done,
    resolve_checkpoint,
)

from . import _io
from . import _validate as V
from ._fields import GraphNeighborsField, PartialLabelsObsField
from ._generate import GenerateMixin
from ._merge import MergeMixin
from ._outputs import OutputsMixin
from ._restarts import check_restarts, train_with_restarts

logger = logging.getLogger(__name__)

#: Defaults without labels or signatures (kNN / graph similarity only): experts and weight
#: chosen on Levine_32dim (``benchmarks/results_exploration.md``), the resolution over five
#: datasets (``benchmarks/results_resolution.md``).
UNSUPERVISED_N_EXPERTS = 20
UNSUPERVISED_CLUSTERING_WEIGHT = 4.0
UNSUPERVISED_RESOLUTION = 4.0


class MoESim(OutputsMixin, GenerateMixin, MergeMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Mixture-of-Experts Similarity VAE (MoE-Sim-VAE) for single-cell data.

    One model gives a latent space shaped by a similarity of your choice, a clustering of the
    cells by a gating network, and one generator ("expert") per cluster. See
    :meth:`setup_anndata` for the similarity sources (labels, marker-gene signatures, kNN).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_experts
        Number of experts = maximal number of clusters K. Default: one more than the number of
        label classes or signatures (room for cells that fit none), or 20 without them (surplus
        experts stay empty; see :meth:`effective_n_clusters`).
    n_latent
        Dimension of the latent space (paper, Tabula Muris: 20).
    likelihood
        ``"nb"`` (raw counts, default), ``"zinb"``, ``"poisson"``, ``"normal"`` (e.g. arcsinh
        cytometry or log data) or ``"bernoulli"`` (data scaled to [0, 1], the paper's choice).
    n_hidden, n_layers
        Width and depth of the encoder and of each expert (paper: 100, 1).
    n_hidden_gate, n_layers_gate, gate_dropout
        Gating network (paper: 100, 1, 0.5). ``gate_dropout`` acts only on the gate's noisy
        pass of the DEPICT loss, so it has no effect with ``depict_weight=0`` (the default): the
        pass that assigns cells to experts never drops units.
    activation_fn
        ``"elu"`` (paper, scRNA-seq) or ``"relu"``.
    dispersion
        ``"gene"`` or ``"gene-expert"`` (NB dispersion / Gaussian scale per expert too).
    kl
        ``"mixture"`` (default): ``KL(q(z|x) || N(mu_k, I))`` towards the centre of the cell's
        cluster, a proper mixture-prior KL; or ``"paper"``: the paper's Eq. 3, which only pushes
        each cluster's variance of z towards 1. See ``benchmarks/`` for the comparison.
    kl_weight
        pi_1, weight of the KL term (paper, Tabula Muris: 0.2). ``None`` (default) picks 2.0
        when labels or signatures are registered and 0.0 when the kNN similarity is the only
        source. Measured (``benchmarks/README.md``): with signatures a stronger pull of each
        cell towards its cluster centre raised every score (PBMC NMI 0.61 -> 0.66, kidney
        F-measure 0.75 -> 0.77 from 0.2 to 1-2), while with kNN alone the same pull merged
        clusters (Levine_32dim Hungarian F1 0.23 at 0.2, 0.73 at 0).
    clustering_weight
        Weight of the clustering loss. ``None`` (default) picks the paper's 0.8 when labels or
        signatures are registered and 4.0 otherwise (kNN or graph similarity only): measured on
        Levine_32dim, 4.0 raised the Hungarian F1 from 0.73 to 0.82
        (``benchmarks/results_exploration.md``).
    similarity_resolution
        How the similarity loss weighs dissimilar pairs against similar ones, and so how large
        its clusters are. A number ``r``: each known dissimilar pair of a minibatch weighs
        ``r * n_similar / n_dissimilar``, so two groups of cells stay together when the share
        of their pairs called similar is above about ``r`` times the minibatch's overall share,
        the criterion of Leiden's constant Potts model; like Leiden's ``resolution``, larger
        gives more and smaller clusters (:func:`~scmoesim.module.similarity_bce`).
        ``"paper"``: every pair weighs 1, the paper's pair weights in the full cross-entropy;
        with the kNN similarity the clusters then hold about ``2 * knn_neighbors`` cells per
        minibatch whatever the data. ``"half"``: Eq. 7 as printed, only the
        ``S log(PP^T)`` half (dissimilar pairs weigh 0); nothing then keeps cells apart and
        they collapse onto one expert: offered to compare with the paper, not to use.
        ``None`` (default) picks 4.0 when the kNN or graph similarity is the only source and
        ``"paper"`` when labels or signatures are registered (their pairs are right by
        construction). Measured in ``benchmarks/results_resolution.md``.
    depict_weight
        pi_2, DEPICT weight inside the clustering loss. The paper uses 1; the default is 0
        because on both signature benchmarks (``benchmarks/``) the DEPICT target's
        square-root frequency balancing (Eq. 9) split large clusters (tubule cells, dendritic
        cells) and lowered F-measure, NMI and ARI. Set it to 1 for the paper's model.
    anchor_weight
        Weight, inside the clustering loss, of a per-cell cross-entropy between the gate and the
        known class of each cell (labels, else signatures), with class ``k`` pinned to expert
        ``k``. The pairwise loss of Eq. 7 weighs a class by its number of pairs, so a rare
        class can be absorbed by a large one; the anchor keeps every class its own expert.
    knn_neighbors, knn_metric, knn_threshold
        kNN similarity in the minibatch when ``embedding_key`` was registered: neighbours per
        cell, metric (``"euclidean"``, ``"correlation"``, ``"canberra"``, ``"cosine"``), or a
        distance threshold instead of k.
    knn_far_fraction
        Which non-neighbour pairs of the kNN similarity count as dissimilar. A fraction in
        (0, 1]: only a pair whose cells are both beyond the other's
        ``ceil(knn_far_fraction * (n - 1))``-th nearest cell in the minibatch of ``n`` cells;
        the pairs in between are left out of the similarity loss, so cells of one population
        that are not each other's nearest neighbours are not pushed apart
        (:func:`~scmoesim.similarity.knn_band_similarity`). ``None`` (default): every
        non-neighbour pair is dissimilar (the paper's rule,
        :func:`~scmoesim.similarity.knn_similarity`); on Levine_32dim every fraction tried
        merged neighbouring populations (``benchmarks/results_exploration.md``).
    knn_rule
        How the kNN graph of a minibatch becomes ``S``. ``"knn"`` (default, the paper's rule):
        a pair is similar when one cell is among the other's ``knn_neighbors`` nearest, every
        other pair is dissimilar, so clusters hold roughly ``2 * knn_neighbors`` cells per
        minibatch whatever the data. ``"components"``: cells in one connected component of the
        minibatch's kNN graph are similar, cells of different components dissimilar, so only
        the islands of the embedding decide the cluster size
        (:func:`~scmoesim.similarity.knn_components_similarity`). ``"mutual_components"``: the
        same on the mutual kNN graph (both cells among each other's neighbours), with pairs
        involving an isolated cell left unknown. ``knn_far_fraction`` and ``knn_threshold``
        apply to ``"knn"`` only. Measured (``benchmarks/results_exploration.md``): the
        components merged touching populations (Levine_32dim Hungarian F1 0.17 vs 0.84, MNIST
        one cluster); on Gaussian mixtures with separate islands, ``"mutual_components"``
        finds the true number of components from 2 to 12 and 13-14 of 15 (three seeds,
        ``benchmarks/results_synthetic_mutual.md``), where ``"knn"`` finds 5-10 for 2-15.
    centre_decay
        Decay of the running EM estimate of the cluster centres per minibatch.

    Examples
    --------
    >>> scmoesim.MoESim.setup_anndata(adata, layer="counts", signatures={"B": ["CD79A"]})
    >>> model = scmoesim.MoESim(adata, n_experts=7)
    >>> model.train()
    >>> model.annotate(adata)  # obsm["X_moesim"], obs["moesim_cluster"], ...
    """

    _module_cls = MoESimModule
    _training_plan_cls = MoESimTrainingPlan

    def __init__(
        self,
        adata: AnnData,
        n_experts: int | None = None,
        n_latent: int = 20,
        likelihood: K.Likelihood = "nb",
        n_hidden: int = 100,
        n_layers: int = 1,
        n_hidden_gate: int = 100,
        n_layers_gate: int = 1,
        gate_dropout: float = 0.5,
        activation_fn: str = "elu",
        dispersion: str = "gene",
        kl: K.KLKind = "mixture",
        kl_weight: float | None = None,
        clustering_weight: float | None = None,
        similarity_resolution: float | Literal["paper", "half"] | None = None,
        depict_weight: float = 0.0,
        anchor_weight: float = 1.0,
        knn_neighbors: int = 10,
        knn_metric: str = "euclidean",
        knn_threshold: float | None = None,
        knn_far_fraction: float | None = None,
        knn_rule: K.KnnRule = "knn",
        centre_decay: float = 0.9,
    ):
        super().__init__(adata)
        if likelihood not in K.LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {K.LIKELIHOODS}, got {likelihood!r}.")
        if knn_metric not in KNN_METRICS:
            raise ValueError(f"knn_metric must be one of {KNN_METRICS}, got {knn_metric!r}.")
        if knn_far_fraction is not None and not (
            isinstance(knn_far_fraction, int | float) and 0.0 < knn_far_fraction <= 1.0
        ):
            raise ValueError(
                f"knn_far_fraction must be None or a number in (0, 1], got {knn_far_fraction!r}."
            )
        if knn_rule not in K.KNN_RULES:
            raise ValueError(f"knn_rule must be one of {K.KNN_RULES}, got {knn_rule!r}.")
        if knn_rule != "knn" and (knn_far_fraction is not None or knn_threshold is not None):
            raise ValueError(
                "knn_far_fraction and knn_threshold apply to knn_rule='knn' only, "
                f"got knn_rule={knn_rule!r}."
            )
        setup = self.adata_manager.registry["setup_args"]
        V.check_likelihood_data(adata, setup["layer"], likelihood)

        class_names = self._class_names()
        if kl_weight is None:
            kl_weight = 2.0 if class_names else 0.0
        if clustering_weight is None:
            clustering_weight = 0.8 if class_names else UNSUPERVISED_CLUSTERING_WEIGHT
        if n_experts is None:
            n_experts = len(class_names) + 1 if class_names else UNSUPERVISED_N_EXPERTS
        if similarity_resolution is None:
            similarity_resolution = "paper" if class_names else UNSUPERVISED_RESOLUTION
        V.check_resolution(similarity_resolution)
        V.check_model_params(
            sizes={
                "n_experts": n_experts,
                "n_latent": n_latent,
                "n_hidden": n_hidden,
                "n_layers": n_layers,
                "n_hidden_gate": n_hidden_gate,
                "n_layers_gate": n_layers_gate,
                "knn_neighbors": knn_neighbors,
            },
            weights={
                "kl_weight": kl_weight,
                "clustering_weight": clustering_weight,
                "depict_weight": depict_weight,
                "anchor_weight": anchor_weight,
            },
            fractions={"gate_dropout": gate_dropout, "centre_decay": centre_decay},
            knn_threshold=knn_threshold,
        )
        if n_experts < len(class_names):
            source = "signatures" if setup.get("signatures") else "label classes"
            raise ValueError(
                f"n_experts={n_experts} is smaller than the number of {source} "
                f"({len(class_names)}); every class needs its own expert."
            )
        use_labels = setup.get("labels_key") is not None
        use_embedding = setup.get("embedding_key") is not None
        use_graph = setup.get("graph_key") is not None
        if use_embedding:
            V.warn_degenerate_metric(adata.obsm[setup["embedding_key"]].shape[1], knn_metric)
        scorer = self._build_signature_scorer(adata)
        if not (use_labels or use_embedding or use_graph or scorer is not None):
            warnings.warn(
                "No similarity source registered (labels_key, signatures, embedding_key or "
                "graph_key): the "
                "gate is trained by the DEPICT loss alone. For the paper's unsupervised kNN "
                "similarity register embedding_key: 'X_umap' from scmoesim.pp.umap_embedding "
                "(command line: --umap), or e.g. 'X_pca'.",
                UserWarning,
                stacklevel=2,
            )
        n_batch = self.summary_stats.n_batch
        # kept to build fresh modules for train(n_restarts=...)
        self._module_kwargs = dict(
            n_input=self.summary_stats.n_vars,
            n_experts=int(n_experts),
            n_latent=n_latent,
            n_batch=n_batch,
            likelihood=likelihood,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_hidden_gate=n_hidden_gate,
            n_layers_gate=n_layers_gate,
            gate_dropout=gate_dropout,
            activation_fn=activation_fn,
            dispersion=dispersion,
            kl=kl,
            kl_weight=kl_weight,
            clustering_weight=clustering_weight,
            similarity_resolution=(
                None
                if similarity_resolution == "paper"
                else 0.0
                if similarity_resolution == "half"
                else float(similarity_resolution)
            ),
            depict_weight=depict_weight,
            anchor_weight=anchor_weight,
            use_labels=use_labels,
            signature_scorer=scorer,
            use_embedding=use_embedding,
            use_graph=use_graph,
            knn_neighbors=knn_neighbors,
            knn_metric=knn_metric,
            knn_threshold=knn_threshold,
            knn_far_fraction=knn_far_fraction,
            knn_rule=knn_rule,
            centre_decay=centre_decay,
        )
        self.module = self._module_cls(**self._module_kwargs)
        self.restarts_ = None  # set by train(n_restarts > 1)
        self.cluster_names_ = self._default_cluster_names(int(n_experts))
        self._model_summary_string = (
            f"MoESim: {n_experts} experts, n_latent={n_latent}, likelihood={likelihood!r}, "
            f"kl={kl!r}, similarity: {', '.join(self._source_names()) or 'none'}"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str | int | float = "unknown",
        signatures: Mapping[str, Sequence[str]] | None = None,
        signature_threshold: float = 0.0,
        embedding_key: str | None = None,
        graph_key: str | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData for :class:`MoESim` and choose the similarity sources.

        Parameters
        ----------
        adata
            Cells x genes. Raw counts for count likelihoods.
        layer
            Layer with the data; ``None`` uses ``adata.X``.
        batch_key
            obs column of a technical covariate given to the decoders (as in scVI).
        labels_key
            obs column of (possibly partial) labels. Cells sharing a label are similar, cells
            with different labels dissimilar; cells with NaN or ``unlabeled_category`` carry no
            label (they still train everything else).
        unlabeled_category
            Value marking unlabeled cells in ``labels_key``.
        signatures
            Marker-gene signatures ``{name: [genes]}`` (weak supervision). A cell carries a
            signature when the mean standardised expression of its markers is above
            ``signature_threshold`` (for one marker and threshold 0: the paper's "above the
            gene's average expression"); cells carrying exactly one signature act as labelled,
            cells with none or several are left out of the similarity. Expression is
            log-normalised counts for count data, the values as given otherwise.
        signature_threshold
            Threshold on the signature score, in standard deviations.
        embedding_key
            obsm key (e.g. ``"X_pca"``, ``"X_umap"``) for the unsupervised kNN similarity
            within each minibatch.
        graph_key
            obsp key of a precomputed cell-cell graph (e.g. ``"connectivities"`` from
            :func:`scmoesim.pp.neighbors` or ``sc.pp.neighbors``), sliced to each minibatch:
            linked cells are similar. Unlinked pairs are dissimilar when the graph is the only
            unsupervised source; with ``embedding_key`` as well, the kNN similarity decides
            them. Registered as per-cell neighbour lists in
            ``adata.obsm["_scmoesim_graph"]`` (at most 2**24 cells).

        Notes
        -----
        When several sources are given, for every pair of cells the first source that knows
        the pair decides it, in the order labels > signatures > graph > kNN: known labels
        override signatures, and the graph and then the kNN similarity fill in the pairs the
        others leave unknown.

        Like every scvi-tools model, registration writes ``adata.obs["_scvi_batch"]``,
        ``adata.uns["_scvi_uuid"]`` and ``adata.uns["_scvi_manager_uuid"]``; with
        ``labels_key`` also ``adata.obs["_scvi_labels"]`` (label codes, -1 for unlabeled), and
        with ``graph_key`` ``adata.obsm["_scmoesim_graph"]``; nothing else in ``adata`` is
        changed.
        Cells or genes that are 0 everywhere are kept, with a warning.
        """
        V.check_adata_basics(adata, layer)
        V.warn_all_zero(adata, layer)
        V.check_obs_key(adata, batch_key, "batch_key")
        V.check_batch_values(adata, batch_key)
        # MoESim.load sets up a query against the saved registry: a query may have no labels
        # (the column missing or every cell unlabelled; all its cells are then unknown)
        if labels_key is not None and "source_registry" not in kwargs:
            V.check_obs_key(adata, labels_key, "labels_key")
            V.check_labels(adata, labels_key, unlabeled_category)
        V.check_embedding(adata, embedding_key)
        if signatures is not None:
            signatures = validate_signatures(signatures, adata.var_names)
            _warn_overlapping_genes(signatures)
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = [
            LayerField(K.X_KEY, layer, is_count_data=False),
            CategoricalObsField(K.BATCH_KEY, batch_key),
        ]
        if labels_key is not None:
            fields.append(PartialLabelsObsField(K.LABELS_KEY, labels_key, unlabeled_category))
        if embedding_key is not None:
            fields.append(ObsmField(K.EMBEDDING_KEY, embedding_key))
        if graph_key is not None:
            fields.append(GraphNeighborsField(K.GRAPH_KEY, graph_key))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ train
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_epochs: int = 1,
        ckpt_path: str | os.PathLike | None = None,
        n_restarts: int = 1,
        **trainer_kwargs,
    ) -> None:
        """Train with Lightning (uses a GPU when one is available).

        Parameters
        ----------
        max_epochs
            Passes over the data; default from scvi-tools' heuristic (400 for small data,
            fewer for large).
        batch_size
            Minibatch size (paper, Tabula Muris: 256). The similarity is built per minibatch.
            The last, incomplete minibatch of each epoch is dropped (the cells are reshuffled
            every epoch, so all of them are used): the pairwise similarity of a few cells is not
            that of a full minibatch. With the kNN source, 10 neighbours among the 11 cells
            left over would call every pair similar and, one step in four on an 865-cell
            dataset, pull all cells towards one expert. Pass
            ``datasplitter_kwargs={"drop_last": False}`` to keep it. When the training split
            (per process, with several ``devices``) is smaller than ``batch_size``, it is one
            minibatch of all its cells. A call in which no training step runs warns and
            leaves the model as it was.
        lr
            Adam learning rate (paper: 1e-3).
        accelerator, devices
            Lightning device selection, e.g. ``accelerator="gpu", devices=2,
            strategy="ddp"`` for multi-GPU (``"ddp_notebook"`` in Jupyter). ``batch_size`` is
            per process; the EM cluster centres are all-reduced so every process holds the
            same ones.
        train_size, validation_size
            Split passed to scvi-tools' data splitter (default 90/10).
        early_stopping
            Stop on the validation ELBO.
        plan_kwargs
            Keyword arguments of :class:`~scmoesim.train.MoESimTrainingPlan`; unknown names
            raise before training starts. ``n_epochs_similarity_warmup`` (default 0, the
            paper's schedule) holds the clustering loss off for that many epochs at the
            start, so that the gate learns on a latent space that already separates the
            cells (docs/model.md, "Similarity warm-up").
        checkpoint_dir
            Directory where a Lightning checkpoint ``last.ckpt`` is written every
            ``checkpoint_every_n_epochs`` epochs and after the last epoch (written under a
            temporary name, then renamed, so it is never half-written). It holds the weights,
            the EM sums of the cluster centres, the optimizer state, the epoch, the random
            number generator states and the loss history.
        checkpoint_every_n_epochs
            How often to write the checkpoint.
        ckpt_path
            Resume an interrupted training from a checkpoint: a ``.ckpt`` file or a
            ``checkpoint_dir`` (its ``last.ckpt`` is used). Create the model with the same
            AnnData and parameters and set the same ``scvi.settings.seed`` as the first run;
            ``max_epochs`` counts from the start of the first run. A mismatching model raises
            before training. Combine with ``checkpoint_dir`` to keep writing checkpoints.
        n_restarts
            Train this many initialisations and keep the one whose gate fits its similarity
            best: the lowest similarity loss over all cells after training (no labels are
            used), as ``n_init`` does for k-means. Restart 0 is the model as created; restart
            ``r`` seeds torch, numpy and ``random`` with ``scvi.settings.seed + r`` and trains
            a fresh module on the same training cells. Costs ``n_restarts`` trainings.
            ``model.restarts_`` lists each restart's loss, number of clusters and epochs.
            Needs an untrained model with a similarity source, and no ``checkpoint_dir`` or
            ``ckpt_path``; user callbacks are shared by the restarts. A lower similarity loss
            agreed with the cell types on cytometry, MNIST and mixtures but not on two
            scRNA-seq datasets, so it is not a default (``docs/model.md``, "Restarts").
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` / Lightning, except ``datasplitter_kwargs``,
            which goes to scvi-tools' data splitter (``drop_last`` is ``True`` by default, see
            ``batch_size``).

        Notes
        -----
        Set ``scvi.settings.seed`` before creating the model for reproducible results; on the
        CPU two runs with the same seed are identical (weights, latent space, clusters and
        history), and a training resumed from a checkpoint ends with the same weights as an
        uninterrupted one. On a GPU the random draws (shuffling, dropout, sampling of z) are
        the same for the same seed, but PyTorch does not promise bit-identical results: some
        CUDA kernels (cuBLAS with several streams, the backward pass of indexing and scatter
        operations) may add floating-point numbers in a run-dependent order, so results can
        differ in the last bits and, over many steps, a few borderline cells may change
        cluster. For repeatable GPU runs pass ``deterministic=True`` (a Lightning trainer
        argument; also set the environment variable ``CUBLAS_WORKSPACE_CONFIG=:4096:8``), which
        makes PyTorch use deterministic kernels, at some cost in speed. Results on a CPU and on
        a GPU (or on two GPU models) differ in any case.

        Interrupting training (Ctrl-C) keeps the
        model with its last weights, with a warning, instead of exiting; with ``checkpoint_dir``
        the training can later be resumed with ``ckpt_path``. Every loss term is
        recorded in ``model.history`` (``reconstruction_loss_train``, ``similarity_loss_train``,
        ``depict_loss_train``, ``kl_divergence_train``, ...).
        """
        check_restarts(self, n_restarts, ckpt_path, checkpoint_dir)
        plan_kwargs = V.as_kwargs(plan_kwargs, "plan_kwargs")
        unknown = sorted(set(plan_kwargs) - MoESimTrainingPlan.valid_kwargs())
        if unknown:
            raise TypeError(
                f"Unknown plan_kwargs {unknown}; valid names: "
                f"{sorted(MoESimTrainingPlan.valid_kwargs())}."
            )
        check_plan_values({"lr": lr, **plan_kwargs})
        if str(trainer_kwargs.get("precision", 32)) not in ("None", "32", "32-true"):
            raise ValueError(
                f"precision={trainer_kwargs['precision']!r} is not supported: the grouped "
                "experts and the pair loss compute in float32; leave precision at its default."
            )
        if not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}.")
        V.check_enough_cells(self.adata.n_obs, train_size)
        datasplitter_kwargs = V.as_kwargs(
            trainer_kwargs.pop("datasplitter_kwargs", None), "datasplitter_kwargs"
        )
        datasplitter_kwargs.setdefault("drop_last", True)
        if datasplitter_kwargs["drop_last"]:
            # one full minibatch when the training split (per process) is smaller than batch_size
            n_procs = V.n_processes(devices, trainer_kwargs.get("num_nodes", 1))
            per_process = -(-V.n_train_cells(self.adata.n_obs, train_size) // n_procs)
            batch_size = max(2, min(batch_size, per_process))
        plan_kwargs.setdefault("lr", lr)
        trainer_kwargs.setdefault("check_val_every_n_epoch", None)
        user_callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        if ckpt_path is not None:
            ckpt_path = resolve_checkpoint(ckpt_path)
            done = epochs_done(check_checkpoint_fits(ckpt_path, self.module))
            planned = max_epochs if max_epochs is not None else max_epochs_heuristic(self.adata)
            # max_epochs=-1 (no limit) or max_steps: Lightning stops on steps, not epochs
            by_steps = planned < 0 or trainer_kwargs.get("max_steps", -1) not in (-1, None)
            if done is not None and not by_steps and done >= planned:
                # Lightning would restore the weights and run no step
                raise ValueError(
                    f"The checkpoint {os.fspath(ckpt_path)!r} already holds {done} epochs and "
                    f"max_epochs={planned} counts from the start of the first run: nothing is "
                    "left to train. Pass a larger max_epochs to train on."
                )
            trainer_kwargs["ckpt_path"] = str(ckpt_path)
        if checkpoint_dir is not None or ckpt_path is not None:
            user_callbacks.append(PeriodicCheckpoint(checkpoint_dir, checkpoint_every_n_epochs))
        fit_kwargs = {
            "max_epochs": max_epochs,
            "accelerator": accelerator,
            "devices": devices,
            "train_size": train_size,
            "validation_size": validation_size,
            "batch_size": batch_size,
            "early_stopping": early_stopping,
            "datasplitter_kwargs": datasplitter_kwargs,
            **trainer_kwargs,
        }

        # whether a Ctrl-C stopped this call (the command line then writes nothing)
        self._interrupted = False

        def fit() -> tuple[bool, bool]:
            # a copy of plan_kwargs per training: the plan may consume it
            trained, interrupted = self._fit_once(fit_kwargs, dict(plan_kwargs), user_callbacks)
            self._interrupted = interrupted
            return trained, interrupted

        if n_restarts == 1:
            trained = fit()[0]
        else:
            trained = train_with_restarts(self, n_restarts, fit, batch_size)
        if trained:
            self._summarise_training_data()

    def _fit_once(self, fit_kwargs: dict, plan_kwargs: dict, callbacks: list) -> tuple[bool, bool]:
        """One scvi-tools training of ``self.module``: ``(a step ran, interrupted by the user)``.

        Keeps the model after a Ctrl-C (with a warning) and leaves an untrained model untrained
        when no step ran (with a warning).
        """
        flag = InterruptFlag()
        rows, was_trained = _history_rows(self.history_), self.is_trained_
        try:
            super().train(plan_kwargs=plan_kwargs, callbacks=[*callbacks, flag], **fit_kwargs)
        except SystemExit:
            if not flag.interrupted:
                raise
            # Lightning exits the process after a Ctrl-C; keep the model with its last weights.
            warnings.warn(
                f"Training interrupted by the user after {flag.epochs_done} epoch(s); the model "
                "keeps its last weights and can be used, saved or trained further.",
                UserWarning,
                stacklevel=4,
            )
            self.module.eval()
            self.is_trained_ = True
        # a step ran: counted by the flag in this process (any logger, or none), or logged
        # (ddp_spawn trains in other processes; the history comes back, the flag does not)
        stepped = flag.steps > 0 or _history_rows(self.history_) > rows
        if not flag.interrupted and fit_kwargs["max_epochs"] != 0 and not stepped:
            # a model that was untrained stays untrained, so the next call starts a fresh history
            # (scvi-tools only extends the metrics a trained model already has)
            self.is_trained_ = was_trained
            warnings.warn(
                "No training step ran: this call left the weights unchanged. The training split "
                f"gave no minibatch of batch_size={fit_kwargs['batch_size']} (cells are split "
                "over the processes with several devices; the last incomplete minibatch is "
                "dropped), or the trainer was told to skip training (limit_train_batches=0).",
                UserWarning,
                stacklevel=4,
            )
            return False, False  # unchanged weights: the last training's summary still holds
        return True, flag.interrupted

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs,
    ) -> None:
        """Save the model (weights, cluster names, settings) to a directory.

        Records the versions of scmoesim, scvi-tools, torch, lightning, anndata and numpy in
        ``model.saved_with_``; :meth:`load` compares them. Refuses to write into an existing
        path unless ``overwrite=True``. Other arguments as in
        :meth:`scvi.model.base.BaseModelClass.save`.
        """
        _io.check_save_target(dir_path, overwrite)
        self.saved_with_ = _io.package_versions()
        super().save(
            os.fspath(dir_path),
            prefix=prefix,
            overwrite=overwrite,
            save_anndata=save_anndata,
            **kwargs,
        )

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs,
    ) -> "MoESim":
        """Load a saved model, checking versions and genes first.

        Warns, naming both versions, when the model was saved by another scmoesim (or
        scvi-tools) version, and raises a clear error when its weights no longer fit. Raises
        when ``adata``'s genes differ from the model's (listing missing and extra genes, or the
        first reordered one). Other arguments as in :meth:`scvi.model.base.BaseModelClass.load`.
        """
        saved = _io.check_before_load(cls, dir_path, adata, prefix)
        with _io.clear_state_errors(saved["saved_with"]):
            return super().load(
                os.fspath(dir_path),
                adata=adata,
                accelerator=accelerator,
                device=device,
                prefix=prefix,
                **kwargs,
            )

    # ------------------------------------------------------------------ helpers
    def _source_names(self) -> list[str]:
        setup = self.adata_manager.registry["setup_args"]
        names = []
        if setup.get("labels_key") is not None:
            names.append(f"labels ({setup['labels_key']})")
        if setup.get("signatures"):
            names.append(f"{len(setup['signatures'])} signatures")
        if setup.get("embedding_key") is not None:
            names.append(f"kNN on obsm[{setup['embedding_key']!r}]")
        if setup.get("graph_key") is not None:
            names.append(f"graph obsp[{setup['graph_key']!r}]")
        return names

    def _class_names(self) -> list[str]:
        """Names that clusters can be matched to: label classes, else signature names."""
        setup = self.adata_manager.registry["setup_args"]
        if setup.get("labels_key") is not None:
            mapping = self.adata_manager.get_state_registry(K.LABELS_KEY).categorical_mapping
            return [str(c) for c in mapping]
        if setup.get("signatures"):
            return list(setup["signatures"])
        return []

    def _build_signature_scorer(self, adata: AnnData) -> SignatureScorer | None:
        setup = self.adata_manager.registry["setup_args"]
        if not setup.get("signatures"):
            return None
        layer = setup["layer"]
        return SignatureScorer.from_adata_matrix(
            V.get_matrix(adata, layer),
            adata.var_names,
            setup["signatures"],
            normalize=V.is_count_matrix(adata, layer),
            threshold=float(setup.get("signature_threshold", 0.0)),
        )


def _warn_overlapping_genes(signatures: dict[str, list[str]]) -> None:
    seen: dict[str, str] = {}
    for name, genes in signatures.items():
        for g in genes:
            if g in seen and seen[g] != name:
                warnings.warn(
                    f"Gene {g!r} is a marker of both {seen[g]!r} and {name!r}; cells high in it "
                    "may carry both signatures and then count as unknown.",
                    UserWarning,
                    stacklevel=3,
                )
            seen.setdefault(g, name)


def _history_rows(history: dict | None) -> int:
    """Logged rows over every metric of ``model.history`` (grows when a training step ran)."""
    return sum(len(v) for v in (history or {}).values())


def max_epochs_heuristic(adata) -> int:
    """scvi-tools' default ``max_epochs`` for this many cells (what ``train`` uses for None)."""
    from scvi.model._utils import get_max_epochs_heuristic

    return int(get_max_epochs_heuristic(adata.n_obs))
