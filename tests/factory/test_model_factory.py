"""The config-driven model factory: the sheet's encoder-decoder config, residual styles, reversible and
DeepNorm models, causality end to end, masks, configuration errors, pickling."""

import copy
import math
import pickle

import pytest
import torch

from triformers.components.residual import get_deepnorm_coefficients
from triformers.factory import xFormer, xFormerConfig, xFormerEncoderConfig

EMB, SEQ, VOCAB = 48, 64, 16

ENCODER = {
    "reversible": False,
    "block_type": "encoder",
    "dim_model": EMB,
    "position_encoding_config": {"name": "vocab", "seq_len": SEQ, "vocab_size": VOCAB, "dim_model": EMB},
    "num_layers": 3,
    "multi_head_config": {
        "num_heads": 4,
        "residual_dropout": 0,
        "attention": {"name": "linformer", "dropout": 0, "causal": True, "seq_len": SEQ},
        "dim_model": EMB,
    },
    "feedforward_config": {
        "name": "MLP", "dropout": 0, "activation": "relu", "hidden_layer_multiplier": 4, "dim_model": EMB,
    },
}  # fmt: skip
DECODER = {
    "block_type": "decoder",
    "dim_model": EMB,
    "position_encoding_config": {"name": "vocab", "seq_len": SEQ, "vocab_size": VOCAB, "dim_model": EMB},
    "num_layers": 2,
    "multi_head_config_masked": {
        "num_heads": 4, "residual_dropout": 0, "dim_model": EMB,
        "attention": {"name": "linformer", "dropout": 0, "causal": True, "seq_len": SEQ},
    },
    "multi_head_config_cross": {
        "num_heads": 4, "residual_dropout": 0, "dim_model": EMB,
        "attention": {"name": "linformer", "dropout": 0, "causal": True, "seq_len": SEQ},
    },
    "feedforward_config": {
        "name": "MLP", "dropout": 0, "activation": "relu", "hidden_layer_multiplier": 4, "dim_model": EMB,
    },
}  # fmt: skip


def _train(model, head, steps, src, tgt):
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    losses = []
    for _ in range(steps):
        logits = head(model(src))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _unfused(config):
    """The same config with torch's LayerNorm: on a CPU test machine the fused LayerNorm runs under Triton's
    interpreter, far too slowly to train (its numerics are tested in tests/triton and test_layers)."""
    return dict(copy.deepcopy(config), use_triton=False)


def test_the_sheet_encoder_decoder_config_builds_and_trains():
    model = xFormer.from_config(xFormerConfig([copy.deepcopy(ENCODER), copy.deepcopy(DECODER)]))
    assert len(model.encoders) == 3 and len(model.decoders) == 2
    # positions are embedded by the first encoder and the first decoder only
    assert model.encoders[0].pose_encoding is not None and model.encoders[1].pose_encoding is None
    assert model.decoders[0].pose_encoding is not None and model.decoders[1].pose_encoding is None
    src = torch.randint(0, VOCAB, (4, SEQ))
    with torch.no_grad():
        assert model(src).shape == (4, SEQ, EMB)
    model = xFormer.from_config(xFormerConfig([_unfused(ENCODER), _unfused(DECODER)]))
    head = torch.nn.Linear(EMB, VOCAB)
    tgt = (src + 3) % VOCAB  # a learnable token map
    losses = _train(model, head, 25, src, tgt)
    assert losses[-1] < 0.5 * losses[0]


def test_input_dicts_are_not_modified():
    enc = copy.deepcopy(ENCODER)
    del enc["multi_head_config"]["dim_model"]
    before = copy.deepcopy(enc)
    xFormerConfig([enc])
    assert enc == before


@pytest.mark.parametrize("style", ["pre", "post", "deepnorm"])
def test_residual_styles_match_their_formulas(style):
    """A one-layer encoder with Skip norms reduces each style to its residual formula."""
    cfg = copy.deepcopy(ENCODER)
    cfg.update(num_layers=1, residual_norm_style=style, normalization="skip", position_encoding_config=None)
    cfg["multi_head_config"]["attention"] = {"name": "scaled_dot_product", "dropout": 0.0}
    model = xFormer.from_config(xFormerConfig([cfg])).eval()
    block = model.encoders[0]
    if style == "pre":
        mha, ff = block.wrap_att.layer.sublayer, block.wrap_ff.sublayer.layer.sublayer
        alpha = 1.0
    else:
        mha, ff = block.wrap_att.sublayer.layer, block.wrap_ff.sublayer.layer
        alpha = get_deepnorm_coefficients(1, 0)[0].alpha if style == "deepnorm" else 1.0
    x = torch.randn(2, 10, EMB)
    h = alpha * x + mha(x)
    torch.testing.assert_close(model(x), alpha * h + ff(h), atol=1e-5, rtol=1e-5)


def test_pre_norm_adds_a_final_norm_on_the_last_layer_only():
    cfg = copy.deepcopy(ENCODER)
    cfg.update(residual_norm_style="pre", use_triton=False)
    model = xFormer.from_config(xFormerConfig([cfg]))
    kinds = [type(b.wrap_ff).__name__ for b in model.encoders]
    assert kinds == ["Residual", "Residual", "PostNorm"]


