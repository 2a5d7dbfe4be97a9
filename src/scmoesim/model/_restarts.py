"""Restarts: train from several initialisations and keep the one whose clusters fit best.

The gate's clusters depend on the initialisation: on Levine_32dim, eight seeds of the same
model on the same UMAP end with 11 to 13 clusters and Hungarian F1 0.68 to 0.83, by whether
neighbouring populations share an expert. Training several times and keeping the run with the
lowest similarity loss (the loss the gate was trained on; no labels) is what ``n_init`` does
for k-means. How well that loss ranks the runs by their agreement with known cell types
depends on the data: almost in order on Levine_32dim, MNIST and Gaussian mixtures, hardly at
all on pbmc68k_reduced and the Tabula Muris kidney (``benchmarks/results_restarts.md``).

The loss is measured after training, in evaluation mode, on the same fixed minibatches for
every restart (a seeded permutation of all cells, cut like training minibatches), so the
comparison does not depend on the last epoch's shuffling or on the latent noise.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import seed_everything
from scvi import settings

from scmoesim import _constants as K

if TYPE_CHECKING:
    from ._moesim import MoESim

#: What a trained model holds besides its module; swapped together with it between restarts.
_RUN_STATE = (
    "module",
    "history_",
    "is_trained_",
    "trainer",
    "train_indices",
    "validation_indices",
    "test_indices",
)
#: Seed of the permutation that cuts the cells into the objective's minibatches.
_OBJECTIVE_SEED = 0


@torch.inference_mode()
def clustering_objective(model: MoESim, batch_size: int) -> tuple[float, int]:
    """The trained model's similarity loss over all cells, and its number of clusters.

    The loss is ``similarity + anchor_weight * anchor`` (the clustering loss without its
    DEPICT term, which only sharpens the gate and draws from dropout), averaged over the full
    minibatches of ``batch_size`` cells of a fixed permutation of the cells, with the latent
    mean as input to the gate. The number of clusters counts the experts that get at least
    one cell, over all cells.

    Parameters
    ----------
    model
        A trained :class:`~scmoesim.MoESim` with a similarity source.
    batch_size
        Cells per minibatch (the training minibatch size); fewer cells make one minibatch.
    """
    module = model.module
    module.eval()
    n = model.adata.n_obs
    size = max(2, min(batch_size, n))
    order = np.random.default_rng(_OBJECTIVE_SEED).permutation(n)
    used = np.zeros(module.n_experts, dtype=bool)
    total, cells = 0.0, 0
    for tensors in model._batches(None, order, size):
        inf = module.inference(**module._get_inference_input(tensors), use_mean=True)
        used[inf["expert"].cpu().numpy()] = True
        m = tensors[K.X_KEY].shape[0]
        if m < size:  # the incomplete last minibatch: as in training, not scored
            continue
        sim, _, anchor, _ = module._clustering_terms(tensors, inf)
        total += float(sim + module.anchor_weight * anchor) * m
        cells += m
    return total / max(cells, 1), int(used.sum())


def check_restarts(model: MoESim, n_restarts, ckpt_path, checkpoint_dir) -> None:
    """Refuse restart settings that cannot work, naming the problem."""
    if isinstance(n_restarts, bool) or not isinstance(n_restarts, int | np.integer):
        raise TypeError(f"n_restarts must be an integer >= 1, got {n_restarts!r}.")
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be an integer >= 1, got {n_restarts!r}.")
    if n_restarts == 1:
        return
    if model.is_trained_:
        raise ValueError(
            "n_restarts > 1 trains fresh initialisations, but this model is already trained; "
            "create a new model to train with restarts, or train further with n_restarts=1."
        )
    if ckpt_path is not None or checkpoint_dir is not None:
        raise ValueError(
            "n_restarts > 1 cannot be combined with checkpoint_dir or ckpt_path: each restart "
            "is a separate training. Train with n_restarts=1 to write or resume checkpoints."
        )
    if not model._source_names():
        raise ValueError(
            "n_restarts > 1 keeps the restart with the lowest similarity loss, but no "
            "similarity source is registered (labels_key, signatures, embedding_key or "
            "graph_key in setup_anndata)."
        )


def _fresh_module(model: MoESim):
    """A new module with the model's parameters.

    Submodules among them (the signature scorer, which holds only buffers) are copied, so no
    two restarts share one.
    """
    kwargs = {
        key: copy.deepcopy(value) if isinstance(value, torch.nn.Module) else value
        for key, value in model._module_kwargs.items()
    }
    return model._module_cls(**kwargs)


def train_with_restarts(
    model: MoESim, n_restarts: int, fit: Callable[[], tuple[bool, bool]], batch_size: int
) -> bool:
    """Train ``n_restarts`` initialisations with ``fit`` and keep the best in ``model``.

    Restart 0 trains the model's own module, as a single training would; restart ``r >= 1``
    first seeds every generator with ``scvi.settings.seed + r`` (0 + r when no seed is set)
    and builds a fresh module with the model's parameters. ``fit`` trains ``model.module`` and
    returns ``(trained, interrupted)``. The table of restarts is stored in
    ``model.restarts_``. Returns ``False`` when the first training ran no step.
    """
    base = settings.seed if settings.seed is not None else 0
    rows, best = [], None
    for r in range(n_restarts):
        if r > 0:
            seed_everything(base + r, verbose=False)
            model.module = _fresh_module(model)
            model.history_, model.is_trained_ = None, False
        trained, interrupted = fit()
        if not trained:
            if best is None:
                return False
            break
        loss, n_clusters = clustering_objective(model, batch_size)
        rows.append(
            {
                "restart": r,
                "seed": base + r if r > 0 else settings.seed,
                "similarity_loss": loss,
                "n_clusters": n_clusters,
                "epochs": len(model.history_.get("train_loss", ())) if model.history_ else 0,
            }
        )
        if best is None or loss < best[0]:
            best = (loss, r, {name: getattr(model, name, None) for name in _RUN_STATE})
        if interrupted:
            warnings.warn(
                f"Training interrupted in restart {r}; keeping the best of the {r + 1} "
                "restart(s) trained so far.",
                UserWarning,
                stacklevel=3,
            )
            break
    _, kept, state = best
    for name, value in state.items():
        setattr(model, name, value)
    table = pd.DataFrame(rows).set_index("restart")
    table["kept"] = table.index == kept
    model.restarts_ = table
    return True
