"""Writing large ``.npz`` batches (the FID evaluator's input) from many processes with bounded memory.

Every rank writes its rows straight into memory-mapped ``.npy`` files beside the destination; at the end rank 0
streams them into the ``.npz`` (an uncompressed zip, exactly what ``np.savez`` writes) and removes them. No
process ever holds the whole batch (50,000 images at 256x256 are 9.8 GB), and no PNG round trip is needed.
Like the original PNG-folder approach, ranks on several nodes need a shared file system for the output folder.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from utils.distributed import all_gather_objects, barrier, get_rank
from utils.runfiles import NoSpace, create_npy, reserve_space


class ShardedNpzWriter:
    """Collective: every rank constructs it, writes its rows with ``write``, and calls ``close``.

    ``arrays`` maps each npz member (``"arr_0"``, ``"arr_1"`` ...) to its full (shape, dtype).

    Resumable with a ``fingerprint`` (what the rows depend on: checkpoints, sampling settings, world size ...):
    each rank reports the rows it has finished with ``mark_done``; a writer created again for the same path,
    arrays and fingerprint keeps the parts and tells each rank in ``done`` how many of its rows are finished,
    so a killed run continues where it stopped. Anything else starts afresh."""

    def __init__(self, path: str | os.PathLike, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 fingerprint: Optional[dict[str, Any]] = None):
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.arrays = {k: (tuple(s), np.dtype(d)) for k, (s, d) in arrays.items()}
        key = {"arrays": {k: [list(s), d.str] for k, (s, d) in self.arrays.items()}, "fingerprint": fingerprint}
        key_file = self.parts / "key.json"
        no_space = None
        if get_rank() == 0 and not (fingerprint is not None and key_file.is_file()
                                    and json.loads(key_file.read_text()) == key):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.parts, ignore_errors=True)
            self.parts.mkdir(parents=True)
            try:  # a full disk: one line now, not a SIGBUS through the memory map later
                for name, (shape, dtype) in self.arrays.items():
                    create_npy(self.parts / f"{name}.npy", shape, dtype)
            except NoSpace as e:
                no_space = str(e)
            key_file.write_text(json.dumps(key))
        no_space = all_gather_objects(no_space)[0]  # (also the barrier: rank 0 has made the parts)
        if no_space:
            raise NoSpace(errno.ENOSPC, no_space)
        self.maps = {name: np.load(self.parts / f"{name}.npy", mmap_mode="r+") for name in self.arrays}
        self.progress_file = self.parts / f"done_{get_rank():05d}.json"
        self.done = json.loads(self.progress_file.read_text())["done"] if self.progress_file.is_file() else 0

    def write(self, name: str, rows: np.ndarray | slice, data: np.ndarray) -> None:
        """Store ``data`` at ``rows`` (indices or a slice) of member ``name``."""
        self.maps[name][rows] = data

    def mark_done(self, count: int) -> None:
        """``count`` more of this rank's rows are written (in the order the rank writes them): flush them to
        disk, then record the progress a resumed writer reports in ``done``."""
        for m in self.maps.values():
            m.flush()
        self.done += count
        tmp = self.progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"done": self.done}))
        os.replace(tmp, self.progress_file)

    def gather(self, name: str) -> Optional[np.ndarray]:
        """Collective: the whole member ``name`` (every rank's rows) on rank 0, read back from the parts; None on
        the other ranks. Call it before ``close``."""
        for m in self.maps.values():
            m.flush()
        barrier()
        return np.array(np.load(self.parts / f"{name}.npy", mmap_mode="r")) if get_rank() == 0 else None

    def close(self, members: Optional[Sequence[str]] = None) -> Optional[Path]:
        """Collective: rank 0 writes ``members`` (default: every array) into the npz, then the parts are
        removed. With no members (e.g. only per-row features kept for a resume), no npz is written: None."""
        members = list(self.arrays) if members is None else list(members)
        for m in self.maps.values():
            m.flush()
        self.maps.clear()
        barrier()
        if get_rank() == 0 and not members:
            shutil.rmtree(self.parts, ignore_errors=True)
        elif get_rank() == 0:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            size = sum((self.parts / f"{name}.npy").stat().st_size + 4096 for name in members)
            try:
                with open(tmp, "wb") as f:
                    reserve_space(f, size, self.path)  # a full disk: one line, the parts are kept for a rerun
                    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                        for name in members:
                            with open(self.parts / f"{name}.npy", "rb") as src, \
                                    zf.open(f"{name}.npy", "w", force_zip64=True) as dst:
                                shutil.copyfileobj(src, dst, 16 << 20)
                    f.truncate(f.tell())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, self.path)
            shutil.rmtree(self.parts, ignore_errors=True)
        barrier()
        return self.path if members else None
