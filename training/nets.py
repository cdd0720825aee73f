"""Networks we train: diffusers UNet2DModel (epsilon prediction) and VQModel / AutoencoderKL (downsampling 4)."""
from __future__ import annotations

from typing import Sequence

import torch

INITS = ("default", "kaiming", "xavier", "orthogonal", "small")


def build_unet(sample_size: int, channels: int, block_out_channels: Sequence[int], layers_per_block: int = 2,
               attention_levels: Sequence[int] = (), time_embedding_dim: int | None = None, norm_num_groups: int = 8,
               dropout: float = 0.0, attention_head_dim: int = 8):
    """A UNet whose level i (resolution sample_size / 2^i) has attention when i is in ``attention_levels``."""
    from diffusers import UNet2DModel

    levels = range(len(block_out_channels))
    bad = [i for i in attention_levels if i not in levels]
    if bad:
        raise ValueError(f"attention_levels {bad} outside the {len(block_out_channels)} levels")
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(levels))
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                       down_block_types=down, up_block_types=up, norm_num_groups=norm_num_groups,
                       time_embedding_dim=time_embedding_dim, dropout=dropout, attention_head_dim=attention_head_dim)


def build_autoencoder(kind: str, channels: int, latent_channels: int = 3, block_out_channels: Sequence[int] = (32, 64, 64),
                      layers_per_block: int = 1, num_vq_embeddings: int = 256, norm_num_groups: int = 16):
    """VQModel ('vq') or AutoencoderKL ('kl'); three blocks give a downsampling factor of 4."""
    from diffusers import AutoencoderKL, VQModel

    common = dict(in_channels=channels, out_channels=channels, block_out_channels=tuple(block_out_channels),
                  layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                  down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
                  up_block_types=("UpDecoderBlock2D",) * len(block_out_channels))
    if kind == "vq":
        return VQModel(num_vq_embeddings=num_vq_embeddings, vq_embed_dim=latent_channels, **common)
    if kind == "kl":
        return AutoencoderKL(**common)
    raise ValueError(f"autoencoder kind must be 'vq' or 'kl', got {kind!r}")


@torch.no_grad()
def init_weights(model: torch.nn.Module, scheme: str = "default") -> None:
    """Re-initialise conv and linear weights: kaiming (normal, fan_in), xavier (uniform), orthogonal, or
    'small' (the default init scaled by 0.1, with the output conv zeroed so training starts from eps = 0)."""
    if scheme not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {scheme!r}")
    if scheme == "default":
        return
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for m in layers:
        if scheme == "kaiming":
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif scheme == "xavier":
            torch.nn.init.xavier_uniform_(m.weight)
        elif scheme == "orthogonal":
            torch.nn.init.orthogonal_(m.weight)
        else:
            m.weight.mul_(0.1)
        if m.bias is not None:
            m.bias.zero_()
    if scheme == "small" and hasattr(model, "conv_out"):
        model.conv_out.weight.zero_()
