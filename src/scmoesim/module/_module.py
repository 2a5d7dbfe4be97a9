"""MoE-Sim-VAE as an scvi-tools module: inference, generative model and loss."""

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scmoesim import _constants as K
from scmoesim.nn import MLP, RoutedExperts
from scmoesim.similarity import (
    SignatureScorer,
    combine_similarities,
    graph_list_similarity,
    knn_band_similarity,
    knn_components_similarity,
    knn_similarity,
    label_similarity,
)

from ._likelihoods import expert_heads, make_distribution, reconstruction_nll
from ._losses import anchor_loss, depict_loss, kl_mixture, kl_paper, similarity_bce
from ._sampling import sample_sparse_counts, scaled_softmax_

#: Loss terms the module reports besides scvi-tools' ELBO terms (``LossOutput.extra_metrics``),
#: logged as ``{term}_train`` and ``{term}_validation``.
LOGGED_TERMS = (
    "kl_divergence",
    "similarity_loss",
    "depict_loss",
    "anchor_loss",
    "clustering_loss",
    "known_pair_fraction",
)


class MoESimModule(BaseModuleClass):
    """Encoder, gating network and K routed expert decoders (MoE-Sim-VAE).

    Parameters
    ----------
    n_input
        Number of genes (features).
    n_experts
        Number of experts / clusters K.
    n_latent
        Dimension of z.
    n_batch
        Number of batch categories (the decoders see the batch when > 1).
    likelihood
        ``"nb"``, ``"zinb"``, ``"poisson"``, ``"normal"`` or ``"bernoulli"``.
    n_hidden, n_layers
        Width and depth of the encoder and of every expert.
    n_hidden_gate, n_layers_gate, gate_dropout
        Width, depth and dropout of the gating (clustering) network.
    encoder_dropout
        Dropout in the encoder.
    activation_fn
        ``"elu"`` (paper, scRNA-seq) or ``"relu"`` (paper, CyTOF).
    dispersion
        ``"gene"`` (one NB dispersion / Gaussian scale per gene) or ``"gene-expert"`` (per gene
        and expert).
    kl
        ``"mixture"``: ``KL(q(z|x) || N(mu_k, I))`` to the centre of the cell's cluster; or
        ``"paper"``: Eq. 3, each cluster's variance of z pushed towards 1.
    kl_weight
        pi_1, weight of the KL term.
    clustering_weight
        Weight of the clustering loss (similarity + pi_2 DEPICT).
    similarity_resolution
        Weight of the dissimilar pairs in the similarity loss relative to their share of the
        minibatch (:func:`~scmoesim.module.similarity_bce`); ``None``: every pair weighs 1.
    depict_weight
        pi_2, weight of the DEPICT term inside the clustering loss.
    use_labels
        Whether minibatches carry label codes (``-1`` unknown) for the label similarity.
    signature_scorer
        Turns expression into signature codes for the signature similarity.
    use_embedding, knn_neighbors, knn_metric, knn_threshold
        kNN similarity over a registered embedding.
    use_graph
        Whether minibatches carry rows of a registered neighbour table
        (:func:`~scmoesim.similarity.neighbor_table`) for the graph similarity.
    knn_far_fraction
        ``None``: every non-neighbour pair is dissimilar (:func:`knn_similarity`); a fraction:
        only pairs beyond that rank fraction of the minibatch are dissimilar, the rest unknown
        (:func:`knn_band_similarity`).
    knn_rule
        ``"knn"``: the pairwise kNN rule above; ``"components"`` / ``"mutual_components"``:
        cells in one connected component of the minibatch's (mutual) kNN graph are similar,
        the rest dissimilar (:func:`knn_components_similarity`; with the mutual graph, pairs
        with an isolated cell are unknown).
    centre_decay
        Decay of the running (EM) sums that define the cluster centres.
    normalize_input
        Count likelihoods: encode ``log1p(10^4 x / library)`` (default) rather than
        ``log1p(x)`` (scVI's choice), so z does not carry sequencing depth.
    """

    def __init__(
        self,
        n_input: int,
        n_experts: int,
        n_latent: int = 20,
        n_batch: int = 0,
        likelihood: K.Likelihood = "nb",
        n_hidden: int = 128,
        n_layers: int = 1,
        n_hidden_gate: int = 100,
        n_layers_gate: int = 1,
        gate_dropout: float = 0.5,
        encoder_dropout: float = 0.1,
        activation_fn: str = "elu",
        dispersion: str = "gene",
        kl: K.KLKind = "mixture",
        kl_weight: float = 1.0,
        clustering_weight: float = 1.0,
        similarity_resolution: float | None = None,
        depict_weight: float = 0.0,
        anchor_weight: float = 0.0,
        use_labels: bool = False,
        signature_scorer: SignatureScorer | None = None,
        use_embedding: bool = False,
        use_graph: bool = False,
        knn_neighbors: int = 10,
        knn_metric: str = "euclidean",
        knn_threshold: float | None = None,
        knn_far_fraction: float | None = None,
        knn_rule: str = "knn",
        centre_decay: float = 0.9,
        normalize_input: bool = True,
    ):
        super().__init__()
        if likelihood not in K.LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {K.LIKELIHOODS}, got {likelihood!r}.")
        if kl not in ("mixture", "paper"):
            raise ValueError(f"kl must be 'mixture' or 'paper', got {kl!r}.")
        if dispersion not in ("gene", "gene-expert"):
            raise ValueError(f"dispersion must be 'gene' or 'gene-expert', got {dispersion!r}.")
        self.n_input = n_input
        self.n_experts = n_experts
        self.n_latent = n_latent
        self.n_batch = n_batch
        self.likelihood = likelihood
        self.kl = kl
        self.kl_weight = kl_weight
        self.clustering_weight = clustering_weight
        self.similarity_resolution = similarity_resolution
        self.depict_weight = depict_weight
        self.anchor_weight = anchor_weight
        self.dispersion = dispersion
        self.use_labels = use_labels
        self.use_embedding = use_embedding
        self.use_graph = use_graph
        self.knn_neighbors = knn_neighbors
        self.knn_metric = knn_metric
        self.knn_threshold = knn_threshold
        self.knn_far_fraction = knn_far_fraction
        self.knn_rule = knn_rule
        self.centre_decay = centre_decay
        self.is_count = likelihood in K.COUNT_LIKELIHOODS
        self.normalize_input = normalize_input

        self.encoder = MLP(n_input, n_hidden, n_layers, "batch", activation_fn, encoder_dropout)
        self.z_mean = nn.Linear(n_hidden, n_latent)
        self.z_logvar = nn.Linear(n_hidden, n_latent)
        self.gate = MLP(n_latent, n_hidden_gate, n_layers_gate, "none", activation_fn, gate_dropout)
        self.gate_out = nn.Linear(n_hidden_gate, n_experts)
        n_cat = n_batch if n_batch > 1 else 0
        self.experts = RoutedExperts(
            n_experts,
            n_latent,
            expert_heads(likelihood, n_input),
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_cat=n_cat,
            activation_fn=activation_fn,
        )
        if likelihood in ("nb", "zinb", "normal"):
            rows = n_experts if dispersion == "gene-expert" else 1
            self.log_dispersion = nn.Parameter(torch.zeros(rows, n_input))
        self.signature_scorer = signature_scorer

        # Running EM sums of Eq. 6; all buffers are created here so that `load` restores them.
        self.register_buffer("centre_init", torch.randn(n_experts, n_latent))
        self.register_buffer("centre_sum", torch.zeros(n_experts, n_latent))
        self.register_buffer("centre_weight", torch.zeros(n_experts))

    # ------------------------------------------------------------------ state
    @property
    def centres(self) -> torch.Tensor:
        """``(K, n_latent)`` cluster centres ``mu_k`` (running EM estimate, paper Eq. 6)."""
        seen = self.centre_weight > 1e-3
        est = self.centre_sum / self.centre_weight.clamp_min(1e-3)[:, None]
        return torch.where(seen[:, None], est, self.centre_init)

    @torch.no_grad()
    def update_centres(self, sum_pz: torch.Tensor, sum_p: torch.Tensor) -> None:
        """EM step for the centres from minibatch sums ``sum_i p_ik z_i`` and ``sum_i p_ik``."""
        self.centre_sum.mul_(self.centre_decay).add_(sum_pz)
        self.centre_weight.mul_(self.centre_decay).add_(sum_p)

    def dispersion_for(self, expert: torch.Tensor) -> torch.Tensor | None:
        """Per-cell NB inverse dispersion or Gaussian scale (``None`` if unused)."""
        table, rows = self.dispersion_table(expert)
        return table if rows is None else table[rows]

    def dispersion_table(
        self, expert: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """NB inverse dispersion (or Gaussian scale) as a table and each cell's row in it.

        ``(exp(log_dispersion), expert)`` for ``dispersion="gene-expert"`` (one row per
        expert: no per-cell copy), ``(exp(log_dispersion), None)`` for one shared row, and
        ``(None, None)`` when the likelihood has no such parameter.
        """
        if not hasattr(self, "log_dispersion"):
            return None, None
        table = torch.exp(self.log_dispersion)
        return table, (expert if self.dispersion == "gene-expert" else None)

    # ------------------------------------------------------------------ forward
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {"x": tensors[K.X_KEY], "batch_index": tensors.get(K.BATCH_KEY)}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict
    ) -> dict:
        return {
            "z": inference_outputs["z"],
            "expert": inference_outputs["expert"],
            "library": inference_outputs["library"],
            "batch_index": tensors.get(K.BATCH_KEY),
        }

    def gate_logits(self, z: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        """Logits of the gating network; ``dropout=True`` gives the noisy DEPICT pass."""
        return self.gate_out(self.gate(z, dropout=dropout))

    @auto_move_data
    def inference(
        self, x: torch.Tensor, batch_index: torch.Tensor | None = None, use_mean: bool = False
    ) -> dict[str, torch.Tensor]:
        """Encode ``x``, sample z, run the gate and route each cell to its argmax expert."""
        if self.is_count:
            library = x.sum(1, keepdim=True)
            # Depth-normalised input: the decoders get the library size explicitly, so the
            # encoder need not (and should not) encode sequencing depth in z.
            x_in = (
                torch.log1p(x / library.clamp_min(1.0) * 1e4)
                if self.normalize_input
                else (torch.log1p(x))
            )
        else:
            library, x_in = None, x
        h = self.encoder(x_in)
        qz_m = self.z_mean(h)
        qz_v = torch.exp(self.z_logvar(h).clamp(-15.0, 15.0)) + 1e-4
        z = qz_m if use_mean else qz_m + qz_v.sqrt() * torch.randn_like(qz_m)
        logits = self.gate_logits(z)
        p = torch.softmax(logits, dim=-1)
        return {
            "qz_m": qz_m,
            "qz_v": qz_v,
            "z": z,
            "logits": logits,
            "p": p,
            "expert": p.argmax(-1),
            "library": library,
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        expert: torch.Tensor,
        library: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> dict:
        """Decode every cell with its own expert and build the data distribution."""
        heads = self.experts(z, expert, batch_index if self.experts.n_cat > 0 else None)
        px = make_distribution(self.likelihood, heads, library, self.dispersion_for(expert))
        return {"px": px, "heads": heads}

    # ------------------------------------------------------------------ similarity
    def known_classes(
        self, tensors: dict[str, torch.Tensor], library: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per-source ``(n,)`` class codes of a minibatch (labels, then signatures; -1 unknown)."""
        codes = []
        if self.use_labels:
            codes.append(tensors[K.LABELS_KEY].reshape(-1).round().long())
        if self.signature_scorer is not None:
            codes.append(self.signature_scorer(tensors[K.X_KEY], library))
        return codes

    def minibatch_similarity(
        self,
        tensors: dict[str, torch.Tensor],
        library: torch.Tensor | None = None,
        codes: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Combined ``(S, mask)`` for a minibatch (labels > signatures > graph > kNN), or ``None``.

        The graph knows its edges; its unlinked pairs are dissimilar only without an embedding
        (with one, the kNN source decides them).
        """
        if codes is None:
            codes = self.known_classes(tensors, library)
        sources = [label_similarity(c) for c in codes]
        if self.use_graph:
            sources.append(
                graph_list_similarity(tensors[K.GRAPH_KEY], unlinked_known=not self.use_embedding)
            )
        if self.use_embedding:
            emb = tensors[K.EMBEDDING_KEY].float()
            if self.knn_rule in ("components", "mutual_components"):
                mutual = self.knn_rule == "mutual_components"
                knn = knn_components_similarity(
                    emb,
                    self.knn_neighbors,
                    self.knn_metric,
                    mutual=mutual,
                    min_component_size=2 if mutual else 1,
                )
            elif self.knn_far_fraction is None:
                knn = knn_similarity(emb, self.knn_neighbors, self.knn_metric, self.knn_threshold)
            else:
                knn = knn_band_similarity(
                    emb,
                    self.knn_neighbors,
                    self.knn_far_fraction,
                    self.knn_metric,
                    self.knn_threshold,
                )
            sources.append(knn)
        if not sources:
            return None
        return combine_similarities(sources)

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        clustering_scale: float = 1.0,
    ) -> LossOutput:
        """Eq. 11: reconstruction + pi_1 KL + clustering weight (similarity + pi_2 DEPICT).

        ``clustering_scale`` multiplies the clustering terms; the training plan sets it to 0
        during the similarity warm-up, when they are not computed at all (and logged as 0).
        """
        x = tensors[K.X_KEY]
        p = inference_outputs["p"]
        z = inference_outputs["z"]
        rec = reconstruction_nll(self.likelihood, generative_outputs["px"], x)

        if self.kl == "mixture":
            centres = self.centres[inference_outputs["expert"]]
            kl = kl_mixture(inference_outputs["qz_m"], inference_outputs["qz_v"], centres)
        else:
            kl = kl_paper(z, p).expand(x.shape[0])
        kl_scaled = kl_weight * self.kl_weight * kl

        if clustering_scale == 0:  # similarity warm-up: nothing to compute
            sim = depict = anchor = known = torch.zeros((), device=x.device)
        else:
            sim, depict, anchor, known = self._clustering_terms(tensors, inference_outputs)
        clustering = (clustering_scale * self.clustering_weight) * (
            sim + self.depict_weight * depict + self.anchor_weight * anchor
        )
        loss = (rec + kl_scaled).mean() + clustering
        return LossOutput(
            loss=loss,
            reconstruction_loss=rec,
            kl_local=kl_scaled,
            extra_metrics={
                "kl_divergence": kl.mean().detach(),
                "similarity_loss": sim.detach(),
                "depict_loss": depict.detach(),
                "anchor_loss": anchor.detach(),
                "clustering_loss": clustering.detach(),
                "known_pair_fraction": known.detach(),
            },
        )

    def _clustering_terms(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Similarity, DEPICT and anchor losses of a minibatch, and its known pair fraction."""
        x = tensors[K.X_KEY]
        p = inference_outputs["p"]
        if self.depict_weight > 0:
            noisy = self.gate_logits(inference_outputs["z"], dropout=True)
            depict = depict_loss(p, torch.log_softmax(noisy, dim=-1)).mean()
        else:  # skip the noisy pass; still report the term for the record
            with torch.no_grad():
                depict = depict_loss(p, torch.log(p.clamp_min(1e-12))).mean()
        codes = self.known_classes(tensors, inference_outputs["library"])
        sim_mask = self.minibatch_similarity(tensors, codes=codes)
        if sim_mask is None:
            sim = torch.zeros((), device=x.device)
            known = torch.zeros((), device=x.device)
        else:
            sim, n_pairs = similarity_bce(p, *sim_mask, resolution=self.similarity_resolution)
            known = n_pairs / float(max(x.shape[0] * (x.shape[0] - 1), 1))
        # Class codes of the first source (labels, else signatures) index the experts directly.
        anchor = anchor_loss(p, codes[0]) if codes else torch.zeros((), device=x.device)
        return sim, depict, anchor, known

    # ------------------------------------------------------------------ expert splitting
    @torch.no_grad()
    def split_expert(
        self, source: int, target: int, normal: torch.Tensor, offset: float | torch.Tensor
    ) -> None:
        """Give part of expert ``source``'s cells to the unused expert ``target``.

        The gate's hidden layer ``h`` decides: cells with ``normal @ h > offset`` move to
        ``target``. Both experts keep the average of their logits at the old logit of
        ``source`` (so no other expert's cells move) and differ by ``normal @ h - offset``;
        ``target`` starts as a copy of ``source``'s decoder (and dispersion row), and the EM
        sums of the two centres are shared equally.
        """
        half = normal.to(self.gate_out.weight) / 2
        shift = torch.as_tensor(offset, dtype=half.dtype, device=half.device) / 2
        weight, bias = self.gate_out.weight, self.gate_out.bias
        w_source, b_source = weight[source].clone(), bias[source].clone()
        weight[target] = w_source + half
        bias[target] = b_source - shift
        weight[source] = w_source - half
        bias[source] = b_source + shift
        self.experts.copy_expert(source, target)
        if self.dispersion == "gene-expert" and hasattr(self, "log_dispersion"):
            self.log_dispersion[target] = self.log_dispersion[source]
        for buffer in (self.centre_sum, self.centre_weight):
            buffer[source] /= 2
            buffer[target] = buffer[source]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample_from_experts(
        self,
        expert: torch.Tensor,
        library: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        with_mean: bool = True,
        loc: torch.Tensor | None = None,
        scale_tril: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generate cells: ``z ~ N(mu_k, temperature^2 I)`` decoded by expert ``k``.

        With ``loc`` and ``scale_tril``: ``z ~ N(loc_k, temperature^2 L_k L_k^T)`` instead;
        with ``z``: those latent points.

        Parameters
        ----------
        expert
            ``(n,)`` expert (cluster) of each cell.
        library
            ``(n, 1)`` library sizes (count likelihoods).
        batch_index
            ``(n, 1)`` batch codes (when the experts were built with a batch covariate).
        temperature
            Scale of the latent noise.
        generator
            Random generator on the module's device (``None``: the global one).
        with_mean
            Return ``"mean"`` (``False`` saves its computation for ``zinb``, where it is not
            the decoder's mean itself; ``"mean"`` is then ``None``).
        loc, scale_tril
            ``(K, n_latent)`` means and ``(K, n_latent, n_latent)`` lower Cholesky factors of
            the latent distribution of each expert (``None``: the prior, ``mu_k`` and ``I``).
        z
            ``(n, n_latent)`` latent points to decode (``loc``, ``scale_tril`` and
            ``temperature`` are then not used).

        Returns
        -------
        ``"mean"``: ``(n, genes)`` expected values. Count likelihoods: ``"indptr"``, ``"cols"``,
        ``"values"``, the sampled counts as CSR parts (exact sampling, see
        :func:`~scmoesim.module._sampling.sample_sparse_counts`). ``"normal"``: ``"sample"``,
        ``(n, genes)`` draws. ``"bernoulli"``: ``"sample"`` is the mean (probabilities, as the
        model sees data scaled to [0, 1]).
        """
        expert = expert.long()
        if z is None:
            noise = torch.randn(
                expert.shape[0], self.n_latent, device=expert.device, generator=generator
            )
            if scale_tril is not None:
                noise = torch.bmm(scale_tril[expert], noise[:, :, None])[:, :, 0]
            z = (self.centres if loc is None else loc)[expert] + temperature * noise
        heads = self.experts.decode(z, expert, batch_index if self.experts.n_cat > 0 else None)
        if self.is_count:
            if library is None:
                raise ValueError("Count likelihoods need library sizes to generate counts.")
            mu = scaled_softmax_(heads["scale"], library)
            zi_logits = heads.get("dropout")
            theta, theta_index = self.dispersion_table(expert)
            indptr, cols, values = sample_sparse_counts(
                self.likelihood, mu, theta, zi_logits, generator, theta_index=theta_index
            )
            mean = mu
            if zi_logits is not None:
                mean = mu * torch.sigmoid(-zi_logits) if with_mean else None
            return {"mean": mean, "indptr": indptr, "cols": cols, "values": values}
        dispersion = self.dispersion_for(expert)
        loc = heads["loc"]
        if self.likelihood == "bernoulli":
            mean = torch.sigmoid(loc)
            return {"mean": mean, "sample": mean}
        noise = torch.randn(loc.shape, device=loc.device, dtype=loc.dtype, generator=generator)
        return {"mean": loc, "sample": loc + dispersion * noise}
