"""Streaming image batches out of ``.npz`` files, and the input checks the evaluator runs before any work.

A 50,000-image batch at 256x256 is ~9.8 GB, so ``arr_0`` is never loaded whole: the ``.npy`` member is opened
inside the zip, its header parsed with numpy's format helpers, and the rows read in chunks. Compressed npz files
(``np.savez_compressed``) stream the same way, since ``zipfile`` decompresses as it reads.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, TypeVar

import numpy as np

from evaluations.errors import EvaluatorInputError

ARRAY_NAME = "arr_0"
# Precision/recall takes each point's 3rd nearest neighbour besides itself, so fewer than 4 images cannot work.
MIN_IMAGES = 4


@dataclass(frozen=True)
class ImageArrayInfo:
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def num_images(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]


def _read_exact(f: IO[bytes], size: int, path: str) -> bytes:
    # Stream readers may return short reads; loop until done or EOF.
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            raise EvaluatorInputError(f"{path}: '{ARRAY_NAME}' is truncated (expected {size} more bytes, got {got})")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@contextmanager
def _open_member(path: str, name: str = ARRAY_NAME) -> Iterator[tuple[IO[bytes], zipfile.ZipInfo]]:
    if os.path.isdir(path):
        raise EvaluatorInputError(f"{path}: is a folder, not an .npz file")
    if not os.path.isfile(path):
        raise EvaluatorInputError(f"{path}: file not found")
    try:
        zf = zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile:
        raise EvaluatorInputError(f"{path}: not an .npz file (not a zip archive)") from None
    with zf:
        member = f"{name}.npy"
        if member not in zf.namelist():
            found = ", ".join(n.removesuffix(".npy") for n in zf.namelist()) or "nothing"
            raise EvaluatorInputError(f"{path}: no '{name}' array in the npz (it holds: {found})")
        with zf.open(member, "r") as f:
            yield f, zf.getinfo(member)


def _read_header(f: IO[bytes], path: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # 3.0 is only written for structured dtypes with unicode field names, never for images
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as e:
        raise EvaluatorInputError(f"{path}: '{ARRAY_NAME}' is not a valid .npy array ({e})") from None
    return tuple(shape), fortran, dtype


def read_info(path: str) -> ImageArrayInfo:
    """Parse the header of ``arr_0`` (no pixel data is read) and check the member holds all the data it declares."""
    with _open_member(path) as (f, member):
        shape, fortran, dtype = _read_header(f, path)
        expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if member.file_size < expected:
        # Catches a batch whose writer died part way, before hours of feature extraction rather than after.
        raise EvaluatorInputError(
            f"{path}: '{ARRAY_NAME}' is truncated ({member.file_size} bytes stored, {expected} expected)")
    return ImageArrayInfo(path, shape, dtype, fortran)


def validate_images(path: str) -> ImageArrayInfo:
    """Check that ``arr_0`` is an N x H x W x 3 uint8 image batch; raise EvaluatorInputError otherwise."""
    info = read_info(path)
    if info.dtype != np.uint8:
        raise EvaluatorInputError(f"{path}: '{ARRAY_NAME}' has dtype {info.dtype}, expected uint8 images in [0, 255]")
    if len(info.shape) != 4 or info.shape[3] != 3:
        raise EvaluatorInputError(
            f"{path}: '{ARRAY_NAME}' has shape {info.shape}, expected N x H x W x 3 (RGB, channels last)")
    if info.num_images < MIN_IMAGES:
        raise EvaluatorInputError(
            f"{path}: '{ARRAY_NAME}' holds {info.num_images} images; at least {MIN_IMAGES} are needed "
            "(precision/recall uses each image's 3 nearest neighbours)")
    if min(info.image_size) < 1:
        raise EvaluatorInputError(f"{path}: '{ARRAY_NAME}' has empty images, shape {info.shape}")
    return info


def iter_batches(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """Yield ``arr_0`` in row batches of ``batch_size`` (the last one shorter), reading only one batch at a time."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    with _open_member(path) as (f, _):
        shape, fortran, dtype = _read_header(f, path)
        if fortran or dtype.hasobject:
            # Rows of a Fortran-ordered array are not contiguous on disk, and object arrays need pickle; both are
            # rare for image batches, so (like the ADM evaluator) fall back to loading the array whole.
            print(f"warning: {path}: '{ARRAY_NAME}' is not C-ordered, loading it whole", file=sys.stderr)
            arr = np.load(path, allow_pickle=False)[ARRAY_NAME]
            for start in range(0, len(arr), batch_size):
                yield arr[start:start + batch_size]
            return
        row_shape = tuple(shape[1:])
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        n = shape[0] if shape else 0
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            data = _read_exact(f, count * row_bytes, path)
            yield np.frombuffer(data, dtype=dtype).reshape((count, *row_shape))


T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` while a background thread reads up to ``depth`` ahead, so reading (and decompressing) the
    next batch overlaps the Inception forward pass of this one. The reader's exceptions are raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def reader():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((None, StopIteration()))
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            put((None, e))

    threading.Thread(target=reader, daemon=True, name="prefetch").start()
    try:
        while True:
            item, error = q.get()
            if isinstance(error, StopIteration):
                return
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()  # the consumer stopped early (or failed): let the reader thread end


def num_batches(num_items: int, batch_size: int) -> int:
    return -(-num_items // batch_size)


def read_precomputed_statistics(path: str) -> dict[str, np.ndarray] | None:
    """``mu``/``sigma``/``mu_s``/``sigma_s`` when the npz carries them (ADM reference batches do), else None.
    Statistics that are not finite numbers are refused here, before any feature or matrix function.

    ``np.load`` on an npz is lazy per member, so this never touches ``arr_0``."""
    keys = ("mu", "sigma", "mu_s", "sigma_s")
    with np.load(path, allow_pickle=False) as npz:
        if "mu" not in npz.files:
            return None
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise EvaluatorInputError(
                f"{path}: has 'mu' but lacks {', '.join(missing)} (need all of {', '.join(keys)})")
        stats = {k: npz[k] for k in keys}
    for k, v in stats.items():
        if v.dtype.kind not in "fiu":
            raise EvaluatorInputError(f"{path}: stored '{k}' has dtype {v.dtype}, not numbers")
        bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        if bad:
            raise EvaluatorInputError(f"{path}: stored '{k}' holds {bad} non-finite value{'s' if bad > 1 else ''} "
                                      f"(nan or inf): no FID can be computed from it (remove mu/sigma/mu_s/sigma_s "
                                      f"to have them computed from the images)")
    return stats
