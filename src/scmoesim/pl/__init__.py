"""Plots of a trained :class:`~scmoesim.MoESim` and its outputs (matplotlib).

Every function returns the :class:`~matplotlib.figure.Figure` (or the Axes when ``ax=`` is
given), and accepts ``show=`` (call :func:`matplotlib.pyplot.show`) and ``save=`` (write the
figure to a path).

Functions
---------
training_curves
    Every loss term of ``model.history``, one small panel each.
expert_usage
    Cells per expert (cluster), with the effective number of clusters.
similarity
    The minibatch similarity S next to the gate's ``P P^T``.
confusion
    Known labels versus clusters.
generated_vs_real
    Real and generated cells on a shared UMAP.
"""

from ._confusion import confusion
from ._experts import expert_usage
from ._generated import generated_vs_real
from ._similarity import similarity
from ._training import training_curves

__all__ = ["confusion", "expert_usage", "generated_vs_real", "similarity", "training_curves"]
