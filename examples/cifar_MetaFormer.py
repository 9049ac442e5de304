"""A MetaFormer (PoolFormer-like hierarchical transformer) on CIFAR-10, from hierarchical configs.

    python examples/cifar_MetaFormer.py --data-dir data                  # 50 epochs; about 86% accuracy
    python examples/cifar_MetaFormer.py --data-dir data --attention pooling
    python examples/cifar_MetaFormer.py --data-dir data --smoke

Four stages (64, 128, 320, 512 channels), each opening with a strided patch embedding that halves the
grid, built by ``get_hierarchical_configuration``; token means feed a linear classifier.
"""

from __future__ import annotations

import argparse

import torch
from cifar_common import add_common_arguments, train_and_evaluate
from torch import nn

from triformers.factory import BasicLayerConfig, get_hierarchical_configuration, xFormer, xFormerConfig


class MetaVisionTransformer(nn.Module):
    """``[B, 3, image_size, image_size]`` images -> ``[B, num_classes]`` logits."""

    def __init__(self, image_size: int = 32, num_classes: int = 10, attention: str = "scaled_dot_product",
                 feedforward: str = "MLP", residual_norm_style: str = "pre", use_rotary_embeddings: bool = True,
                 embeddings: tuple[int, ...] = (64, 128, 320, 512), dim_head: int = 32) -> None:  # fmt: skip
        super().__init__()
        stages = [
            BasicLayerConfig(embedding=e, attention_mechanism=attention, patch_size=3, stride=2, padding=1,
                             seq_len=image_size * image_size // 4 ** (i + 1), feedforward=feedforward)
            for i, e in enumerate(embeddings)
        ]  # fmt: skip
        config = xFormerConfig(
            get_hierarchical_configuration(stages, residual_norm_style=residual_norm_style,
                                           use_rotary_embeddings=use_rotary_embeddings, mlp_multiplier=4,
                                           dim_head=dim_head),
            weight_init="moco",
        )  # fmt: skip
        self.trunk = xFormer.from_config(config)
        self.ln = nn.LayerNorm(embeddings[-1])
        self.head = nn.Linear(embeddings[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.trunk(x))
        return self.head(x.mean(dim=1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--attention", default="scaled_dot_product")
    parser.add_argument("--feedforward", default="MLP")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.smoke:
        model = MetaVisionTransformer(attention=args.attention, feedforward=args.feedforward,
                                      embeddings=(16, 32, 48, 64), dim_head=8)  # fmt: skip
        return train_and_evaluate(model, args, epochs=args.epochs or 2, batch=args.batch or 64, lr=args.lr or 3e-3,
                                  weight_decay=0.01, betas=(0.9, 0.99), limit=512)  # fmt: skip
    model = MetaVisionTransformer(attention=args.attention, feedforward=args.feedforward)
    return train_and_evaluate(model, args, epochs=args.epochs or 50, batch=args.batch or 256, lr=args.lr or 1e-3,
                              weight_decay=0.01, betas=(0.9, 0.99))  # fmt: skip


if __name__ == "__main__":
    main()
