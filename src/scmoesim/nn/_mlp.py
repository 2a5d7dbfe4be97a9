from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "layer", "none"]
_ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "gelu": nn.GELU}


def activation(name: str) -> nn.Module:
    """Return a fresh activation module from its name (``"elu"``, ``"relu"``, ``"gelu"``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}.")
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """Stack of ``Linear -> norm -> activation -> dropout`` layers.

    Dropout is applied through :func:`torch.nn.functional.dropout` with an explicit switch, so
    one network can be run with noise and without it in the same training step (the clean and
    the noisy pass of the DEPICT loss).

    Parameters
    ----------
    n_in
        Input features.
    n_hidden
        Units of every hidden layer.
    n_layers
        Number of hidden layers (at least 1).
    norm
        ``"batch"``, ``"layer"`` or ``"none"``.
    activation_fn
        ``"elu"``, ``"relu"`` or ``"gelu"``.
    dropout_rate
        Dropout after each layer.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        norm: Norm = "batch",
        activation_fn: str = "elu",
        dropout_rate: float = 0.0,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}.")
        layers: list[nn.Module] = []
        for i in range(n_layers):
            block = [nn.Linear(n_in if i == 0 else n_hidden, n_hidden)]
            if norm == "batch":
                block.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3))
            elif norm == "layer":
                block.append(nn.LayerNorm(n_hidden))
            elif norm != "none":
                raise ValueError(f"norm must be 'batch', 'layer' or 'none', got {norm!r}.")
            block.append(activation(activation_fn))
            layers.append(nn.Sequential(*block))
        self.layers = nn.ModuleList(layers)
        self.dropout_rate = dropout_rate
        self.n_out = n_hidden

    def forward(self, x: torch.Tensor, dropout: bool | None = None) -> torch.Tensor:
        """Run the stack; ``dropout=None`` follows ``self.training``."""
        use_dropout = self.training if dropout is None else dropout
        for layer in self.layers:
            x = layer(x)
            if self.dropout_rate > 0:
                x = nn.functional.dropout(x, p=self.dropout_rate, training=use_dropout)
        return x