def test_causal_model_does_not_look_ahead():
    cfg = copy.deepcopy(ENCODER)
    cfg["multi_head_config"]["attention"] = {"name": "scaled_dot_product", "dropout": 0.0, "causal": True}
    cfg["multi_head_config"]["use_rotary_embeddings"] = True
    model = xFormer.from_config(xFormerConfig([cfg])).eval()
    src = torch.randint(0, VOCAB, (2, 20))
    src2 = src.clone()
    src2[:, 12:] = (src2[:, 12:] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(src2)[:, :12], model(src)[:, :12], atol=1e-5, rtol=1e-5)


def test_input_mask_hides_tokens_from_the_keys():
    cfg = copy.deepcopy(ENCODER)
    cfg.update(num_layers=1, position_encoding_config=None)
    cfg["multi_head_config"]["attention"] = {"name": "scaled_dot_product", "dropout": 0.0}
    model = xFormer.from_config(xFormerConfig([cfg])).eval()
    x = torch.randn(2, 8, EMB)
    mask = torch.ones(2, 8)
    mask[:, 5] = 0
    block = model.encoders[0]
    xk = x * mask[..., None]
    expected = block.wrap_ff(inputs=[block.wrap_att(inputs=[x, xk, xk])])
    torch.testing.assert_close(model(x, encoder_input_mask=mask), expected)


def test_reversible_encoder_trains_and_matches_its_blocks():
    cfg = _unfused(ENCODER)
    cfg.update(reversible=True, residual_norm_style="pre")
    model = xFormer.from_config(xFormerConfig([cfg]))
    src = torch.randint(0, VOCAB, (4, SEQ))
    x = model.rev_enc_pose_encoding(src)
    x1, x2 = x, x
    for block in model.encoders.blocks:
        x1 = x1 + block.f.net(x2)
        x2 = x2 + block.g.net(x1)
    torch.testing.assert_close(model(src), (x1 + x2) / 2, atol=1e-5, rtol=1e-5)
    losses = _train(model, torch.nn.Linear(EMB, VOCAB), 25, src, (src + 3) % VOCAB)
    assert losses[-1] < 0.5 * losses[0]


def test_deepnorm_init_uses_beta_as_gain():
    cfg = copy.deepcopy(ENCODER)
    cfg.update(residual_norm_style="deepnorm", num_layers=4)
    torch.manual_seed(0)
    model = xFormer(xFormerConfig([cfg]).stack_configs, weight_init="vit")
    beta = get_deepnorm_coefficients(4, 0)[0].beta
    v = model.encoders[0].wrap_att.sublayer.layer.in_proj_container.v_proj.weight
    q = model.encoders[0].wrap_att.sublayer.layer.in_proj_container.q_proj.weight
    bound = math.sqrt(6 / (EMB + EMB))
    assert v.abs().max() <= beta * bound + 1e-6 and v.abs().max() > 0.8 * beta * bound
    assert q.abs().max() > beta * bound  # DeepNet keeps gain 1 on q and k


def test_tied_embeddings():
    model = xFormer.from_config(
        xFormerConfig([copy.deepcopy(ENCODER), copy.deepcopy(DECODER)], tie_embedding_weights=True)
    )
    assert model.encoders[0].pose_encoding is model.decoders[0].pose_encoding


def test_configuration_errors():
    with pytest.raises(ValueError, match="no encoder"):
        xFormer.from_config(xFormerConfig([copy.deepcopy(DECODER)]))
    rev = dict(copy.deepcopy(ENCODER), reversible=True)
    with pytest.raises(ValueError, match="reversible"):
        xFormer.from_config(xFormerConfig([copy.deepcopy(ENCODER), rev]))
    deep = dict(copy.deepcopy(ENCODER), residual_norm_style="deepnorm")
    with pytest.raises(ValueError, match="DeepNorm"):
        xFormer.from_config(xFormerConfig([copy.deepcopy(ENCODER), deep]))
    with pytest.raises(ValueError, match="block_type"):
        xFormerConfig([dict(copy.deepcopy(ENCODER), block_type="middle")])
    with pytest.raises(ValueError, match="xFormerDecoderConfig"):
        xFormerEncoderConfig(**dict(copy.deepcopy(ENCODER), block_type="decoder"))
    with pytest.raises(KeyError, match="MLP"):
        xFormerConfig([dict(copy.deepcopy(ENCODER), feedforward_config={"name": "nope"})])


def test_model_pickles():
    model = xFormer.from_config(xFormerConfig([copy.deepcopy(ENCODER)])).eval()
    clone = pickle.loads(pickle.dumps(model))
    src = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(clone(src), model(src))


def test_single_config_and_dict_of_stacks():
    enc = xFormerConfig([copy.deepcopy(ENCODER)]).stack_configs[0]
    assert len(xFormer(enc).encoders) == 3
    model = xFormer.from_config(xFormerConfig({"a": copy.deepcopy(ENCODER), "b": copy.deepcopy(DECODER)}))
    assert len(model.encoders) == 3 and len(model.decoders) == 2
