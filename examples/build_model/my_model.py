"""Build a model from the Hydra configuration in conf/ and run a random batch through it.

    python examples/build_model/my_model.py                 # the full model (emb 384, seq 1024)
    python examples/build_model/my_model.py emb=128 seq=256  # any Hydra override
    python examples/build_model/my_model.py --smoke          # a tiny model, for the tests

The stacks (conf/stack) pick their attention from conf/attention, whose files extend the typed schemas
that ``import_xformer_config_schema`` registers for every component.
"""

import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from triformers.factory.hydra_helper import import_xformer_config_schema

SMOKE_OVERRIDES = [
    "emb=32",
    "seq=64",
    "vocab=16",
    "xformer.stack_configs.encoder_local.num_layers=1",
    "xformer.stack_configs.encoder_random.num_layers=1",
    "xformer.stack_configs.decoder_nystrom_favor.num_layers=1",
    "xformer.stack_configs.encoder_local.use_triton=false",
    "xformer.stack_configs.encoder_random.use_triton=false",
    "xformer.stack_configs.decoder_nystrom_favor.use_triton=false",
]


@hydra.main(config_path="conf", config_name="config", version_base=None)
def my_app(cfg: DictConfig) -> None:
    model = hydra.utils.instantiate(cfg.xformer, _convert_="all")
    print(model)
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq))
    with torch.no_grad():
        out = model(tokens)
    print(f"parameters: {params:,}")
    print(f"input {tuple(tokens.shape)} -> output {tuple(out.shape)}")
    print(OmegaConf.to_yaml(cfg.xformer.stack_configs.encoder_local.multi_head_config.attention))


if __name__ == "__main__":
    import_xformer_config_schema()  # the schemas must be stored before Hydra composes the config
    if "--smoke" in sys.argv:
        sys.argv.remove("--smoke")
        sys.argv += SMOKE_OVERRIDES
    my_app()
