"""Conversions between model tensors and images, and PNG grids."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded the way the original
    evaluation scripts do (clamp, scale by 127.5 after shifting, truncate after adding 0.5)."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def make_grid(images: torch.Tensor | Sequence[torch.Tensor], nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] -> one uint8 (H', W', 3) grid, ``nrow`` images per row."""
    from torchvision.utils import make_grid as tv_grid

    if not isinstance(images, torch.Tensor):
        images = torch.cat(list(images))
    grid = tv_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, pad_value=1.0)
    return to_uint8(grid[None])[0].numpy()


def save_grid(images: torch.Tensor | Sequence[torch.Tensor], path: str | os.PathLike, nrow: int = 8) -> np.ndarray:
    """Write the grid of ``images`` as a PNG and return it (uint8 H x W x 3)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow)
    Image.fromarray(grid).save(path)
    return grid
