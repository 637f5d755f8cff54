"""PatchGAN discriminator (pix2pix; the taming-transformers / LlamaGen / FQGAN variant).

A stack of 4x4 convolutions that classifies overlapping patches instead of the whole image: with the default
3 layers each output logit sees a 70x70 patch, and a 256x256 image gives a (B, 1, 30, 30) logit map.

Layout (``main.<i>``, the original's state-dict keys, so a training checkpoint's "discriminator" entry loads):
conv(stride 2) + LeakyReLU, then ``n_layers - 1`` blocks of conv(stride 2, no bias) + BatchNorm + LeakyReLU
with the width doubling up to 8 * ndf, one more such block at stride 1, and a final conv to one channel.
"""
from __future__ import annotations

import torch
import torch.nn as nn

KERNEL = 4
PADDING = 1
MAX_WIDTH_MULT = 8


def _leaky_relu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2, inplace=True)


class PatchGANDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a PatchGAN discriminator needs n_layers >= 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, KERNEL, stride=2, padding=PADDING), _leaky_relu()]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, MAX_WIDTH_MULT)
            stride = 2 if n < n_layers else 1  # the last normalised block keeps the resolution
            # No conv bias: BatchNorm's shift makes it redundant.
            layers += [nn.Conv2d(width, out, KERNEL, stride=stride, padding=PADDING, bias=False),
                       nn.BatchNorm2d(out), _leaky_relu()]
            width = out
        layers.append(nn.Conv2d(width, 1, KERNEL, stride=1, padding=PADDING))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # taming's DCGAN-style init: conv weights N(0, 0.02) (biases keep PyTorch's default),
        # BatchNorm scale N(1, 0.02) and shift 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch logits (B, 1, h, w)."""
        return self.main(x)
