"""Image data: the ADM crops every tokenizer paper uses, and an ImageFolder that survives bad files."""
from __future__ import annotations

import math
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


def _box_halve(img: Image.Image, target_short: int) -> Image.Image:
    # Halving with a box filter while the image is at least twice the target keeps large downscales sharp.
    while min(*img.size) >= 2 * target_short:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    return img


def center_crop_arr(img: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop: box-halve, bicubic resize of the short side to ``image_size``, centre crop."""
    img = _box_halve(img, image_size)
    scale = image_size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y = (arr.shape[0] - image_size) // 2
    x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[y:y + image_size, x:x + image_size])


def random_crop_arr(img: Image.Image, image_size: int, min_crop_frac: float = 0.8, max_crop_frac: float = 1.0,
                    rng: Optional[random.Random] = None) -> Image.Image:
    """ADM random crop: the short side is resized to a size drawn in [size / max_frac, size / min_frac],
    then a random ``image_size`` square is cut out."""
    rng = rng or random
    short = rng.randrange(math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1)
    img = _box_halve(img, short)
    scale = short / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y = rng.randrange(arr.shape[0] - image_size + 1)
    x = rng.randrange(arr.shape[1] - image_size + 1)
    return Image.fromarray(arr[y:y + image_size, x:x + image_size])


def to_model_range(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def find_images(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder discovery: (path, class index) for every image under ``root/<class>/``, sorted, and the
    sorted class names. Images directly under ``root`` (no class folders) get class 0."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-path {root}: no such folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples: list[tuple[str, int]] = []
    if classes:
        for ci, c in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
                samples += [(os.path.join(dirpath, f), ci) for f in sorted(files) if f.endswith(IMG_EXTENSIONS)]
    else:
        samples = [(str(p), 0) for p in sorted(root.iterdir()) if p.name.endswith(IMG_EXTENSIONS)]
        classes = [""]
    if not samples:
        raise FileNotFoundError(f"--data-path {root}: no images found (expected <root>/<class>/<image>)")
    return samples, classes


class ImageFolderSafe(Dataset):
    """An ImageFolder whose items are ``(tensor, label, index)``.

    A file that cannot be decoded is not fatal: the item comes back with a negative index ``-1 - index`` (and a
    zero image); in training the collate step drops it and the loop counts it, in evaluation the caller names
    the file (``dataset.samples[-1 - i][0]``) and stops. ``transform(pil, rng)`` receives a
    ``random.Random`` seeded from (seed, epoch, index) so augmentations are reproducible whatever the number
    of workers, which is what makes an interrupted run resume exactly.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image, random.Random], torch.Tensor],
                 image_size: int, seed: int = 0):
        self.samples, self.classes = find_images(root)
        self.transform = transform
        self.image_size = image_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        rng = random.Random(hash((self.seed, self.epoch, index)) & 0xFFFFFFFF)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's "truncated"/"palette" warnings
                with Image.open(path) as im:
                    img = im.convert("RGB")
            return self.transform(img, rng), label, index
        except Exception:
            return torch.zeros(3, self.image_size, self.image_size), label, -1 - index


def collate_skip_bad(batch):
    """Stack a batch, dropping items with a negative index (unreadable files). Returns (images, labels, n_bad)."""
    good = [b for b in batch if b[2] >= 0]
    n_bad = len(batch) - len(good)
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), n_bad
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), n_bad


def train_transform(image_size: int, flip: bool = True):
    """ADM random crop + random horizontal flip, to [-1, 1]."""
    def f(img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = random_crop_arr(img, image_size, rng=rng)
        if flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_model_range(img)
    return f


def eval_transform(image_size: int):
    """ADM centre crop, to [-1, 1]."""
    return lambda img, rng=None: to_model_range(center_crop_arr(img, image_size))


def rank_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """The dataset indices one rank evaluates: every ``world_size``-th from ``rank``, no padding, so the ranks
    together cover each of the n items exactly once."""
    return np.arange(rank, n, world_size)


def collate_eval(batch):
    """Stack an evaluation batch: (images, labels, indices); a negative index marks an unreadable file."""
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]),
            torch.tensor([b[2] for b in batch]))


def eval_batches(dataset: "ImageFolderSafe", indices: np.ndarray, batch_size: int, num_workers: int):
    """Batches (images, labels, dataset indices) over ``indices`` in order. An unreadable file stops the run
    with a one-line error: evaluation must cover every image of the set to compare with a reference batch."""
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_eval, pin_memory=torch.cuda.is_available())
    for x, y, idx in loader:
        if (idx < 0).any():
            bad = int(-1 - idx[idx < 0][0])
            raise SystemExit(f"error: cannot read image {dataset.samples[bad][0]} (evaluation needs every image)")
        yield x, y, idx
