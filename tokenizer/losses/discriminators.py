"""Discriminator factory: ``--disc-type patchgan`` / ``stylegan``."""
from __future__ import annotations

import torch
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


class RealAndFake(nn.Module):
    """The discriminator on real images and on reconstructions in ONE call, each batch on its own (train-mode
    BatchNorm normalises each with its own statistics, as the original does).

    The discriminator step runs this, DDP-wrapped, rather than the DDP-wrapped discriminator twice: DDP
    broadcasts the buffers (BatchNorm's running statistics) in place at every forward, so a second forward
    before the backward modifies tensors the first one saved for it, which PyTorch before 2.14 rejects at the
    backward (seen with 2.11). The original, too, runs both inside one DDP forward (of its loss module)."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)
