"""Conversions between model tensors and images, and PNG grids."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps


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


# ------------------------------------------------------------------------------------------------------------
# reading: every image as the 8-bit RGB a viewer shows
# ------------------------------------------------------------------------------------------------------------
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over (as a viewer on a white page shows)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (and 32-bit integer) grey, full 16-bit range


EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera sets instead of rotating the pixels (1: as stored)


class UnreadableImage(ValueError):
    """An image whose pixels cannot be turned into RGB faithfully (one-line message)."""


class TooManyUnreadable(RuntimeError):
    """Training met that many unreadable images in a row: the folder is not what it should be (one line). Raised in
    a loader worker, it reaches the training loop re-raised by torch with the worker's traceback in its message,
    which is dropped again here."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\n" in message:  # torch.utils.data's re-raise of a worker's error
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: a JPEG (or PNG, TIFF, WebP) whose EXIF orientation says "rotated" or
    "mirrored" is turned accordingly (``ImageOps.exif_transpose``); any other image is returned as it is, without
    a copy. An EXIF block that cannot be parsed leaves the pixels as stored."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: PIL raises whatever its parser meets
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> its true 8-bit RGB, upright, the one home of this rule for training, reference batches,
    extraction and reconstruction (every reader decodes through it). PIL's own ``convert("RGB")`` ignores the
    EXIF orientation (a portrait photo comes out sideways), clips 16-bit grey to 255 (a 16-bit PNG comes out
    almost white) and drops transparency, showing whatever colour hides under transparent pixels. Here:

    * the EXIF orientation is applied first (``upright``);
    * 16-bit grey (``I;16*``, and ``I``, which PIL uses for 16-bit PNGs) is scaled 65535 -> 255, rounded;
    * 1-bit, grey, palette, CMYK and YCbCr images convert as PIL does (a palette with a transparent entry is
      first expanded to RGBA);
    * transparency (``LA``, ``RGBA``, ``PA``, premultiplied ``La``/``RGBa``) is composited over white;
    * float images (``F``) and anything else PIL cannot convert are refused (UnreadableImage)."""
    img = upright(img)
    mode = img.mode
    if mode in WIDE_MODES:
        arr = np.asarray(img).astype(np.int64)
        arr = np.clip((arr * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        raise UnreadableImage("floating-point pixels (mode F) have no defined 8-bit range")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("La", "RGBa"):
        img, mode = img.convert("RGBA" if mode == "RGBa" else "LA"), ("RGBA" if mode == "RGBa" else "LA")
    if mode in ("LA", "PA", "RGBA") or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    try:  # (a copy also for RGB: the caller may close the file behind ``img``)
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise UnreadableImage(f"PIL cannot convert mode {mode} to RGB ({e})") from None


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as its true 8-bit RGB (see to_rgb); PIL's warnings (truncated, palette) are silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            return to_rgb(im)
