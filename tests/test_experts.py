import torch

from scmoesim.nn import MLP, RoutedExperts


def _dense_reference(experts: RoutedExperts, z, expert, onehot=None):
    out = {k: [] for k in experts.head_names}
    for i in range(z.shape[0]):
        k = int(expert[i])
        h = z[i : i + 1]
        for li, (w, b) in enumerate(zip(experts.weights, experts.biases, strict=True)):
            h = torch.cat([h, onehot[i : i + 1]], -1) if onehot is not None else h
            h = h @ w[k] + b[k]
            h = experts.ln[li](h) * experts.ln_gain[li, k] + experts.ln_shift[li, k]
            h = experts.act(h)
        h = torch.cat([h, onehot[i : i + 1]], -1) if onehot is not None else h
        for name in experts.head_names:
            out[name].append(h @ experts.head_weights[name][k] + experts.head_biases[name][k])
    return {k: torch.cat(v) for k, v in out.items()}


def test_routed_experts_match_per_cell_reference():
    torch.manual_seed(0)
    experts = RoutedExperts(4, 3, {"scale": 6, "dropout": 6}, n_hidden=5, n_layers=2, n_cat=2)
    z = torch.randn(9, 3)
    expert = torch.tensor([3, 0, 3, 1, 1, 0, 3, 3, 1])  # expert 2 unused
    cat = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1])
    out = experts(z, expert, cat)
    ref = _dense_reference(experts, z, expert, torch.nn.functional.one_hot(cat, 2).float())
    for k in ("scale", "dropout"):
        torch.testing.assert_close(out[k], ref[k])
        assert out[k].shape == (9, 6)


def test_only_routed_experts_get_gradients():
    torch.manual_seed(0)
    experts = RoutedExperts(3, 2, {"loc": 4}, n_hidden=5)
    z = torch.randn(5, 2)
    experts(z, torch.tensor([0, 0, 2, 2, 0]))["loc"].sum().backward()
    grad = experts.head_weights["loc"].grad
    assert grad[1].abs().sum() == 0
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_single_cell_routed_to_an_expert_is_fine():
    experts = RoutedExperts(2, 2, {"loc": 3})
    out = experts(torch.randn(1, 2), torch.tensor([1]))
    assert out["loc"].shape == (1, 3) and torch.isfinite(out["loc"]).all()


def test_mlp_dropout_switch():
    torch.manual_seed(0)
    mlp = MLP(4, 8, 2, norm="none", dropout_rate=0.5).train()
    x = torch.randn(3, 4)
    assert torch.equal(mlp(x, dropout=False), mlp(x, dropout=False))
    assert not torch.equal(mlp(x, dropout=True), mlp(x, dropout=False))
