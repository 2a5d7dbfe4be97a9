"""Grouped (segmented) matrix products: row segment ``k`` of ``x`` times weight matrix ``k``.

This is the kernel of the routed experts: after sorting the cells by expert, each contiguous
segment of rows is multiplied by its expert's weights only. Two implementations give the same
values and gradients:

* :func:`torch.nn.functional.grouped_mm` (PyTorch >= 2.9) takes the segment ends as a tensor on
  the device, so the step needs no host-device synchronisation and no Python loop over experts;
* a fallback autograd function that loops over the non-empty segments (one host sync to read
  their sizes), used where ``grouped_mm`` is missing, refuses the device / dtype, or where the
  weights' output dimension is not a multiple of 16 bytes (its alignment rule; inputs with an
  unaligned row length are padded instead).

Both compute the weight gradient into one ``(K, n_in, n_out)`` buffer. Indexing ``w[k]`` inside
a loop instead makes autograd allocate and zero a full ``(K, n_in, n_out)`` gradient *per
expert* (``SelectBackward``), an O(K^2) cost that dominated the training step at K = 25.
"""

import torch

_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None)
# (device type, dtype) pairs where grouped_mm raised; those use the fallback from then on.
_UNSUPPORTED: set[tuple[str, torch.dtype]] = set()


class _SegmentMM(torch.autograd.Function):
    """``out[rows of segment k] = x[rows of segment k] @ w[k]`` with explicit segment sizes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        out = x.new_empty(x.shape[0], w.shape[2])
        start = 0
        for k, n_k in enumerate(sizes):
            if n_k:
                torch.mm(x[start : start + n_k], w[k], out=out[start : start + n_k])
                start += n_k
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for k, n_k in enumerate(ctx.sizes):
            if not n_k:
                continue
            g = grad[start : start + n_k]
            if grad_x is not None:
                torch.mm(g, w[k].T, out=grad_x[start : start + n_k])
            if grad_w is not None:
                torch.mm(x[start : start + n_k].T, g, out=grad_w[k])
            start += n_k
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Multiply consecutive row segments of ``x`` by their own weight matrix.

    Parameters
    ----------
    x
        ``(n, n_in)`` rows sorted by group.
    w
        ``(K, n_in, n_out)`` one weight matrix per group.
    counts
        ``(K,)`` integer tensor (on ``x``'s device): rows per group, summing to ``n``.

    Returns
    -------
    ``(n, n_out)`` with ``out[i] = x[i] @ w[group of row i]``.
    """
    key = (x.device.type, x.dtype)
    if _GROUPED_MM is not None and key not in _UNSUPPORTED and _aligned_weight(w):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        try:
            return _GROUPED_MM(_aligned_rows(x), w, offs=offs)
        except (RuntimeError, NotImplementedError):
            _UNSUPPORTED.add(key)
    # One host sync: the segment sizes decide the per-expert matmuls.
    return _SegmentMM.apply(x.contiguous(), w, counts.tolist())


def _aligned_weight(w: torch.Tensor) -> bool:
    """grouped_mm needs row-major weights whose strides are multiples of 16 bytes."""
    step = 16 // w.element_size()
    return w.stride(2) == 1 and w.stride(1) % step == 0 and w.stride(0) % step == 0


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or a view of a zero-padded copy whose row stride is a multiple of 16 bytes."""
    step = 16 // x.element_size()
    if x.stride(1) == 1 and x.stride(0) % step == 0:
        return x
    padded = x.new_zeros(x.shape[0], -(-x.shape[1] // step) * step)
    padded[:, : x.shape[1]] = x
    return padded[:, : x.shape[1]]


def uses_grouped_mm(w: torch.Tensor) -> bool:
    """Whether :func:`grouped_mm` with these weights runs without a host sync (as far as known).

    False where PyTorch has no ``grouped_mm``, where it refused ``w``'s device and dtype, or
    where ``w``'s output dimension is not a multiple of 16 bytes (e.g. an odd number of genes).
    """
    key = (w.device.type, w.dtype)
    return _GROUPED_MM is not None and key not in _UNSUPPORTED and _aligned_weight(w)
