"""Image data: the ADM crops every tokenizer paper uses, and data sets (an ImageFolder, or tar shards through
``utils.shards``) that survive bad files."""
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

from utils.images import TooManyUnreadable, open_rgb

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension, in any case (``.JPEG``, ``.PNG``), as torchvision's
    ImageFolder decides."""
    return name.lower().endswith(IMG_EXTENSIONS)


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


def _visible(name: str) -> bool:
    return not name.startswith(".")  # hidden files and folders (.DS_Store, .ipynb_checkpoints, ._x.jpg ...)


def _walk_images(top: Path, seen_dirs: set, seen_files: set, notes: list[str]) -> list[str]:
    """Image files under ``top``, sorted, following links: each folder (by device and inode) entered once, so a
    link that loops back (to ``top``, the root or another class) is noted and skipped; each file listed once."""
    found = []
    for entry in sorted(os.scandir(top), key=lambda e: e.name):
        if not _visible(entry.name):
            continue
        try:
            st = os.stat(entry.path)  # through links
        except OSError:
            notes.append(f"{entry.path}: broken link, skipped")
            continue
        ident = (st.st_dev, st.st_ino)
        if entry.is_dir():
            if ident in seen_dirs:
                notes.append(f"{entry.path}: links to a folder already listed (a loop or another class), skipped")
                continue
            seen_dirs.add(ident)
            found += _walk_images(Path(entry.path), seen_dirs, seen_files, notes)
        elif is_image_file(entry.name) and ident not in seen_files:
            seen_files.add(ident)
            found.append(entry.path)
    return found


def find_images(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder discovery: (path, class index) for every image under ``root/<class>/``, sorted, and the
    sorted class names. Images directly under ``root`` (no class folders) get class 0. The list is what a user
    sees: hidden files and folders are left out, links are followed but a folder is entered once (a link that
    loops is skipped with a warning, instead of multiplying images under the wrong class) and each file is
    listed once, under the first class that holds it. A root that holds both image files and folders is refused:
    it is neither layout (a folder named ``x.jpg`` among flat images would otherwise be the only class)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-path {root}: " + ("is a file, not a folder" if root.exists() else
                                                           "no such folder"))
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _visible(d.name))
    loose = sorted(p.name for p in root.iterdir() if is_image_file(p.name) and _visible(p.name) and p.is_file())
    if classes and loose:
        some = lambda names: ", ".join(names[:2]) + (" ..." if len(names) > 2 else "")  # noqa: E731
        raise FileNotFoundError(f"--data-path {root}: holds both image files ({some(loose)}) and folders "
                                f"({some([c + '/' for c in classes])}): use <root>/<class>/<image>, or a flat "
                                f"folder of images only")
    samples: list[tuple[str, int]] = []
    notes: list[str] = []
    seen_files: set = set()
    if classes:
        # the root and every class folder count as entered from the start: a link to one of them is a loop
        seen_dirs = {(st.st_dev, st.st_ino) for st in [os.stat(root)] + [os.stat(root / c) for c in classes]}
        for ci, c in enumerate(classes):
            samples += [(f, ci) for f in _walk_images(root / c, seen_dirs, seen_files, notes)]
    else:
        samples = [(str(root / name), 0) for name in loose]
        classes = [""]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    if not samples:
        raise FileNotFoundError(f"--data-path {root}: no images found (expected <root>/<class>/<image>)")
    return samples, classes


def sample_key(relpath: str) -> str:
    """An image's key, in the WebDataset sense, from its path under the data root: the path without its
    extension, dots in the file name made underscores (a WebDataset key ends at the name's first dot, so
    ``cat/a.b.png`` would otherwise split into key ``cat/a`` and extension ``b.png``)."""
    folder, _, name = relpath.replace(os.sep, "/").rpartition("/")
    stem = name.rsplit(".", 1)[0].replace(".", "_")
    return f"{folder}/{stem}" if folder else stem


class SafeImageDataset(Dataset):
    """Images whose items are ``(image tensor, label, index, unreadable)``, whatever holds them (a folder,
    ``ImageFolderSafe``; tar shards, ``utils.shards.ShardDataset``). Subclasses say how to read image ``i``
    (``read``), its label (``label``), its name in messages (``where``) and its key (``key``).

    An image that cannot be decoded never raises inside a worker. With ``fallback`` (training) the next readable
    image takes its place, so every batch keeps its size and every rank the same number of steps, and
    ``unreadable`` counts the images skipped for this item. Without it (evaluation, where each image must be
    covered) the item comes back as a zero image with ``unreadable = 1`` and the caller names the image
    (``dataset.where(index)``) and stops.

    ``transform(pil, rng)`` receives a ``random.Random`` seeded from (seed, epoch, index), so augmentations are
    reproducible whatever the number of workers, which is what makes an interrupted run resume exactly.
    """

    classes: list[str]

    def __init__(self, transform: Callable[[Image.Image, random.Random], torch.Tensor], image_size: int,
                 seed: int = 0, fallback: bool = False, max_fallbacks: int = 100):
        self.transform = transform
        self.image_size = image_size
        self.seed = seed
        self.fallback = fallback
        self.max_fallbacks = max_fallbacks
        self.epoch = 0

    def read(self, index: int) -> Image.Image:
        """Image ``index`` as its true 8-bit RGB (raises if it cannot be read)."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Image ``index`` named for a message: its file, or its shard and member."""
        raise NotImplementedError

    def key(self, index: int) -> str:
        """Image ``index``'s key (``sample_key``): the same for an image in its folder and in the shards the
        converter made of it."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int):
        rng = random.Random(hash((self.seed, self.epoch, index)) & 0xFFFFFFFF)
        return self.transform(self.read(index), rng), self.label(index)

    def __getitem__(self, index: int):
        tries = self.max_fallbacks if self.fallback else 1
        for bad in range(tries):
            i = (index + bad) % len(self)
            try:
                x, label = self._load(i)
                return x, label, i, bad
            except Exception as e:
                last = e
                continue
        if self.fallback:
            why = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
            raise TooManyUnreadable(f"{self.max_fallbacks} unreadable images in a row from {self.where(index)} "
                                    f"(the last: {why}); is --data-path the folder of images it should be?")
        # A black stand-in, through the same transform so it stacks with the batch (views included).
        blank = Image.new("RGB", (self.image_size, self.image_size))
        return self.transform(blank, random.Random(0)), self.label(index), index, 1


class ImageFolderSafe(SafeImageDataset):
    """An ImageFolder (``find_images``) as a SafeImageDataset; ``samples`` holds (path, class index)."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image, random.Random], torch.Tensor],
                 image_size: int, seed: int = 0, fallback: bool = False, max_fallbacks: int = 100):
        super().__init__(transform, image_size, seed, fallback, max_fallbacks)
        self.root = Path(root)
        self.samples, self.classes = find_images(root)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Image.Image:
        return open_rgb(self.samples[index][0])

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def where(self, index: int) -> str:
        return str(self.samples[index][0])

    def key(self, index: int) -> str:
        return sample_key(os.path.relpath(self.samples[index][0], self.root))


