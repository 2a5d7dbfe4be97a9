import inspect
import math
import numbers
import typing

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from scvi.train import TrainingPlan

from ..module._module import LOGGED_TERMS
from ._epoch_means import EpochMeans
from ._split import split_experts

#: Experts are split up to this fraction of ``max_epochs``, so the last epochs settle the splits.
SPLIT_UNTIL = 0.9


def _check_integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}[minimum]
        raise ValueError(f"{name} must be {kind}, got {value!r}.")


def _literal_values(name: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
    """The values of a ``Literal`` annotation of scvi-tools' ``TrainingPlan`` argument."""
    annotation = inspect.signature(TrainingPlan.__init__).parameters[name].annotation
    values = typing.get_args(annotation)
    return values if values and all(isinstance(v, str) for v in values) else fallback


def check_plan_values(kwargs: dict) -> None:
    """Refuse values that scvi-tools or Lightning would only reject after training started.

    Names are checked by :meth:`MoESimTrainingPlan.valid_kwargs`; this checks the values a
    typo gets wrong: without it, a misspelt ``lr_scheduler_metric`` fails at the end of the
    first epoch (the weights already changed), a negative ``lr`` inside the first step.
    """
    for name in ("lr", "eps"):
        if name in kwargs:
            _check_number(name, kwargs[name], positive=True)
    for name in ("weight_decay", "lr_min", "lr_threshold", "max_kl_weight", "min_kl_weight"):
        if name in kwargs:
            _check_number(name, kwargs[name], positive=False)
    if "lr_factor" in kwargs:
        _check_number("lr_factor", kwargs["lr_factor"], positive=True)
        if not kwargs["lr_factor"] < 1:
            raise ValueError(f"lr_factor must be below 1, got {kwargs['lr_factor']!r}.")
    for name in ("n_epochs_kl_warmup", "n_steps_kl_warmup"):
        if kwargs.get(name) is not None:
            _check_integer(name, kwargs[name], 0)
    if "lr_patience" in kwargs:
        _check_integer("lr_patience", kwargs["lr_patience"], 0)
    optimizers = _literal_values("optimizer", ("Adam", "AdamW", "Custom"))
    if "optimizer" in kwargs and kwargs["optimizer"] not in optimizers:
        raise ValueError(
            f"optimizer must be one of {list(optimizers)}, got {kwargs['optimizer']!r}."
        )
    if kwargs.get("optimizer") == "Custom" and kwargs.get("optimizer_creator") is None:
        raise ValueError("optimizer='Custom' needs an optimizer_creator.")
    metrics = (
        *_literal_values(
            "lr_scheduler_metric",
            ("elbo_validation", "reconstruction_loss_validation", "kl_local_validation"),
        ),
        "validation_loss",
        "kl_global_validation",
        *(f"{term}_validation" for term in LOGGED_TERMS),
    )
    if "lr_scheduler_metric" in kwargs and kwargs["lr_scheduler_metric"] not in metrics:
        raise ValueError(
            f"lr_scheduler_metric must be a logged validation metric, one of {list(metrics)}; "
            f"got {kwargs['lr_scheduler_metric']!r}."
        )
    if kwargs.get("on_step") is False and kwargs.get("on_epoch", True) is False:
        raise ValueError(
            "on_step=False and on_epoch=False would log no loss at all; keep one of them True."
        )


def _check_number(name: str, value, positive: bool) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {kind} finite number, got {value!r}.")


class InterruptFlag(Callback):
    """Remembers whether training stopped on a user interrupt, and how many steps ran.

    Lightning shuts down gracefully on a KeyboardInterrupt and then raises ``SystemExit``;
    :meth:`scmoesim.MoESim.train` uses this flag to keep the model instead of exiting.
    ``steps`` counts the training minibatches, whichever logger (or none) the trainer has:
    ``model.history`` stays empty with ``logger=False`` or a logger of the user's.
    """

    def __init__(self):
        self.interrupted = False
        self.epochs_done = 0
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self.steps += 1

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
    centres. Each loss term is logged (``similarity_loss_train``, ``depict_loss_train``, ...):
    by default (``on_step=False``) as the epoch's mean, summed on the device during the epoch
    and logged once at its end, which spares Lightning's per-call cost of about 0.7 ms per
    value and step (a fifth of the training time on MNIST); ``plan_kwargs={"on_step": True}``
    logs every step as scvi-tools does.

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
    split_experts_every
        Every that many epochs (up to 90% of ``max_epochs``), give the half of an expert's
        cells that the similarity calls dissimilar from the other half to an unused expert
        (:func:`~scmoesim.train.split_experts`; the number of splits of each epoch is
        recorded as ``n_experts_split`` in the history). ``None`` (default): never. For the
        kNN or graph similarity only (labels and signatures name their experts), on one
        device. With ``knn_rule="mutual_components"`` it lets every island of the embedding
        keep its own expert (``benchmarks/results_split.md``).
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan` (``lr``, ``weight_decay``, ...).
    """

    def __init__(
        self,
        module,
        *,
        n_epochs_kl_warmup: int | None = None,
        n_epochs_similarity_warmup: int = 0,
        split_experts_every: int | None = None,
        **kwargs,
    ):
        _check_integer("n_epochs_similarity_warmup", n_epochs_similarity_warmup, 0)
        if split_experts_every is not None:
            _check_integer("split_experts_every", split_experts_every, 1)
            if module.use_labels or module.signature_scorer is not None:
                raise ValueError(
                    "split_experts_every works with the kNN or graph similarity only: labels "
                    "and signatures tie each class to its own expert."
                )
        super().__init__(module, n_epochs_kl_warmup=n_epochs_kl_warmup, **kwargs)
        self.n_epochs_similarity_warmup = n_epochs_similarity_warmup
        self.split_experts_every = split_experts_every
        # epoch-level logging (the default, on_step=False) sums on the device and logs once
        # per epoch; with on_step=True every step is logged through Lightning as scvi does
        self._epoch_means = {"train": EpochMeans(), "validation": EpochMeans()}

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

    def on_train_start(self) -> None:
        """Refuse expert splitting under multi-process training (each process would differ)."""
        super().on_train_start()
        if (
            self.split_experts_every is not None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            raise RuntimeError("split_experts_every needs training on one device.")

    def on_train_epoch_start(self) -> None:
        """Split experts at the scheduled epochs (before the epoch's first step)."""
        super().on_train_epoch_start()
        if self.split_experts_every is None:
            return
        epoch, max_epochs = self.current_epoch, self.trainer.max_epochs
        due = (
            epoch > 0
            and epoch % self.split_experts_every == 0
            and (max_epochs is None or max_epochs < 0 or epoch <= SPLIT_UNTIL * max_epochs)
            and self.clustering_scale > 0
        )
        n_split = len(split_experts(self.module, self.trainer.train_dataloader)) if due else 0
        if self._epoch_logging:
            self._epoch_means["train"].add(
                "n_experts_split", torch.tensor(float(n_split), device=self.device), 1
            )
        else:
            self.log("n_experts_split", float(n_split), on_step=False, on_epoch=True)

    def training_step(self, batch, batch_idx):
        """Optimisation step, then the EM update of the centres from this minibatch."""
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs.update({"kl_weight": self.kl_weight})
        self.loss_kwargs["clustering_scale"] = self.clustering_scale
        inference_outputs, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        if self._epoch_logging:
            self._epoch_means["train"].add(
                "train_loss", loss_output.loss, loss_output.n_obs_minibatch
            )
        else:
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

    def validation_step(self, batch, batch_idx):
        """scvi-tools' validation step, with epoch-level logging by default."""
        if not self._epoch_logging:
            return super().validation_step(batch, batch_idx)
        _, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self._epoch_means["validation"].add(
            "validation_loss", loss_output.loss, loss_output.n_obs_minibatch
        )
        self.compute_and_log_metrics(loss_output, self.val_metrics, "validation")

    @property
    def _epoch_logging(self) -> bool:
        """Whether to log epoch means (the default ``on_step=False, on_epoch=True``).

        Any other setting logs through Lightning at every step, as scvi-tools does.
        """
        return self.on_epoch and not self.on_step

    def compute_and_log_metrics(self, loss_output, metrics, mode: str) -> None:
        """scvi-tools' ELBO metrics and the extra loss terms (similarity, DEPICT, ...).

        By default (``on_step=False``) the ELBO metrics are updated and the extra terms summed
        on the device each step, and everything is logged once at the end of the epoch
        (:meth:`on_train_epoch_end`, :meth:`on_validation_epoch_end`), with the values that
        per-step ``self.log(..., on_epoch=True)`` would give. With ``on_step=True`` each step
        is logged as scvi-tools does, the extra terms outside inference mode: scvi-tools logs
        them inside ``torch.inference_mode``, and Lightning then holds inference tensors that it
        cannot all-reduce in place at the end of a DDP epoch ("Inplace update to inference
        tensor outside InferenceMode").
        """
        extra = loss_output.extra_metrics or {}
        if self._epoch_logging:
            metrics[f"elbo_{mode}"].update(
                reconstruction_loss=loss_output.reconstruction_loss_sum,
                kl_local=loss_output.kl_local_sum,
                kl_global=loss_output.kl_global_sum,
                n_obs_minibatch=loss_output.n_obs_minibatch,
            )
            for key, value in extra.items():
                self._epoch_means[mode].add(f"{key}_{mode}", value, loss_output.n_obs_minibatch)
            return
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

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """After the epoch's last minibatch, log the training epoch's means.

        Here rather than only in :meth:`on_train_epoch_end`: Lightning calls the callbacks'
        ``on_train_epoch_end`` (the periodic checkpoint, which records the loss history) before
        the module's.
        """
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._log_epoch("train", self.train_metrics)

    def on_train_epoch_end(self) -> None:
        """Log what is left of the training epoch's means.

        Nothing, unless the epoch's last minibatch was not known in advance.
        """
        self._log_epoch("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        """Log the validation epoch's means before early stopping reads them."""
        self._log_epoch("validation", self.val_metrics)

    def _log_epoch(self, mode: str, metrics) -> None:
        if not self._epoch_logging:
            return
        # a component's count: the ELBO's compositional metric keeps its own across reset()
        if metrics[f"reconstruction_loss_{mode}"].update_count > 0:
            for name, metric in metrics.items():
                self.log(name, metric.compute(), on_step=False, on_epoch=True)
            for metric in metrics.values():
                metric.reset()
        for name, value in self._epoch_means[mode].pop_means().items():
            self.log(name, value, on_step=False, on_epoch=True, prog_bar=name == "train_loss")

    @torch.no_grad()
    def _em_update(self, inference_outputs: dict) -> None:
        p = inference_outputs["p"].detach()
        z = inference_outputs["z"].detach()
        sums = torch.cat([p.T @ z, p.sum(0)[:, None]], dim=1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        self.module.update_centres(sums[:, :-1], sums[:, -1])
