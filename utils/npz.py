"""Writing large ``.npz`` batches (the FID evaluator's input) from many processes with bounded memory.

Every rank writes its rows straight into memory-mapped ``.npy`` files beside the destination; at the end rank 0
streams them into the ``.npz`` (an uncompressed zip, exactly what ``np.savez`` writes) and removes them. No
process ever holds the whole batch (50,000 images at 256x256 are 9.8 GB), and no PNG round trip is needed.
Like the original PNG-folder approach, ranks on several nodes need a shared file system for the output folder.
"""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from utils.distributed import barrier, get_rank


class ShardedNpzWriter:
    """Collective: every rank constructs it, writes its rows with ``write``, and calls ``close``.

    ``arrays`` maps each npz member (``"arr_0"``, ``"arr_1"`` ...) to its full (shape, dtype)."""

    def __init__(self, path: str | os.PathLike, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.arrays = {k: (tuple(s), np.dtype(d)) for k, (s, d) in arrays.items()}
        if get_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.parts, ignore_errors=True)
            self.parts.mkdir(parents=True)
            for name, (shape, dtype) in self.arrays.items():
                np.lib.format.open_memmap(self.parts / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
        barrier()
        self.maps = {name: np.load(self.parts / f"{name}.npy", mmap_mode="r+") for name in self.arrays}

    def write(self, name: str, rows: np.ndarray | slice, data: np.ndarray) -> None:
        """Store ``data`` at ``rows`` (indices or a slice) of member ``name``."""
        self.maps[name][rows] = data

    def close(self) -> Path:
        for m in self.maps.values():
            m.flush()
        self.maps.clear()
        barrier()
        if get_rank() == 0:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name in self.arrays:
                    with open(self.parts / f"{name}.npy", "rb") as src, \
                            zf.open(f"{name}.npy", "w", force_zip64=True) as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)
            os.replace(tmp, self.path)
            shutil.rmtree(self.parts, ignore_errors=True)
        barrier()
        return self.path
