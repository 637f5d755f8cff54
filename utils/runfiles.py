"""What keeps a run's files safe from other runs, full disks and replaced checkpoints.

* ``FolderLock``: one run per output folder. ``fcntl.flock`` on ``<folder>/.lock``, held for the process's
  lifetime; the kernel releases it when the process dies (even by ``kill -9``), so a crashed run never blocks
  the next one. The holder's pid, host and start time are written into the file, so a second run stops at once
  with one line naming them.
* ``reserve_space``: ``posix_fallocate`` the bytes a file will need before writing it, so a full disk is one
  line naming the path and the size at the start of the write, not a SIGBUS on a memory-mapped page or a torch
  serializer error half-way through.
* ``file_digest``: a checkpoint's content hash (streamed once, cached per file version): progress of extraction
  and sampling is keyed by it, so a checkpoint replaced at the same path starts them afresh.
* ``remove_stale_temporaries``: the ``.NAME.XXXX.tmp`` files a killed atomic save leaves behind.
* ``write_json_atomic`` / ``read_json``: progress records (of sampling, extraction) that a kill never leaves
  half-written, and that read back as "no record" when they are not JSON; ``OutputExists``: a finished output
  that is only replaced when asked.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

LOCK_NAME = ".lock"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock (the message is one line naming it)."""


class NoSpace(OSError):
    """Not enough disk space for a file about to be written (one line: the path and the bytes needed)."""

    def __str__(self) -> str:
        return str(self.strerror)


class OutputExists(FileExistsError):
    """A finished output a command would write over; it is replaced only when asked (``--overwrite``). The message
    is one line naming it."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it and a rename: whoever reads it (a rerun after a
    kill, another rank) finds the old content or the new, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, value: Any, **dump: Any) -> None:
    write_text_atomic(path, json.dumps(value, **dump) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``, or None when the file is missing or holds no JSON (cut short, or edited):
    a progress record that cannot be read is no record."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


_held: dict[str, "FolderLock"] = {}  # this process's locks, by lock-file path


class FolderLock:
    """An exclusive lock on ``folder`` (created if needed) for as long as this object lives or until
    ``release``. ``what`` names the folder's role in the error message (``run folder``, ``code store`` ...);
    ``name`` the lock file (``.<output>.lock`` locks one output of a shared folder)."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder", name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        key = str(self.path.resolve() if self.path.parent.exists() else self.path.absolute())
        previous = _held.pop(key, None)
        if previous is not None:  # this process locked it before (an in-process caller running twice)
            previous.release()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            target = self.folder if name == LOCK_NAME else self.folder / name.removeprefix(".").removesuffix(".lock")
            raise FolderInUse(f"{what} {target} is in use by {holder}; wait for it to end, or choose another "
                              f"output") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        self.file.flush()
        _held[key] = self

    def release(self, remove: bool = False) -> None:
        """Release the lock; with ``remove`` (a finished output, which should look clean) delete the lock file
        first, while still holding it."""
        if not self.file.closed:
            if remove:
                self.path.unlink(missing_ok=True)
            self.file.close()  # closing the descriptor releases the lock


def reserve_space(f, nbytes: int, path: str | os.PathLike) -> None:
    """Allocate ``nbytes`` for the open file ``f`` (a file object or descriptor) now; a full disk (or a quota, or
    a file-size limit) raises NoSpace naming ``path``. File systems that cannot preallocate are left alone."""
    fd = f if isinstance(f, int) else f.fileno()
    try:
        os.posix_fallocate(fd, 0, max(int(nbytes), 1))
    except OSError as e:
        if e.errno in NO_SPACE:
            raise NoSpace(e.errno, f"{path}: no room for {nbytes:,} bytes ({nbytes / 2 ** 30:.2f} GiB; "
                                   f"{free_bytes(path) / 2 ** 30:.2f} GiB free there): {os.strerror(e.errno)}") \
                from None
        # EOPNOTSUPP / EINVAL: the file system cannot preallocate; the write itself will tell


def create_npy(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> None:
    """A new ``.npy`` file of ``shape`` and ``dtype`` (zeros) whose blocks are reserved before anything maps it
    (open it with ``np.load(path, mmap_mode="r+")``). ``np.lib.format.open_memmap`` makes a sparse file: written
    through the map, a block the disk cannot hold is a SIGBUS; here a full disk is NoSpace, one line, first."""
    import numpy as np

    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        reserve_space(f, f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, path)


def free_bytes(path: str | os.PathLike) -> int:
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: what ``open`` would give a new file (``mkstemp`` forces 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.XXXX.tmp`` files (what ``utils.checkpoint`` writes before renaming) left in ``folder`` by a
    killed save. Only call it while holding the folder's lock: a live save's temporary would go too."""
    folder = Path(folder)
    stale = sorted(p for p in folder.glob(".*.tmp") if p.is_file()) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


_digests: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits), streamed once and cached for this version of the file
    (device, inode, size, modification time): what a checkpoint's content is keyed by."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()[:16]
    return _digests[key]


def checkpoint_digest(name: str | os.PathLike) -> Optional[str]:
    """The content hash of a checkpoint given by path or ``hf://`` name (resolved to its cached file); rank 0
    reads it and every rank gets the same value (collective under torchrun)."""
    from utils.checkpoint import resolve_checkpoint
    from utils.distributed import all_gather_objects, get_rank

    digest = file_digest(resolve_checkpoint(name)) if get_rank() == 0 else None
    return all_gather_objects(digest)[0]
