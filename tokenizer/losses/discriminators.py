"""Discriminator factory: ``--disc-type patchgan`` / ``stylegan``."""
from __future__ import annotations

import torch.nn as nn

from .patchgan import PatchGANDiscriminator
from .stylegan import StyleGANDiscriminator

DISCRIMINATORS = ("patchgan", "stylegan")


def build_discriminator(kind: str = "patchgan", in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
                        image_size: int = 256, channel_multiplier: int = 1) -> nn.Module:
    """``ndf`` / ``n_layers`` shape the PatchGAN; ``image_size`` / ``channel_multiplier`` the StyleGAN one
    (like the original, each ignores the other's arguments)."""
    if kind == "patchgan":
        return PatchGANDiscriminator(in_channels, ndf, n_layers)
    if kind == "stylegan":
        return StyleGANDiscriminator(in_channels, image_size, channel_multiplier)
    raise ValueError(f"unknown discriminator type {kind!r}; choose from {DISCRIMINATORS}")
