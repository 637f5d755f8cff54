"""Building blocks of the tokenizer: the taming-style convolutional blocks and a CLIP-style transformer block.

Parameter names follow the released checkpoints (``norm1``, ``conv1``, ``nin_shortcut``, ``q``/``k``/``v``/
``proj_out``; ``ln_1``, ``attn.in_proj_weight``, ``mlp.c_fc`` ...), so a released state dict maps onto these
modules key for key.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def swish(x: torch.Tensor) -> torch.Tensor:
    # F.silu is x * sigmoid(x) in one kernel: equal up to rounding, and it keeps one tensor fewer alive.
    return F.silu(x)


NORM_GROUPS = 32  # every conv width of the encoder / decoder must be a multiple of this


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the channel count changes (the released layout's "nin_shortcut").
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (b, 1, hw, c): one head of width c; SDPA's default scale is c ** -0.5, as in the original.
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only) keeps the released weights' alignment.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout (packed in-projection),
    computed batch-first with ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} heads"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(h.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block (CLIP's ResidualAttentionBlock layout, exact-erf GELU)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def resize_positions(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a (h*w, d) square grid of learned positions to ``grid`` = (H, W) positions.

    Used when the image size differs from the one the positions were trained for (e.g. 512 with weights
    trained at 256); at the trained size the positions are returned untouched, so released numbers stay exact.
    """
    n, d = pos.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"learned positions of length {n} are not a square grid")
    if (side, side) == tuple(grid):
        return pos
    p = pos.reshape(1, side, side, d).permute(0, 3, 1, 2)
    p = F.interpolate(p.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return p.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], d)
