"""The convolutional encoder trunk (shared by all factors) and the pixel decoder.

Layout: ``conv_in``, one ``conv_blocks[i]`` per resolution level (``res`` blocks, ``attn`` blocks at the lowest
resolution only, then ``downsample`` / ``upsample``), and a ``mid`` stack (ResNet, attention, ResNet).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm, swish


class _Level(nn.Module):
    """One resolution level: residual blocks, attention after each of them at the lowest level, a resampler."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample_name: str | None,
                 resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample_name = resample_name
        if resample_name:
            self.add_module(resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample_name:
            h = getattr(self, self.resample_name)(h)
        return h


def _mid(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


class EncoderTrunk(nn.Module):
    """Image (B, 3, H, W) -> features (B, ch * ch_mult[-1], H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, ch_mult: Sequence[int], ch: int = 128, num_res_blocks: int = 2, dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels = []
        block_in = ch
        last = len(ch_mult) - 1
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            res, attn = [], []
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == last:
                    attn.append(AttnBlock(block_in))
            levels.append(_Level(res, attn, None if i == last else "downsample",
                                 None if i == last else Downsample(block_in)))
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _mid(block_in, dropout)
        self.out_channels = block_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return h


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h * 2^(L-1), w * 2^(L-1))."""

    def __init__(self, ch_mult: Sequence[int], ch: int = 128, num_res_blocks: int = 2, z_channels: int = 256,
                 dropout: float = 0.0, out_channels: int = 3):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        levels = []
        last = len(ch_mult) - 1
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            res, attn = [], []
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == last:
                    attn.append(AttnBlock(block_in))
            levels.append(_Level(res, attn, "upsample" if i else None, Upsample(block_in) if i else None))
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))
