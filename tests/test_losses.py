import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from scmoesim.module import (
    anchor_loss,
    depict_loss,
    depict_target,
    kl_mixture,
    kl_paper,
    similarity_bce,
)


def test_kl_mixture_matches_torch():
    g = torch.Generator().manual_seed(0)
    m, v, c = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g) + 0.1, torch.randn(5, 3)
    expected = kl_divergence(Normal(m, v.sqrt()), Normal(c, 1.0)).sum(-1)
    torch.testing.assert_close(kl_mixture(m, v, c), expected)


def test_kl_paper_zero_at_unit_variance_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 2, generator=g)
    p = torch.zeros(20000, 2)
    p[:, 0] = 1
    assert kl_paper(z, p).item() == pytest.approx(0.0, abs=5e-3)
    # variance 4 in both dims: 0.5 * 2 * (1/4 - 1 + log 4)
    assert kl_paper(2 * z, p).item() == pytest.approx(0.25 - 1 + math.log(4), rel=0.02)


def test_kl_paper_is_exact_far_from_the_origin_and_leaves_the_gate_alone():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 5, generator=g).requires_grad_()
    p = torch.softmax(torch.randn(256, 3, generator=g), -1).requires_grad_()
    near = kl_paper(z, p)
    # E[z^2] - E[z]^2 in float32 gave 5003.8 instead of ~0.01 at an offset of 1000
    far = kl_paper(z.detach() + 1000.0, p)
    torch.testing.assert_close(far, near, rtol=1e-3, atol=1e-4)
    ref = kl_paper(z.detach().double(), p.detach().double())
    torch.testing.assert_close(near.double(), ref, rtol=1e-4, atol=1e-6)
    assert not torch.autograd.grad(near, p, allow_unused=True, materialize_grads=True)[0].any()


def test_similarity_bce_full_bce_over_known_pairs():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    s = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[False, True], [True, False]])
    loss, n = similarity_bce(p, s, mask)
    assert n.item() == 2
    assert loss.item() == pytest.approx(-math.log(0.5), rel=1e-5)
    # the (1 - S) half: dissimilar pair with PP^T = 0.5 costs -log(0.5) too
    loss0, _ = similarity_bce(p, torch.zeros(2, 2), mask)
    assert loss0.item() == pytest.approx(-math.log(0.5), rel=1e-5)
    # nothing known -> 0
    lossn, n = similarity_bce(p, s, torch.zeros(2, 2, dtype=torch.bool))
    assert lossn.item() == 0 and n.item() == 0


def _reference_bce(p, s, mask):
    """The plain formula the fused loss must equal (clamp, two logs, products with S)."""
    pp = (p @ p.T).clamp(1e-7, 1.0 - 1e-7)
    bce = -(s * torch.log(pp) + (1.0 - s) * torch.log1p(-pp))
    m = mask.to(p.dtype)
    return (bce * m).sum() / m.sum().clamp_min(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sharp", [1.0, 30.0])  # 30: many P P^T below 1e-7 (clamp active)
def test_similarity_bce_equals_reference_formula(dtype, sharp):
    g = torch.Generator().manual_seed(int(sharp))
    n, k = 60, 5
    logits = sharp * torch.randn(n, k, generator=g, dtype=dtype)
    s = (torch.rand(n, n, generator=g) < 0.3).to(dtype)
    s = torch.maximum(s, s.T)
    mask = torch.rand(n, n, generator=g) < 0.7  # unknown pairs, not symmetric
    mask.fill_diagonal_(False)
    if sharp > 1:
        assert ((logits.softmax(-1) @ logits.softmax(-1).T) < 1e-7).any()
    grads, values = [], []
    for fn in (_reference_bce, lambda p, s, m: similarity_bce(p, s, m)[0]):
        p = logits.clone().requires_grad_(True)
        value = fn(torch.softmax(p, -1), s, mask)
        value.backward()
        values.append(value.detach())
        grads.append(p.grad)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {}
    torch.testing.assert_close(values[1], values[0], **tol)
    torch.testing.assert_close(grads[1], grads[0], **tol)
    # a boolean S gives the same loss as its 0/1 float version
    p = torch.softmax(logits, -1)
    assert similarity_bce(p, s.bool(), mask)[0] == similarity_bce(p, s, mask)[0]


def test_similarity_bce_collapse_is_penalised():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[False, True], [True, False]])
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    separated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert similarity_bce(collapsed, s, mask)[0] > 10 * similarity_bce(separated, s, mask)[0]


