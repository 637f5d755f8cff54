"""Writing large ``.npz`` batches (the FID evaluator's input) from many processes with bounded memory.

The ``.npz`` (an uncompressed zip, what ``np.savez`` writes) is laid out before any row is written: every
member's zip headers, ``.npy`` header and data region have fixed offsets (``NpzLayout``), and every rank writes
its rows straight into the data regions through a memory map. At the end rank 0 reads the members once for their
CRC-32 checksums, writes them into the headers and renames the file into place: nothing is copied, and the disk
holds the batch once (50,000 images at 256x256 are 9.8 GB). No process ever holds the whole batch. Like the
original PNG-folder approach, ranks on several nodes need a shared file system for the output folder.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from utils.distributed import all_gather_objects, barrier, get_rank
from utils.runfiles import NoSpace, OutputExists, create_npy, read_json, reserve_space, write_json_atomic

# ------------------------------------------------------------------------------------------------ the zip layout
# ZIP64 records (APPNOTE.TXT 4.3.7, 4.3.12, 4.3.14-16, 4.5.3): sizes and offsets live in the zip64 extra fields,
# the 32-bit fields hold 0xFFFFFFFF. Members are STORED (method 0), so a member's bytes are its .npy file.
_U32 = 0xFFFFFFFF
_VERSION = 45            # "version needed": ZIP64
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, 00:00: a fixed time, so the same rows give the same file
_LOCAL = struct.Struct("<IHHHHHIIIHH")                 # signature ... name length, extra length
_LOCAL_EXTRA = struct.Struct("<HHQQ")                  # zip64 extra: uncompressed, compressed size
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_EXTRA = struct.Struct("<HHQQQ")               # zip64 extra: uncompressed, compressed size, local offset
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_CRC_IN_LOCAL, _CRC_IN_CENTRAL = 14, 16                 # byte offsets of the CRC-32 field in each header


@dataclass(frozen=True)
class Member:
    name: str
    header_offset: int  # the zip local header
    data_offset: int    # the member's bytes (its .npy header, then the array)
    array_offset: int   # the array's first byte
    size: int           # the member's bytes
    central_offset: int  # its central directory entry


class NpzLayout:
    """Where each member of an uncompressed ``.npz`` of the given arrays lies, and the bytes of every header."""

    def __init__(self, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        self.members: dict[str, Member] = {}
        self._headers: list[tuple[int, bytes]] = []  # (offset, bytes) of everything that is not array data
        central, offset = [], 0
        for name, (shape, dtype) in arrays.items():
            dtype = np.dtype(dtype)
            fname = f"{name}.npy".encode()
            npy = _npy_header(shape, dtype)
            size = len(npy) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            local = _LOCAL.pack(0x04034B50, _VERSION, 0, 0, 0, _DOS_DATE, 0, _U32, _U32, len(fname),
                                _LOCAL_EXTRA.size) + fname + _LOCAL_EXTRA.pack(1, 16, size, size)
            data = offset + len(local)
            self._headers += [(offset, local), (data, npy)]
            central.append((name, fname, offset, data, data + len(npy), size))
            offset = data + size
        start = offset
        for name, fname, header, data, array, size in central:
            entry = _CENTRAL.pack(0x02014B50, _VERSION, _VERSION, 0, 0, 0, _DOS_DATE, 0, _U32, _U32, len(fname),
                                  _CENTRAL_EXTRA.size, 0, 0, 0, 0, _U32) + fname
            entry += _CENTRAL_EXTRA.pack(1, 24, size, size, header)
            self.members[name] = Member(name, header, data, array, size, offset)
            self._headers.append((offset, entry))
            offset += len(entry)
        n = len(central)
        end64 = _END64.pack(0x06064B50, _END64.size - 12, _VERSION, _VERSION, 0, 0, n, n, offset - start, start)
        locator = _LOCATOR.pack(0x07064B50, 0, offset, 1)
        end = _END.pack(0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0)
        self._headers.append((offset, end64 + locator + end))
        self.size = offset + len(end64 + locator + end)

    def write_headers(self, f) -> None:
        for offset, data in self._headers:
            f.seek(offset)
            f.write(data)

    def write_checksums(self, f, path: str | os.PathLike) -> None:
        """Read each member's bytes from the open file ``f`` once, and write their CRC-32 into its headers."""
        for m in self.members.values():
            crc, left = 0, m.size
            f.seek(m.data_offset)
            while left:
                chunk = f.read(min(left, 16 << 20))
                if not chunk:
                    raise OSError(errno.EIO, f"{path}: member {m.name} ends early")
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            for at in (m.header_offset + _CRC_IN_LOCAL, m.central_offset + _CRC_IN_CENTRAL):
                f.seek(at)
                f.write(struct.pack("<I", crc))


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` header ``np.save`` would write (format 1.0, padded so the array starts 64-byte aligned)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ the writer
class ShardedNpzWriter:
    """Collective: every rank constructs it, writes its rows with ``write``, and calls ``close``.

    ``arrays`` maps each array to its full (shape, dtype); ``members`` names those that make the npz (default:
    all, e.g. ``"arr_0"``, ``"arr_1"``), written in place in its final layout; the others (per-row features a
    run needs until its end) are kept beside it as ``.npy`` parts and removed at ``close``.

    Resumable with a ``fingerprint`` (what the rows depend on: checkpoints, sampling settings, world size ...):
    each rank reports the rows it has finished with ``mark_done``; a writer created again for the same path,
    arrays, members and fingerprint keeps what was written and tells each rank in ``done`` how many of its
    ``rows`` are finished, so a killed run continues where it stopped. Anything else starts afresh. Progress
    records are written atomically; one that cannot be read, or does not fit the rank's ``rows``, restarts that
    rank's rows (with a warning), so a row is never taken as written when it was not.

    A finished npz at ``path`` is never written over unless ``overwrite`` (``OutputExists``, on every rank)."""

    def __init__(self, path: str | os.PathLike, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 fingerprint: Optional[dict[str, Any]] = None, members: Optional[Sequence[str]] = None,
                 rows: Optional[int] = None, overwrite: bool = False):
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.arrays = {k: (tuple(s), np.dtype(d)) for k, (s, d) in arrays.items()}
        self.members = list(self.arrays) if members is None else list(members)
        unknown = sorted(set(self.members) - set(self.arrays))
        if unknown:
            raise ValueError(f"npz members {unknown} are not among the arrays {sorted(self.arrays)}")
        self.layout = NpzLayout({k: self.arrays[k] for k in self.members}) if self.members else None
        self.partial = self.parts / "npz.partial"  # the npz until close renames it
        key = json.loads(json.dumps({  # compared with key.json in its JSON form (tuples read back as lists)
            "arrays": {k: [list(s), d.str] for k, (s, d) in self.arrays.items()}, "members": self.members,
            "fingerprint": fingerprint}))
        key_file = self.parts / "key.json"
        problem = None
        if get_rank() == 0 and not (fingerprint is not None and read_json(key_file) == key):
            problem = self._start_afresh(key, key_file, overwrite)
        problem = all_gather_objects(problem)[0]  # (also the barrier: rank 0 has made the files)
        if problem:
            kind, message = problem
            raise OutputExists(errno.EEXIST, message) if kind == "exists" else NoSpace(errno.ENOSPC, message)
        self.maps = {name: self._map(name, "r+") for name in self.arrays}
        self.progress_file = self.parts / f"done_{get_rank():05d}.json"
        self.done = self._recorded_done(rows if rows is not None else max((s[0] for s, _ in self.arrays.values()),
                                                                          default=0))

    def _start_afresh(self, key: dict, key_file: Path, overwrite: bool) -> Optional[tuple[str, str]]:
        """Rank 0: new parts (the npz in its final layout, the other arrays as .npy files), their space reserved;
        ``(kind, message)`` when that cannot be done: a finished npz in the way, or a full disk."""
        if key_file.is_file():
            print(f"warning: {key_file} is unreadable or describes other settings: the partial batch starts afresh",
                  file=sys.stderr)
        if self.path.exists() and not overwrite:
            return "exists", (f"{self.path} exists (a finished batch): pass --overwrite to write it again, or "
                              f"choose another output name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        self.parts.mkdir(parents=True)
        try:  # a full disk: one line now, not a SIGBUS through the memory map later
            if self.layout is not None:
                with open(self.partial, "wb") as f:
                    reserve_space(f, self.layout.size, self.partial)
                    self.layout.write_headers(f)
            for name in self.arrays:
                if name not in self.members:
                    create_npy(self.parts / f"{name}.npy", *self.arrays[name])
        except NoSpace as e:
            return "space", str(e)
        write_json_atomic(key_file, key)
        return None

    def _recorded_done(self, rows: int) -> int:
        """This rank's finished rows, as its progress record says, when the record fits its ``rows``; else 0."""
        if not self.progress_file.is_file():
            return 0
        record = read_json(self.progress_file)
        done = record.get("done") if isinstance(record, dict) else None
        if type(done) is int and 0 <= done <= rows:
            return done
        print(f"warning: {self.progress_file}: progress record {record!r} does not fit this rank's {rows} rows: "
              f"they are written again", file=sys.stderr)
        return 0

    def _map(self, name: str, mode: str) -> np.ndarray:
        shape, dtype = self.arrays[name]
        if name in self.members:
            return np.memmap(self.partial, dtype, mode, offset=self.layout.members[name].array_offset, shape=shape)
        return np.load(self.parts / f"{name}.npy", mmap_mode=mode)

    def write(self, name: str, rows: np.ndarray | slice, data: np.ndarray) -> None:
        """Store ``data`` at ``rows`` (indices or a slice) of array ``name``."""
        self.maps[name][rows] = data

    def mark_done(self, count: int) -> None:
        """``count`` more of this rank's rows are written (in the order the rank writes them): flush them to
        disk, then record the progress a resumed writer reports in ``done``."""
        for m in self.maps.values():
            m.flush()
        self.done += count
        write_json_atomic(self.progress_file, {"done": self.done})

    def gather(self, name: str) -> Optional[np.ndarray]:
        """Collective: the whole array ``name`` (every rank's rows) on rank 0, read back from the disk; None on
        the other ranks. Call it before ``close``."""
        for m in self.maps.values():
            m.flush()
        barrier()
        return np.array(self._map(name, "r")) if get_rank() == 0 else None

    def close(self) -> Optional[Path]:
        """Collective: rank 0 writes the members' checksums into the npz (one read, no copy), renames it into
        place and removes the parts. None when the npz has no members (only per-row features were kept)."""
        for m in self.maps.values():
            m.flush()
        self.maps.clear()
        barrier()
        if get_rank() == 0:
            if self.layout is not None:
                with open(self.partial, "r+b") as f:
                    self.layout.write_checksums(f, self.partial)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(self.partial, self.path)
            shutil.rmtree(self.parts, ignore_errors=True)
        barrier()
        return self.path if self.layout is not None else None
