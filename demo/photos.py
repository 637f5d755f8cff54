"""A small class-labelled ImageFolder made from the photographs that ship with scikit-image.

No download is needed: ``skimage.data`` carries these files. Each class is one photograph; its images are
random crops of it (random position and scale, optional flip), so a class is visually coherent and a few
classes are easy to tell apart, which is what a demo of class-conditional generation needs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {  # class name -> skimage.data function (colour photographs only)
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "hubble": "hubble_deep_field",
    "retina": "retina",
}


def load_photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, PHOTOS[name])()).convert("RGB")


def random_crops(img: Image.Image, n: int, size: int, rng: np.random.Generator,
                 min_frac: float = 0.35, max_frac: float = 0.8) -> list[Image.Image]:
    """``n`` square crops covering ``min_frac``..``max_frac`` of the short side, resized to ``size``."""
    w, h = img.size
    out = []
    for _ in range(n):
        side = int(min(w, h) * rng.uniform(min_frac, max_frac))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(crop)
    return out


def build_photo_folder(root: str | os.PathLike, per_class: int, size: int, classes: list[str] | None = None,
                       seed: int = 0, fmt: str = "png") -> Path:
    """Write ``root/<class>/<i>.png`` crops; returns root. Deterministic for a given seed."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in classes or list(PHOTOS):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(random_crops(load_photo(name), per_class, size, rng)):
            crop.save(d / f"{i:04d}.{fmt}")
    return root