def test_similarity_bce_resolution_zero_is_the_printed_half():
    """r = 0 keeps only -S log(PP^T), averaged over the known similar pairs: the collapse the
    full BCE penalises costs nothing."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 3, generator=g), -1).requires_grad_()
    s = (torch.rand(6, 6, generator=g) > 0.5).float()
    s = torch.maximum(s, s.T)
    mask = ~torch.eye(6, dtype=torch.bool)
    loss, _ = similarity_bce(p, s, mask, resolution=0.0)
    pp = (p @ p.T).clamp(1e-7, 1 - 1e-7)
    known_similar = mask & (s > 0)
    expected = -torch.log(pp[known_similar]).mean()
    torch.testing.assert_close(loss, expected)
    (g_loss,) = torch.autograd.grad(loss, p)
    (g_ref,) = torch.autograd.grad(expected, p)
    torch.testing.assert_close(g_loss, g_ref)
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    off = torch.tensor([[False, True], [True, False]])
    assert similarity_bce(collapsed, torch.ones(2, 2), off, resolution=0.0)[0] < 1e-6


def test_model_offers_the_printed_half_of_eq7():
    import anndata as ad
    import numpy as np

    from scmoesim import MoESim

    adata = ad.AnnData(np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32))
    adata.obsm["X_emb"] = adata.X.copy()
    MoESim.setup_anndata(adata, embedding_key="X_emb")
    model = MoESim(adata, likelihood="normal", similarity_resolution="half")
    assert model.module.similarity_resolution == 0.0
    assert (
        MoESim(
            adata, likelihood="normal", similarity_resolution="paper"
        ).module.similarity_resolution
        is None
    )


def test_similarity_bce_resolution_weighs_dissimilar_pairs():
    # 3 cells: pair (0, 1) similar, (0, 2) and (1, 2) dissimilar; both directions known
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    s = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = ~torch.eye(3, dtype=torch.bool)
    # PP^T: (0, 1) = 0.5, (0, 2) = 0.5, (1, 2) = 0.5
    sim, dis = -math.log(0.5), -math.log(0.5)
    loss, n = similarity_bce(p, s, mask)
    assert n.item() == 6
    assert loss.item() == pytest.approx((2 * sim + 4 * dis) / 6, rel=1e-5)
    # resolution r: each of the 4 dissimilar (directed) pairs weighs r * 2 / 4
    p2 = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.2, 0.8]])
    pp = p2 @ p2.T
    sim_terms = -2 * torch.log(pp[0, 1])
    dis_terms = -2 * (torch.log1p(-pp[0, 2]) + torch.log1p(-pp[1, 2]))
    for r in (0.5, 1.0, 4.0):
        w = r * 2 / 4
        expected = (sim_terms + w * dis_terms) / (2 + 4 * w)
        loss, n = similarity_bce(p2, s, mask, resolution=r)
        assert n.item() == 6
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a larger resolution makes the dissimilar pairs count more
    keep_apart = [similarity_bce(p2, s, mask, resolution=r)[0].item() for r in (0.5, 4.0)]
    assert keep_apart[0] < keep_apart[1]


def test_similarity_bce_resolution_gradient_matches_weighted_formula():
    g = torch.Generator().manual_seed(3)
    n, k = 40, 4
    logits = torch.randn(n, k, generator=g, dtype=torch.float64)
    s = (torch.rand(n, n, generator=g) < 0.2).double()
    s = torch.maximum(s, s.T)
    mask = torch.rand(n, n, generator=g) < 0.8
    mask.fill_diagonal_(False)
    m = mask.double()
    w = 3.0 * (m * s).sum() / (m * (1 - s)).sum()
    weights = m * (s + (1 - s) * w)

    def reference(p):
        pp = (p @ p.T).clamp(1e-7, 1.0 - 1e-7)
        bce = -(s * torch.log(pp) + (1.0 - s) * torch.log1p(-pp))
        return (bce * weights).sum() / weights.sum()

    grads = []
    for fn in (reference, lambda p: similarity_bce(p, s, mask, resolution=3.0)[0]):
        x = logits.clone().requires_grad_(True)
        value = fn(torch.softmax(x, -1))
        value.backward()
        grads.append((value.detach(), x.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_depict_target_eq9_and_detached():
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], requires_grad=True)
    q = depict_target(p)
    col = p.detach().sum(0).sqrt()
    expected = (p.detach() / col) / (p.detach() / col).sum(1, keepdim=True)
    torch.testing.assert_close(q, expected)
    assert not q.requires_grad
    torch.testing.assert_close(q.sum(1), torch.ones(3))
    log_noisy = torch.log_softmax(torch.randn(3, 2, requires_grad=True), -1)
    loss = depict_loss(p, log_noisy).sum()
    loss.backward()
    assert p.grad is None  # the target is not back-propagated


def test_anchor_loss_keeps_a_gradient_for_confidently_wrong_cells():
    """At a logit gap of 20 the 1e-7 clamp gave the loss 16.1 and no gradient at all."""
    logits = torch.tensor([[20.0, 0.0, 0.0]], requires_grad=True)
    loss = anchor_loss(torch.softmax(logits, -1), torch.tensor([1]))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1]))
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, torch.tensor([[1.0, -1.0, 0.0]]), atol=1e-6, rtol=0)


def test_anchor_loss_mean_nll_over_known_cells_only():
    p = torch.tensor([[0.8, 0.2], [0.25, 0.75], [0.5, 0.5]], requires_grad=True)
    codes = torch.tensor([0, 1, -1])
    loss = anchor_loss(p, codes)
    assert loss.item() == pytest.approx(-(math.log(0.8) + math.log(0.75)) / 2, rel=1e-6)
    loss.backward()
    assert p.grad[2].abs().sum() == 0  # the unknown cell gets no gradient
    assert anchor_loss(p, torch.full((3,), -1)).item() == 0