def image_dataset(path: str | os.PathLike, transform: Callable[[Image.Image, random.Random], torch.Tensor],
                  image_size: int, seed: int = 0, fallback: bool = False) -> SafeImageDataset:
    """What ``--data-path`` names, as a SafeImageDataset: WebDataset tar shards (a brace pattern such as
    ``train-{000000..000127}.tar``, one ``.tar``, a folder of ``.tar`` files, or a text file listing shards;
    ``utils.shards``) or else an ImageFolder. Both list their images in one fixed order, so samplers, resumes
    and reference batches behave the same on either."""
    from utils.shards import ShardDataset, shard_paths

    shards = shard_paths(path)
    if shards is None:
        return ImageFolderSafe(path, transform, image_size, seed=seed, fallback=fallback)
    return ShardDataset(shards, transform, image_size, seed=seed, fallback=fallback)


def collate_train(batch):
    """Stack a training batch: (images, labels, number of unreadable files skipped)."""
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), sum(b[3] for b in batch))


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
    """Stack an evaluation batch: (images, labels, indices, unreadable flags)."""
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]),
            torch.tensor([b[2] for b in batch]), torch.tensor([b[3] for b in batch], dtype=torch.bool))


class UnreadableImage(ValueError):
    """An image evaluation must cover cannot be read (one line naming it)."""


def eval_batches(dataset: SafeImageDataset, indices: np.ndarray, batch_size: int, num_workers: int,
                 allow_bad: bool = False):
    """Batches (images, labels, dataset indices, unreadable flags) over ``indices`` in order. Without
    ``allow_bad`` an unreadable file stops the run with a one-line error: evaluation must cover every image of
    the set to compare with a reference batch. With it, such items come as black images flagged in ``bad``."""
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_eval, pin_memory=torch.cuda.is_available())
    for x, y, idx, bad in loader:
        if bad.any() and not allow_bad:
            raise UnreadableImage(f"cannot read image {dataset.where(int(idx[bad][0]))} (evaluation needs every "
                                  f"image)")
        yield x, y, idx, bad


class ResumableSampler(torch.utils.data.Sampler):
    """Distributed sampler that can start an epoch part-way through, for exact resumption.

    Each epoch is a permutation seeded by (seed, epoch), cut so every rank gets the same number of whole
    batches (the tail is dropped, as with DistributedSampler + drop_last). ``set_epoch(e, start_batch=k)``
    skips the k batches this rank already trained on."""

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.batch, self.rank, self.world = num_items, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_items} items cannot fill one batch of {batch_size} on each of {world_size} "
                             f"processes; lower the batch size or add data")

    @property
    def batches_per_epoch(self) -> int:
        return (self.n // self.world) // self.batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 64)  # (any --global-seed)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[self.rank::self.world][:self.batches_per_epoch * self.batch]
        return iter(mine[self.start_batch * self.batch:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch


def epoch_loader(dataset, sampler, batch_size: int, num_workers: int, collate_fn, device: torch.device,
                 seed: int) -> torch.utils.data.DataLoader:
    """The loader of one training epoch. It gets its own generator: drawing its worker seeds from the global RNG
    would shift dropout masks after a resume."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=num_workers, collate_fn=collate_fn,
                                       pin_memory=device.type == "cuda", worker_init_fn=ignore_interrupt,
                                       generator=torch.Generator().manual_seed(seed))


def ignore_interrupt(worker_id: int) -> None:
    """Loader workers ignore SIGINT: a terminal's Ctrl-C reaches them too, and a worker that dies of it would
    break the step the main process is finishing before its checkpoint (see utils.preemption.StopSignal)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
