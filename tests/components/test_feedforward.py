"""Feedforwards: generic checks over the registry, formulas, the fused layer, mixture of experts."""

import pytest
import torch

import triformers.triton
from triformers.components import FEEDFORWARD_REGISTRY, build_feedforward
from triformers.components.activations import Activation, build_activation
from triformers.components.feedforward import MLP, FusedMLP, MixtureOfExperts

B, S, E = 3, 25, 12  # S square for the convolutional feedforward
NAMES = sorted(FEEDFORWARD_REGISTRY)


def _config(name, activation="gelu", dropout=0.0):
    return {
        "name": name,
        "dim_model": E,
        "dropout": dropout,
        "activation": activation,
        "hidden_layer_multiplier": 2,
        "number_of_experts": 3,
        "gate": "top_2",
    }


@pytest.mark.parametrize("activation", [a.value for a in Activation])
@pytest.mark.parametrize("name", NAMES)
def test_shape_gradients_and_batch_order(name, activation):
    ff = build_feedforward(_config(name, activation)).eval()
    x = torch.randn(B, S, E, requires_grad=True)
    y = ff(x)
    assert y.shape == (B, S, E) and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in ff.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(ff(x[perm]), ff(x)[perm], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_is_active_in_training_only(name):
    ff = build_feedforward(_config(name, dropout=0.5))
    x = torch.randn(B, S, E)
    ff.train()
    assert not torch.allclose(ff(x), ff(x))
    ff.eval()
    torch.testing.assert_close(ff(x), ff(x))


def test_mlp_formula():
    ff = build_feedforward(_config("MLP", "relu"))
    lin1, lin2 = ff.mlp[0], ff.mlp[3]
    x = torch.randn(B, S, E)
    ref = torch.relu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    torch.testing.assert_close(ff(x), ref)
    assert not build_feedforward(dict(_config("MLP"), bias=False)).mlp[0].bias


def test_fused_mlp_uses_the_fused_layer_and_matches_mlp():
    ff = build_feedforward(_config("FusedMLP", "squared_relu"))
    fused = [m for m in ff.modules() if isinstance(m, triformers.triton.FusedDropoutBias)]
    assert len(fused) == 2
    mlp = MLP(E, 0.0, "squared_relu", 2)
    with torch.no_grad():
        mlp.mlp[0].weight.copy_(ff.mlp[0].weight)
        mlp.mlp[0].bias.copy_(ff.mlp[1].bias.normal_())
        mlp.mlp[3].weight.copy_(ff.mlp[2].weight)
        mlp.mlp[3].bias.copy_(ff.mlp[3].bias.normal_())
    x = torch.randn(B, S, E)
    torch.testing.assert_close(ff.eval()(x), mlp.eval()(x), atol=1e-5, rtol=1e-5)
    params = dict(ff.named_parameters())
    assert "mlp.1.bias" in params and "mlp.3.bias" in params  # the fused biases train


def test_conv_feedforward_needs_a_square_grid():
    ff = build_feedforward(_config("Conv2DFeedforward"))
    with pytest.raises(ValueError, match="square"):
        ff(torch.randn(2, 24, E))


def test_top2_mixture_matches_its_routing():
    moe = MixtureOfExperts(E, 0.0, "relu", number_of_experts=4, gate="top_2").eval()
    x = torch.randn(2, 9, E)
    y = moe(x)
    tokens = x.reshape(-1, E)
    probs = torch.softmax(tokens @ moe.gate.wg.weight.T, -1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.stack(
        [
            sum(w[t, s] * moe.experts[int(idx[t, s])](tokens[t : t + 1])[0] for s in range(2))
            for t in range(tokens.shape[0])
        ]
    )
    torch.testing.assert_close(y.reshape(-1, E), ref, atol=1e-5, rtol=1e-5)
    me = probs.mean(0)
    ce = torch.bincount(idx[:, 0], minlength=4).float() / tokens.shape[0]
    torch.testing.assert_close(moe.l_aux, 4 * (me * ce).sum())


def test_round_robin_mixture():
    moe = MixtureOfExperts(E, 0.0, "gelu", number_of_experts=3, gate="round_robin").eval()
    x = torch.randn(2, 7, E)
    y = moe(x)
    for s in range(7):
        torch.testing.assert_close(y[:, s], moe.experts[s % 3](x[:, s]))
    assert moe.l_aux == 0


def test_mixture_with_custom_experts_and_errors():
    moe = MixtureOfExperts(
        E, 0.0, None, number_of_experts=2, expert_constructor=lambda: torch.nn.Linear(E, E, bias=False)
    )
    assert moe(torch.randn(1, 4, E)).shape == (1, 4, E)
    with pytest.raises(ValueError, match="number_of_local_experts"):
        MixtureOfExperts(E, 0.0, None, number_of_experts=2, number_of_local_experts=1)
    with pytest.raises(ValueError, match="2 experts"):
        MixtureOfExperts(E, 0.0, None, number_of_experts=1)


def test_activation_module_is_the_one_requested():
    ff = build_feedforward(_config("MLP", "leaky_relu"))
    assert type(ff.mlp[1]) is type(build_activation("leaky_relu"))
    assert isinstance(FusedMLP(E, 0.0, "gelu"), FusedMLP)
