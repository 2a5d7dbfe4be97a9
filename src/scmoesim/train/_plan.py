import inspect

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from scvi.train import TrainingPlan


class InterruptFlag(Callback):
    """Remembers whether training stopped on a user interrupt (Ctrl-C / KeyboardInterrupt).

    Lightning shuts down gracefully on a KeyboardInterrupt and then raises ``SystemExit``;
    :meth:`scmoesim.MoESim.train` uses this flag to keep the model instead of exiting.
    """

    def __init__(self):
        self.interrupted = False
        self.epochs_done = 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        self.epochs_done = trainer.current_epoch + 1

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:  # noqa: D102
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True


class MoESimTrainingPlan(TrainingPlan):
    """scvi-tools :class:`~scvi.train.TrainingPlan` plus the EM step of the cluster centres.

    After each optimisation step the running sums that define the centres ``mu_k`` (paper Eq. 6)
    are updated from the minibatch's ``sum_i p_ik z_i`` and ``sum_i p_ik``. Under
    multi-process training (DDP) the sums are all-reduced first, so every process holds the same
    centres. Each loss term is logged (``similarity_loss_train``, ``depict_loss_train``, ...).

    Parameters
    ----------
    module
        A :class:`~scmoesim.module.MoESimModule`.
    n_epochs_kl_warmup
        Epochs over which the KL weight is annealed from 0 (``None``: no annealing).
    n_epochs_similarity_warmup
        Epochs at the start of training without the clustering loss (similarity, anchor and
        DEPICT terms): the encoder and the experts learn the data first, and the gate then
        meets a latent space that already separates the cells. The gate does not train during
        these epochs. 0 (default): no warm-up, the paper's schedule. ``max_epochs // 4``
        helped on well-separated mixtures but lowered Levine_32dim, pbmc68k_reduced and
        MNIST (``benchmarks/results_warmup.md``).
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan` (``lr``, ``weight_decay``, ...).
    """

    def __init__(
        self,
        module,
        *,
        n_epochs_kl_warmup: int | None = None,
        n_epochs_similarity_warmup: int = 0,
        **kwargs,
    ):
        if (
            isinstance(n_epochs_similarity_warmup, bool)
            or not isinstance(n_epochs_similarity_warmup, int)
            or n_epochs_similarity_warmup < 0
        ):
            raise ValueError(
                "n_epochs_similarity_warmup must be a non-negative integer, got "
                f"{n_epochs_similarity_warmup!r}."
            )
        super().__init__(module, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs)
        self.n_epochs_similarity_warmup = n_epochs_similarity_warmup

    @property
    def clustering_scale(self) -> float:
        """0 during the similarity warm-up, else 1."""
        return 0.0 if self.current_epoch < self.n_epochs_similarity_warmup else 1.0

    @classmethod
    def valid_kwargs(cls) -> set[str]:
        """Keyword arguments the plan accepts (checked before training starts)."""
        names = set(inspect.signature(TrainingPlan.__init__).parameters)
        names |= set(inspect.signature(cls.__init__).parameters)
        return names - {"self", "module", "loss_kwargs", "kwargs"}

    def _optimizer_creator_fn(self, optimizer_cls):
        """Adam / AdamW with PyTorch's fused kernel where the parameters' device supports it.

        The fused kernel updates all parameters in one pass; the default per-tensor loop was
        the largest cost of a CPU step with 25 experts (their stacked decoder weights hold most
        of the parameters). Same update rule, so results agree to float rounding.
        """

        def create(params):
            params = list(params)
            kwargs = {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay}
            try:
                return optimizer_cls(params, fused=True, **kwargs)
            except (RuntimeError, TypeError, ValueError):
                return optimizer_cls(params, **kwargs)

        return create

    def training_step(self, batch, batch_idx):
        """Optimisation step, then the EM update of the centres from this minibatch."""
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs.update({"kl_weight": self.kl_weight})
        self.loss_kwargs["clustering_scale"] = self.clustering_scale
        inference_outputs, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self.log(
            "train_loss",
            loss_output.loss,
            on_step=self.on_step,
            on_epoch=self.on_epoch,
            prog_bar=True,
            sync_dist=self.use_sync_dist,
        )
        self.compute_and_log_metrics(loss_output, self.train_metrics, "train")
        self._em_update(inference_outputs)
        return loss_output.loss

    def compute_and_log_metrics(self, loss_output, metrics, mode: str) -> None:
        """scvi-tools' ELBO logging, then the extra loss terms logged outside inference mode.

        scvi-tools logs extra metrics inside ``torch.inference_mode``; Lightning then holds
        inference tensors that it cannot all-reduce in place at the end of a DDP epoch
        ("Inplace update to inference tensor outside InferenceMode"). Logging them here avoids
        that and leaves single-process logging unchanged.
        """
        extra = loss_output.extra_metrics or {}
        object.__setattr__(loss_output, "extra_metrics", {})
        try:
            super().compute_and_log_metrics(loss_output, metrics, mode)
        finally:
            object.__setattr__(loss_output, "extra_metrics", extra)
        for key, value in extra.items():
            self.log(
                f"{key}_{mode}",
                value.detach() if isinstance(value, torch.Tensor) else value,
                on_step=self.on_step,
                on_epoch=self.on_epoch,
                batch_size=loss_output.n_obs_minibatch,
                sync_dist=self.use_sync_dist,
            )

    @torch.no_grad()
    def _em_update(self, inference_outputs: dict) -> None:
        p = inference_outputs["p"].detach()
        z = inference_outputs["z"].detach()
        sums = torch.cat([p.T @ z, p.sum(0)[:, None]], dim=1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        self.module.update_centres(sums[:, :-1], sums[:, -1])
