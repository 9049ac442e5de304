"""Weight initialisations: the distributions each scheme promises, on the layers it targets."""

import copy
import math

import pytest
import torch

from triformers.factory import xFormer, xFormerConfig
from triformers.factory.weight_init import get_weight_init_fn, xFormerWeightInit

E = 96
CONFIG = {
    "block_type": "encoder",
    "dim_model": E,
    "num_layers": 2,
    "use_triton": False,
    "position_encoding_config": {"name": "vocab", "seq_len": 16, "vocab_size": 11},
    "multi_head_config": {"num_heads": 4, "attention": {"name": "scaled_dot_product", "dropout": 0.0}},
    "feedforward_config": {"name": "MLP", "dropout": 0.0, "activation": "gelu", "hidden_layer_multiplier": 4},
}


def _model(init):
    return xFormer.from_config(xFormerConfig([copy.deepcopy(CONFIG)], weight_init=init))


def _attn(model):
    return model.encoders[0].wrap_att.sublayer.layer


def _ffn(model):
    return model.encoders[0].wrap_ff.sublayer.layer.mlp


def _uniform_bound_ok(w, bound):
    return w.abs().max() <= bound + 1e-6 and w.abs().max() > 0.9 * bound


def test_vit():
    m = _model("vit")
    q = _attn(m).in_proj_container.q_proj
    assert _uniform_bound_ok(q.weight, math.sqrt(6 / (E + E))) and (q.bias == 0).all()
    lin1 = _ffn(m)[0]
    assert _uniform_bound_ok(lin1.weight, math.sqrt(6 / (E + 4 * E)))
    assert 0 < lin1.bias.abs().max() < 1e-5  # N(0, 1e-6)


TRUNCATED_STD = 0.87962566  # std of a unit normal truncated to (-2, 2)


def test_timm():
    m = _model("timm")
    w = _attn(m).in_proj_container.k_proj.weight
    assert abs(w.std().item() - 0.02 * TRUNCATED_STD) < 0.001 and w.abs().max() <= 0.04 + 1e-6
    assert abs(_ffn(m)[3].weight.std().item() - 0.02 * TRUNCATED_STD) < 0.001


def test_moco_initialises_q_k_v_as_separate_matrices():
    m = _model("moco")
    v = _attn(m).in_proj_container.v_proj.weight
    assert _uniform_bound_ok(v, math.sqrt(6 / (E + E)))


def test_small_init():
    m = _model("small")
    w = _attn(m).in_proj_container.q_proj.weight
    assert _uniform_bound_ok(w, math.sqrt(3) * math.sqrt(2 / (E + 4 * E)))
    assert _uniform_bound_ok(_ffn(m)[0].weight, math.sqrt(6 / (E + 4 * E)))  # the feedforward keeps xavier


def test_modules_with_their_own_init_are_delegated_to():
    m = _model("vit")
    emb = m.encoders[0].pose_encoding.word_embeddings.weight
    assert abs(emb.std().item() - 0.02) < 0.004


@pytest.mark.parametrize("init", [i.value for i in xFormerWeightInit])
def test_gain_scales_the_distribution(init):
    torch.manual_seed(0)
    a = copy.deepcopy(_attn(_model(init)))
    fn = get_weight_init_fn(init)
    b = copy.deepcopy(a)
    torch.manual_seed(1)
    fn(a, name="encoders.0.wrap_att", gain=1.0)
    torch.manual_seed(1)
    fn(b, name="encoders.0.wrap_att", gain=0.5)
    ratio = b.proj.weight.std() / a.proj.weight.std()
    assert abs(ratio.item() - 0.5) < 0.02
