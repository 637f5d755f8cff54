"""StyleGAN2-style residual discriminator (the variant LlamaGen and FQGAN offer as ``--disc-type stylegan``).

One logit per image. A 3x3 stem at full resolution, then residual blocks that halve the resolution down to
4x4 (each: two 3x3 convs, a [1, 2, 1] binomial blur and a stride-2 conv on the main path, a stride-2 1x1 conv
on the skip path, summed and scaled by 1/sqrt(2) to keep the variance), then a 3x3 conv and a two-layer MLP
on the flattened 4x4x512 map. Widths follow StyleGAN2's table (512 up to 32x32, then halving per octave,
times ``channel_multiplier``). No normalisation layers, PyTorch's default init.

Parameter names are the original's (``blocks.<i>.net.0``, ``blocks.<i>.downsample.1``, ``final_linear.2`` ...),
including the blur kernel buffer ``downsample.0.f``, so a training checkpoint's "discriminator" entry loads.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FINAL_RESOLUTION = 4


def stylegan_widths(channel_multiplier: int = 1) -> dict[int, int]:
    """Feature width at each resolution."""
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}


def _leaky_relu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2, inplace=True)


class Blur(nn.Module):
    """Depthwise 3x3 binomial low-pass ([1, 2, 1] outer [1, 2, 1], normalised to sum 1) with reflect padding.

    Blurring before the strided conv is StyleGAN's anti-aliasing; the original called kornia's
    ``filter2d(x, k, normalized=True)``, whose defaults are reflect borders, 'same' output size and
    correlation - reproduced here without the kornia dependency."""

    def __init__(self):
        super().__init__()
        self.register_buffer("f", torch.tensor([1.0, 2.0, 1.0]))  # persistent: the original's state dict has it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = torch.outer(self.f, self.f)
        kernel = (kernel / kernel.abs().sum()).to(x.dtype)
        c = x.shape[1]
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)


class DownBlock(nn.Module):
    """Residual block that halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv_res = nn.Conv2d(in_channels, out_channels, 1, stride=2)
        self.net = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), _leaky_relu(),
                                 nn.Conv2d(out_channels, out_channels, 3, padding=1), _leaky_relu())
        self.downsample = nn.Sequential(Blur(), nn.Conv2d(out_channels, out_channels, 3, padding=1, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.downsample(self.net(x)) + self.conv_res(x)) * (1 / math.sqrt(2))


class StyleGANDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, image_size: int = 256, channel_multiplier: int = 1):
        super().__init__()
        widths = stylegan_widths(channel_multiplier)
        if image_size not in widths:
            raise ValueError(f"the StyleGAN discriminator needs a power-of-two image size in 4..1024, "
                             f"got {image_size}")
        self.image_size = image_size
        width = widths[image_size]
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), _leaky_relu()]
        res = image_size
        while res > FINAL_RESOLUTION:
            res //= 2
            blocks.append(DownBlock(width, widths[res]))
            width = widths[res]
        self.blocks = nn.ModuleList(blocks)
        final = widths[FINAL_RESOLUTION]
        self.final_conv = nn.Sequential(nn.Conv2d(width, final, 3, padding=1), _leaky_relu())
        self.final_linear = nn.Sequential(nn.Linear(final * FINAL_RESOLUTION ** 2, final), _leaky_relu(),
                                          nn.Linear(final, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, image_size, image_size) -> logits (B, 1)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this StyleGAN discriminator was built for {self.image_size}x{self.image_size} "
                             f"images (disc image_size), got {tuple(x.shape[-2:])}")
        for block in self.blocks:
            x = block(x)
        x = self.final_conv(x)
        return self.final_linear(x.flatten(1))
