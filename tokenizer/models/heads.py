"""Transformer modules that sit on the latent grid.

* ``FactorAdapter``: one per factor, between the shared encoder trunk and that factor's quantizer. It is what
  lets one trunk feed several independent sub-codebooks with different content.
* ``FeaturePredictionHead``: predicts a frozen teacher's (CLIP / DINOv2) features from one factor's quantized
  codes; training aligns its class token with the teacher's, which gives that factor its semantic meaning.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import TransformerBlock, resize_positions


class FactorAdapter(nn.Module):
    def __init__(self, grid: int, width: int = 512, layers: int = 6, heads: int = 8):
        super().__init__()
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid * grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([TransformerBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = self.ln_pre(x + resize_positions(self.positional_embedding, (h, w)).to(x.dtype))
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x).transpose(1, 2).reshape(b, c, h, w)


class FeaturePredictionHead(nn.Module):
    """Codes (B, D, h, w) -> features (B, 1 + h*w, width); token 0 is the class token."""

    def __init__(self, code_dim: int, width: int, grid: int, layers: int = 3, heads: int = 8):
        super().__init__()
        self.width = width
        self.upscale = nn.Sequential(nn.Linear(code_dim, width), nn.ReLU(), nn.Linear(width, width))
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([TransformerBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, _, h, w = codes.shape
        x = self.upscale(codes.flatten(2).transpose(1, 2))
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        pos = self.positional_embedding
        pos = torch.cat([pos[:1], resize_positions(pos[1:], (h, w))])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x)
