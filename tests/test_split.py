"""Expert splitting during training (``plan_kwargs={"split_experts_every": n}``)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from scmoesim import MoESim, metrics
from scmoesim.train import split_experts
from scmoesim.train._split import joining_share, two_means


def _two_blobs(n: int = 120, seed: int = 0) -> ad.AnnData:
    """Two well-separated Gaussian blobs in 10 dimensions; the embedding is the data."""
    rng = np.random.default_rng(seed)
    group = np.repeat([0, 1], n // 2)
    x = rng.normal(size=(n, 10)) + 8.0 * group[:, None]
    adata = ad.AnnData(x.astype(np.float32))
    adata.obs["group"] = pd.Categorical(group.astype(str))
    adata.obsm["X_emb"] = adata.X.copy()
    return adata


def _one_expert_model(adata: ad.AnnData, **model_kwargs) -> MoESim:
    """A model trained briefly, then with every cell routed to expert 0 by the gate's bias."""
    scvi.settings.seed = 0
    MoESim.setup_anndata(adata, embedding_key="X_emb")
    model = MoESim(
        adata, n_experts=4, likelihood="normal", knn_rule="mutual_components", **model_kwargs
    )
    model.train(max_epochs=2, batch_size=60, enable_progress_bar=False)
    with torch.no_grad():
        model.module.gate_out.weight.zero_()
        model.module.gate_out.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    return model


def _loader(model: MoESim, adata: ad.AnnData):
    return model._make_data_loader(adata, batch_size=60, shuffle=True)


def _train_with_splitting(max_epochs: int, every: int) -> tuple[MoESim, np.ndarray]:
    """Train on the two blobs with splitting; the model and its ``n_experts_split`` history."""
    adata = _two_blobs()
    scvi.settings.seed = 0
    MoESim.setup_anndata(adata, embedding_key="X_emb")
    model = MoESim(adata, n_experts=4, likelihood="normal", knn_rule="mutual_components")
    model.train(
        max_epochs=max_epochs,
        batch_size=60,
        enable_progress_bar=False,
        plan_kwargs={"split_experts_every": every},
    )
    return model, model.history["n_experts_split"]["n_experts_split"].to_numpy(dtype=float)


def test_two_means_separates_two_blobs():
    rng = np.random.default_rng(1)
    h = torch.tensor(np.r_[rng.normal(size=(30, 5)), rng.normal(size=(20, 5)) + 6.0])
    centres = two_means(h)
    side = torch.cdist(h, centres).argmin(1)
    assert len(set(side[:30].tolist())) == 1 and len(set(side[30:].tolist())) == 1
    assert side[0] != side[-1]
    torch.testing.assert_close(centres[int(side[-1])], h[30:].mean(0))


def test_joining_share_follows_the_pair_weights():
    assert joining_share(10, 100, None) == 0.5
    # r = 4, similar share 0.1: a dissimilar pair weighs 4 * 0.1 / 0.9, join above w / (1 + w)
    w = 4 * 0.1 / 0.9
    assert joining_share(10, 100, 4.0) == pytest.approx(w / (1 + w))
    assert joining_share(100, 100, 4.0) == 1.0


def test_split_expert_moves_one_side_of_the_plane_and_copies_the_decoder():
    adata = _two_blobs()
    model = _one_expert_model(adata)
    module = model.module
    module.eval()
    with torch.no_grad():
        module.experts.head_biases["loc"][2] += 5.0  # make expert 2 differ from expert 0
        z = torch.randn(50, module.n_latent)
        h = module.gate(z)
        before = module.gate_logits(z)
        normal = torch.randn(h.shape[1]) * 10
        offset = float(normal @ h.mean(0))
        sums = module.centre_sum[0].clone(), float(module.centre_weight[0])
        module.split_expert(0, 2, normal, offset)
        after = module.gate_logits(z)
        side = h @ normal > offset
        assert side.any() and (~side).any()
        assert torch.equal(after.argmax(1), torch.where(side, 2, 0))
        # the other experts' logits and the mean of the two split ones are unchanged
        torch.testing.assert_close(after[:, [1, 3]], before[:, [1, 3]])
        torch.testing.assert_close((after[:, 0] + after[:, 2]) / 2, before[:, 0])
        expert = torch.zeros(50, dtype=torch.long)
        torch.testing.assert_close(module.experts(z, expert), module.experts(z, expert + 2))
        torch.testing.assert_close(module.centre_sum[2], sums[0] / 2)
        assert float(module.centre_weight[0]) == pytest.approx(sums[1] / 2)


