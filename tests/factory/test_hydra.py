"""Hydra: the component schemas in the ConfigStore, and the example YAML building the same model as the
equivalent dict config."""

import copy
from pathlib import Path

import pytest
import torch

# hydra is the optional `hydra` extra (installed by `make test`); elsewhere this module reports a skip
pytest.importorskip("hydra", reason="needs the hydra extra: pip install -e '.[hydra]'")
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from triformers.factory import xFormer, xFormerConfig  # noqa: E402
from triformers.factory.hydra_helper import import_xformer_config_schema  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "examples" / "build_model" / "conf"
EMB, SEQ, VOCAB = 32, 64, 16


def test_schemas_are_registered():
    stored = import_xformer_config_schema()
    cs = ConfigStore.instance()
    assert sorted(cs.list("xformers")) == ["attention", "ff", "pe"]
    assert "favor_schema.yaml" in cs.list("xformers/attention")
    assert {"MLP_schema.yaml", "FusedMLP_schema.yaml"} <= set(cs.list("xformers/ff"))
    assert {"vocab_schema.yaml", "sine_schema.yaml", "learnable_schema.yaml"} <= set(cs.list("xformers/pe"))
    from triformers.components import ATTENTION_REGISTRY, FEEDFORWARD_REGISTRY, POSITION_EMBEDDING_REGISTRY

    for group, registry in (("attention", ATTENTION_REGISTRY), ("ff", FEEDFORWARD_REGISTRY),
                            ("pe", POSITION_EMBEDDING_REGISTRY)):  # fmt: skip
        for name in registry:
            assert f"xformers/{group}/{name}_schema" in stored  # every component has its schema


def _dict_stacks():
    base = {
        "block_type": "encoder", "reversible": False, "num_layers": 1, "use_triton": False, "dim_model": EMB,
        "residual_norm_style": "pre",
        "position_encoding_config": {"name": "vocab", "seq_len": SEQ, "vocab_size": VOCAB, "dropout": 0},
        "multi_head_config": {"num_heads": 4, "residual_dropout": 0},
        "feedforward_config": {"name": "MLP", "dropout": 0, "activation": "relu", "hidden_layer_multiplier": 4},
    }  # fmt: skip
    local = copy.deepcopy(base)
    local["multi_head_config"]["attention"] = {
        "name": "local",
        "dropout": 0,
        "causal": False,
        "window_size": 5,
        "force_sparsity": False,
    }
    rand = copy.deepcopy(base)
    rand["multi_head_config"]["attention"] = {
        "name": "random",
        "dropout": 0,
        "causal": False,
        "r": 0.01,
        "constant_masking": True,
        "force_sparsity": False,
    }
    dec = copy.deepcopy(base)
    del dec["reversible"], dec["multi_head_config"]
    dec["block_type"] = "decoder"
    dec["multi_head_config_masked"] = {
        "num_heads": 4,
        "residual_dropout": 0,
        "attention": {
            "name": "nystrom",
            "dropout": 0,
            "causal": True,
            "num_landmarks": 64,
            "use_razavi_pinverse": True,
            "pinverse_original_init": False,
            "inv_iterations": 6,
        },
    }
    dec["multi_head_config_cross"] = {
        "num_heads": 4,
        "residual_dropout": 0,
        "attention": {"name": "favor", "dropout": 0, "causal": False, "feature_map": "sm_reg"},
    }
    return {"encoder_local": local, "encoder_random": rand, "decoder_nystrom_favor": dec}


def test_the_example_yaml_builds_the_same_model_as_the_dict_config():
    import_xformer_config_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"emb={EMB}", f"seq={SEQ}", f"vocab={VOCAB}",
            *[f"xformer.stack_configs.{s}.num_layers=1" for s in _dict_stacks()],
            *[f"xformer.stack_configs.{s}.use_triton=false" for s in _dict_stacks()],
        ])  # fmt: skip
    assert cfg.xformer._target_ == "triformers.factory.model_factory.xFormer"
    torch.manual_seed(0)
    from_yaml = instantiate(cfg.xformer, _convert_="all")
    torch.manual_seed(0)
    from_dict = xFormer.from_config(xFormerConfig(_dict_stacks(), weight_init="vit"))
    assert isinstance(from_yaml, xFormer)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(from_yaml) == shapes(from_dict)
    for (name, a), b in zip(from_yaml.state_dict().items(), from_dict.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    from_yaml.eval(), from_dict.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        y1 = from_yaml(tokens)
        torch.manual_seed(1)
        y2 = from_dict(tokens)
    torch.testing.assert_close(y1, y2)
