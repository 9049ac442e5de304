"""A Vision Transformer on CIFAR-10, built by the triformers factory (xFormers' cifar_ViT example).

    python examples/cifar_ViT.py --data-dir data             # 30 epochs; about 80% test accuracy
    python examples/cifar_ViT.py --data-dir data --smoke     # a few steps of a tiny model

Patch embedding (a strided convolution), learned positions with a class token, a pre-norm encoder with
rotary embeddings and the fused MLP, then a linear classifier on the class token (or on the token mean).
"""

from __future__ import annotations

import argparse
from enum import Enum

import torch
from cifar_common import add_common_arguments, train_and_evaluate
from torch import nn

from triformers.factory import xFormer, xFormerConfig


class Classifier(str, Enum):
    GAP = "gap"
    TOKEN = "token"


class VisionTransformer(nn.Module):
    """``[B, 3, image_size, image_size]`` images -> ``[B, num_classes]`` logits."""

    def __init__(self, image_size: int = 32, num_classes: int = 10, patch_size: int = 2, dim: int = 384,
                 n_layer: int = 6, n_head: int = 6, resid_pdrop: float = 0.0, attn_pdrop: float = 0.0,
                 mlp_pdrop: float = 0.0, attention: str = "scaled_dot_product", residual_norm_style: str = "pre",
                 hidden_layer_multiplier: int = 4, use_rotary_embeddings: bool = True,
                 classifier: Classifier = Classifier.TOKEN) -> None:  # fmt: skip
        super().__init__()
        self.classifier = Classifier(classifier)
        num_patches = (image_size // patch_size) ** 2
        stack = {
            "block_type": "encoder",
            "num_layers": n_layer,
            "dim_model": dim,
            "residual_norm_style": residual_norm_style,
            "patch_embedding_config": {"in_channels": 3, "kernel_size": patch_size, "stride": patch_size},
            "position_encoding_config": {"name": "learnable", "seq_len": num_patches,
                                         "add_class_token": self.classifier == Classifier.TOKEN},
            "multi_head_config": {
                "num_heads": n_head,
                "residual_dropout": resid_pdrop,
                "use_rotary_embeddings": use_rotary_embeddings,
                "attention": {"name": attention, "dropout": attn_pdrop, "causal": False,
                              "seq_len": num_patches + 1},
            },
            "feedforward_config": {"name": "FusedMLP", "dropout": mlp_pdrop, "activation": "gelu",
                                   "hidden_layer_multiplier": hidden_layer_multiplier},
        }  # fmt: skip
        self.transformer = xFormer.from_config(xFormerConfig([stack], weight_init="small"))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer(x)  # [B, (1 +) patches, dim]
        x = self.ln(x)
        x = x[:, 0] if self.classifier == Classifier.TOKEN else x.mean(dim=1)
        return self.head(x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--attention", default="scaled_dot_product")
    parser.add_argument("--classifier", default="token", choices=[c.value for c in Classifier])
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.smoke:
        model = VisionTransformer(patch_size=4, dim=32, n_layer=2, n_head=2, attention=args.attention,
                                  classifier=args.classifier)  # fmt: skip
        return train_and_evaluate(model, args, epochs=args.epochs or 2, batch=args.batch or 64, lr=args.lr or 3e-3,
                                  weight_decay=0.03, betas=(0.9, 0.99), limit=512)  # fmt: skip
    model = VisionTransformer(attention=args.attention, classifier=args.classifier)
    return train_and_evaluate(model, args, epochs=args.epochs or 30, batch=args.batch or 256, lr=args.lr or 5e-4,
                              weight_decay=0.03, betas=(0.9, 0.99))  # fmt: skip


if __name__ == "__main__":
    main()