def test_split_experts_gives_a_separate_group_its_own_expert():
    adata = _two_blobs()
    model = _one_expert_model(adata)
    assert set(np.asarray(model.predict())) == {model.cluster_names_[0]}
    done = split_experts(model.module, _loader(model, adata))
    assert len(done) == 1 and done[0][0] == 0
    assert model.module.training is False  # mode restored (the model was in eval mode)
    pred = np.asarray(model.predict()).astype(str)
    assert metrics.ari(adata.obs["group"].astype(str), pred) == pytest.approx(1.0)


def test_split_experts_leaves_one_group_alone():
    adata = _two_blobs()
    adata = adata[adata.obs["group"] == "0"].copy()
    model = _one_expert_model(adata)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    assert split_experts(model.module, _loader(model, adata)) == []
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_split_experts_needs_an_unused_expert():
    adata = _two_blobs()
    model = _one_expert_model(adata)
    module = model.module
    with torch.no_grad():  # each quarter of the cells along h's main axis gets its own expert
        h = module.gate(torch.as_tensor(model.get_latent_representation()))
        axis = torch.linalg.svd(h - h.mean(0), full_matrices=False).Vh[0]
        q = torch.quantile(h @ axis, torch.tensor([0.25, 0.5, 0.75]))
        # lines of slopes -3, -1, 1, 3 whose upper envelope changes at the quartiles
        slopes = torch.tensor([-3.0, -1.0, 1.0, 3.0])
        intercepts = -torch.cat([torch.zeros(1), torch.cumsum(2 * q, 0)])
        module.gate_out.weight.copy_(slopes[:, None] * axis[None, :])
        module.gate_out.bias.copy_(intercepts)
    assert len(set(np.asarray(model.predict()))) == module.n_experts  # precondition
    assert split_experts(model.module, _loader(model, adata)) == []


def test_training_splits_on_schedule_and_records_the_splits(monkeypatch):
    """Every 2 epochs up to 90% of max_epochs (epochs 2 and 4 of 6), counted in the history."""
    import scmoesim.train._plan as plan

    calls = []

    def fake_split(module, dataloader):
        calls.append(module.training)
        return [(0, 1), (2, 3)] if len(calls) == 1 else [(0, 1)]

    monkeypatch.setattr(plan, "split_experts", fake_split)
    _, splits = _train_with_splitting(max_epochs=6, every=2)
    np.testing.assert_array_equal(splits, [0, 0, 2, 0, 1, 0])
    assert len(calls) == 2


def test_training_runs_the_real_split_search_inside_the_loop():
    """The search runs between epochs on the training loader and leaves training going."""
    model, splits = _train_with_splitting(max_epochs=4, every=1)
    assert len(splits) == 4 and splits[0] == 0
    assert np.all(splits == np.round(splits)) and np.all((splits >= 0) & (splits <= 3))
    assert len(model.history["train_loss"]) == 4
    assert all(torch.isfinite(p).all() for p in model.module.parameters())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "5"])
def test_split_experts_every_must_be_a_positive_integer(bad):
    adata = _two_blobs()
    MoESim.setup_anndata(adata, embedding_key="X_emb")
    model = MoESim(adata, n_experts=4, likelihood="normal")
    with pytest.raises(ValueError, match="split_experts_every"):
        model.train(max_epochs=1, plan_kwargs={"split_experts_every": bad})


def test_split_experts_refuses_labels():
    adata = _two_blobs()
    MoESim.setup_anndata(adata, labels_key="group")
    model = MoESim(adata, n_experts=4, likelihood="normal")
    with pytest.raises(ValueError, match="kNN or graph similarity only"):
        model.train(max_epochs=1, plan_kwargs={"split_experts_every": 1})
