import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._grouped import grouped_mm
from ._mlp import activation


class RoutedExperts(nn.Module):
    """K expert decoders with hard routing: each cell runs through its own expert only.

    The experts' weights are stored stacked (one tensor per layer, leading dimension K). A
    forward pass sorts the cells by expert and multiplies each expert's segment of rows by that
    expert's weights in one grouped matrix product (:func:`~scmoesim.nn.grouped_mm`); biases and
    LayerNorm gains are gathered per row. The compute of K experts is that of one decoder; only
    the parameter memory (and the optimiser's pass over it) grows with K. Generation uses
    :meth:`decode`, a gradient-free path that runs one ``addmm`` per expert segment with that
    expert's bias and LayerNorm affine (no per-row gathers) and writes the heads in place.

    Every expert is ``[Linear -> LayerNorm -> activation] x n_layers`` followed by one linear
    head per output (e.g. ``{"scale": n_genes, "dropout": n_genes}``). LayerNorm (per-sample)
    keeps experts well defined when a minibatch routes a single cell to an expert, where
    BatchNorm would fail. A categorical covariate (batch) is appended one-hot to the input of
    every layer, as scVI does.

    Parameters
    ----------
    n_experts
        Number of experts K.
    n_in
        Latent dimension.
    heads
        Output heads and their sizes.
    n_hidden
        Hidden units per layer.
    n_layers
        Hidden layers per expert.
    n_cat
        Number of categories of the covariate (0 for none).
    activation_fn
        Activation name.
    """

    def __init__(
        self,
        n_experts: int,
        n_in: int,
        heads: dict[str, int],
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cat: int = 0,
        activation_fn: str = "elu",
    ):
        super().__init__()
        self.n_experts = n_experts
        self.n_cat = n_cat
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.ln = nn.ModuleList()
        d_in = n_in
        for _ in range(n_layers):
            self.weights.append(_stacked_weight(n_experts, d_in + n_cat, n_hidden))
            self.biases.append(nn.Parameter(torch.zeros(n_experts, n_hidden)))
            self.ln.append(nn.LayerNorm(n_hidden, elementwise_affine=False))
            d_in = n_hidden
        self.ln_gain = nn.Parameter(torch.ones(n_layers, n_experts, n_hidden))
        self.ln_shift = nn.Parameter(torch.zeros(n_layers, n_experts, n_hidden))
        self.act = activation(activation_fn)
        self.head_names = list(heads)
        self.head_weights = nn.ParameterDict(
            {k: _stacked_weight(n_experts, d_in + n_cat, size) for k, size in heads.items()}
        )
        self.head_biases = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(n_experts, size)) for k, size in heads.items()}
        )

    def forward(
        self, z: torch.Tensor, expert: torch.Tensor, cat: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Decode each row of ``z`` with the expert given in ``expert``.

        Parameters
        ----------
        z
            ``(n, n_in)`` latent codes.
        expert
            ``(n,)`` integer expert index of each row.
        cat
            ``(n,)`` or ``(n, 1)`` integer covariate codes, required when ``n_cat > 0``.

        Returns
        -------
        One ``(n, size)`` tensor per head, rows in the input order.
        """
        expert = expert.long().reshape(-1)
        onehot = self._onehot(z, cat)
        order = torch.argsort(expert, stable=True)
        e_sorted = expert[order]
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=z.device)
        counts.scatter_add_(0, expert, torch.ones_like(expert))
        h = z[order]
        c = onehot[order] if onehot is not None else None
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.cat([h, c], dim=-1) if c is not None else h
            h = grouped_mm(h, w, counts) + b[e_sorted]
            h = self.ln[i](h) * self.ln_gain[i][e_sorted] + self.ln_shift[i][e_sorted]
            h = self.act(h)
        h = torch.cat([h, c], dim=-1) if c is not None else h
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return {
            name: (
                grouped_mm(h, self.head_weights[name], counts) + self.head_biases[name][e_sorted]
            )[inverse]
            for name in self.head_names
        }

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, expert: torch.Tensor, cat: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` without gradients, for generation (same values up to rounding).

        Each expert's rows go through plain ``addmm`` calls with the expert's own bias and
        LayerNorm affine, and the heads are written straight into their output rows, which
        skips the per-row gathers of biases and gains and the final reordering that
        :meth:`forward` needs for autograd. Fastest when ``expert`` is sorted (as in
        generation); any order works. Parameters and return value as in :meth:`forward`.
        """
        expert = expert.long().reshape(-1)
        n = expert.shape[0]
        onehot = self._onehot(z, cat)
        in_order = n < 2 or bool((expert[1:] >= expert[:-1]).all())
        order = None if in_order else torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.n_experts).tolist()
        if len(counts) > self.n_experts:
            raise ValueError(f"Expert indices must be below {self.n_experts}.")
        h_all = z if order is None else z[order]
        c_all = onehot if order is None or onehot is None else onehot[order]
        out = {
            name: _empty_like_rows(z, n, self.head_weights[name].shape[2])
            for name in self.head_names
        }
        start = 0
        for k, n_k in enumerate(counts):
            if n_k == 0:
                continue
            rows = slice(start, start + n_k)
            start += n_k
            c = c_all[rows] if c_all is not None else None
            h = h_all[rows]
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                h = torch.cat([h, c], dim=-1) if c is not None else h
                h = torch.addmm(b[k], h, w[k])
                h = F.layer_norm(
                    h, (h.shape[1],), self.ln_gain[i, k], self.ln_shift[i, k], self.ln[i].eps
                )
                h = self.act(h)
            h = torch.cat([h, c], dim=-1) if c is not None else h
            for name in self.head_names:
                w, b = self.head_weights[name][k], self.head_biases[name][k]
                if order is None:
                    torch.addmm(b, h, w, out=out[name][rows])
                else:
                    out[name].index_copy_(0, order[rows], torch.addmm(b, h, w))
        return out

    @torch.no_grad()
    def copy_expert(self, source: int, target: int) -> None:
        """Overwrite expert ``target``'s weights with those of expert ``source``."""
        stacked = [*self.weights, *self.biases, *self.head_weights.values()]
        for param in [*stacked, *self.head_biases.values()]:
            param[target] = param[source]
        self.ln_gain[:, target] = self.ln_gain[:, source]
        self.ln_shift[:, target] = self.ln_shift[:, source]

    def _onehot(self, z: torch.Tensor, cat: torch.Tensor | None) -> torch.Tensor | None:
        """One-hot covariate rows (``None`` without a covariate)."""
        if self.n_cat == 0:
            return None
        if cat is None:
            raise ValueError("This decoder was built with a covariate; pass `cat`.")
        # scatter rather than one_hot/bincount: those check index ranges on the host
        codes = cat.long().reshape(-1, 1)
        return z.new_zeros(codes.shape[0], self.n_cat).scatter_(1, codes, 1.0)


def _empty_like_rows(z: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """An uninitialised ``(n, size)`` tensor like ``z``; on the CPU backed by numpy memory.

    numpy asks the kernel for transparent huge pages on large blocks (``madvise``), torch's CPU
    allocator does not; first touching a fresh ``(2048, 2000)`` float32 output then costs about
    1 ms instead of about 10 ms of page faults, a tenth of the decoder's time.
    """
    if z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(
            np.empty((n, size), dtype=np.float32 if z.dtype == torch.float32 else np.float64)
        )
    return z.new_empty(n, size)


def _stacked_weight(n_experts: int, n_in: int, n_out: int) -> nn.Parameter:
    """Kaiming-uniform initialised ``(K, n_in, n_out)`` weights, as ``nn.Linear`` does."""
    bound = 1.0 / math.sqrt(max(n_in, 1))
    return nn.Parameter(torch.empty(n_experts, n_in, n_out).uniform_(-bound, bound))
