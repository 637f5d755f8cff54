"""A compact store for tokenizer codes: what the generator trains on.

The original wrote three ``.npy`` files per image per factor (1.28M images -> ~4M tiny files). Here each rank
writes one memory-mapped array of codes and one of labels, and rank 0 writes a small manifest:

    <code-path>/manifest.json                  counts, shapes, factor names, vocabulary, provenance
    <code-path>/codes_00000.npy                uint16 (items, augmentations, factors, tokens) of rank 0
    <code-path>/labels_00000.npy               int32 (items,) class labels of rank 0
    ...

Reading is a memory-mapped gather: a batch is one fancy-index per shard, so the loader serves many thousands of
samples per second from the page cache without worker processes. uint16 holds codebooks up to 65536 codes
(int32 beyond).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.distributed import all_gather_objects, barrier, get_rank
from utils.runfiles import create_npy, read_json, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CodeStoreError(ValueError):
    """A code store that is missing, incomplete or does not fit what asks for it (one-line message)."""


@dataclass
class CodeStoreInfo:
    num_factors: int
    factor_names: list[str]
    tokens: int  # positions per image (h * w)
    grid: list[int]  # [h, w]
    vocab_size: int
    num_augs: int  # augmented views stored per image (1, 2 with flips, 10 with ten-crop)
    dtype: str
    shards: list[dict[str, Any]]  # [{"codes": file, "labels": file, "count": n}]
    num_classes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: vq_ckpt, image size, crops ...
    version: int = FORMAT_VERSION

    @property
    def num_items(self) -> int:
        return sum(s["count"] for s in self.shards)

    def identity(self) -> dict[str, Any]:
        """What a generator trained on this store depends on: its tokenizer's content key, the grid, the factors,
        the vocabulary, the images and views. A run records it and checks it on resume (a store re-extracted
        with another tokenizer under the same path is not the one the run was trained on)."""
        return {"tokenizer_sha256": self.extra.get("vq_ckpt_sha256"), "tokenizer_weights": self.extra.get("vq_weights"),
                "grid": list(self.grid), "factors": list(self.factor_names), "vocab_size": self.vocab_size,
                "images": self.num_items, "views": self.num_augs}


def code_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _shard_names(rank: int) -> tuple[str, str]:
    return f"codes_{rank:05d}.npy", f"labels_{rank:05d}.npy"


class CodeStoreWriter:
    """Collective writer: every rank creates one with its own item count, fills it with ``write``, then all
    call ``close``. Files are written under temporary names and renamed at the end, and the manifest is written
    last, so an interrupted extraction never looks complete. A finished store at ``root`` stays whole until
    ``close`` replaces it (ask first: ``finished_store``), so an interrupted re-extraction leaves it usable.

    Resumable: after every ``write`` the rank's progress (items written, the caller's ``state``) is recorded
    beside its temporary files. A writer created again with the same ``fingerprint`` (what the items depend on:
    checkpoint, data, crops, world size ...) and shapes continues after the last recorded write: ``filled`` and
    ``state`` say where; anything else (a record of other settings, or one that does not fit the rank's
    ``count``) starts that rank over, with a warning. The fingerprint is kept in the manifest's ``extra``."""

    def __init__(self, root: str | os.PathLike, count: int, num_augs: int, factor_names: list[str],
                 grid: tuple[int, int], vocab_size: int, fingerprint: Optional[dict[str, Any]] = None):
        self.root = Path(root)
        self.rank = get_rank()
        self.count, self.num_augs = count, num_augs
        self.factor_names, self.grid, self.vocab_size = list(factor_names), list(grid), vocab_size
        self.dtype = code_dtype(vocab_size)
        self.resumable = fingerprint is not None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        codes_name, labels_name = _shard_names(self.rank)
        self.files = [(self.root / f".{codes_name}.tmp", self.root / codes_name),
                      (self.root / f".{labels_name}.tmp", self.root / labels_name)]
        self.progress_file = self.root / f".progress_{self.rank:05d}.json"
        shape = (count, num_augs, len(factor_names), grid[0] * grid[1])
        # compared with the recorded one in its JSON form (tuples read back as lists)
        self.key = json.loads(json.dumps({"shape": list(shape), "dtype": self.dtype.name,
                                          "fingerprint": fingerprint or {}}))
        done = self._recorded_progress()
        if done is None:  # blocks reserved first: a full disk is one line now, not a SIGBUS through the map later
            create_npy(self.files[0][0], shape, self.dtype)
            create_npy(self.files[1][0], (count,), np.int32)
        self.codes = np.lib.format.open_memmap(self.files[0][0], mode="r+")
        self.labels = np.lib.format.open_memmap(self.files[1][0], mode="r+")
        self.filled, self.state = (done["filled"], done["state"]) if done is not None else (0, {})

    def _recorded_progress(self) -> Optional[dict[str, Any]]:
        """The progress of an interrupted run of the same extraction, if its files are all there and the record
        fits this rank's items."""
        if not (self.progress_file.is_file() and all(tmp.is_file() for tmp, _ in self.files)):
            return None
        done = read_json(self.progress_file)
        if isinstance(done, dict) and done.get("key") == self.key and type(done.get("filled")) is int \
                and 0 <= done["filled"] <= self.count and isinstance(done.get("state"), dict):
            return done
        print(f"warning: {self.progress_file}: the progress record is unreadable, of other settings or does not "
              f"fit rank {self.rank}'s {self.count} items: they are encoded again", file=sys.stderr)
        return None

    def write(self, codes: np.ndarray, labels: np.ndarray, state: Optional[dict[str, Any]] = None) -> None:
        """Append items: ``codes`` (b, augs, factors, tokens) integer, ``labels`` (b,); ``state`` (JSON) is
        recorded with the progress and handed back by a resumed writer."""
        b = len(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise CodeStoreError(f"codes outside [0, {self.vocab_size}) cannot be stored")
        self.codes[self.filled:self.filled + b] = codes
        self.labels[self.filled:self.filled + b] = labels
        self.filled += b
        self.state = state or {}
        self.codes.flush()
        self.labels.flush()
        write_json_atomic(self.progress_file, {"key": self.key, "filled": self.filled, "state": self.state})

    def close(self, num_classes: int = 0, extra: Optional[dict[str, Any]] = None) -> Optional[CodeStoreInfo]:
        if self.filled != self.count:
            raise CodeStoreError(f"rank {self.rank} wrote {self.filled} of its {self.count} items")
        self.codes.flush()
        self.labels.flush()
        del self.codes, self.labels
        counts = all_gather_objects(self.count)  # (every rank has written all its items)
        if self.rank == 0:  # a finished store being replaced is incomplete from here on, never a mix that looks whole
            (self.root / MANIFEST).unlink(missing_ok=True)
        barrier()
        for tmp, final in self.files:
            os.replace(tmp, final)
        self.progress_file.unlink(missing_ok=True)
        barrier()
        info = None
        if self.rank == 0:
            shards = [{"codes": _shard_names(r)[0], "labels": _shard_names(r)[1], "count": c}
                      for r, c in enumerate(counts)]
            extra = {**(extra or {}), **({"fingerprint": self.key["fingerprint"]} if self.resumable else {})}
            info = CodeStoreInfo(len(self.factor_names), self.factor_names, self.grid[0] * self.grid[1], self.grid,
                                 self.vocab_size, self.num_augs, self.dtype.name, shards, num_classes, extra)
            listed = {name for shard in shards for name in (shard["codes"], shard["labels"])}
            for stale in [*self.root.glob("codes_*.npy"), *self.root.glob("labels_*.npy")]:
                if stale.name not in listed:  # shards of a replaced store written by more processes
                    stale.unlink()
            write_json_atomic(self.root / MANIFEST, asdict(info), indent=2)
        barrier()
        return info


def finished_store(root: str | os.PathLike) -> Optional[CodeStoreInfo]:
    """The manifest of the finished store at ``root``, or None when there is none (nothing, or an extraction that
    did not finish)."""
    return read_manifest(root) if (Path(root) / MANIFEST).is_file() else None


def read_manifest(root: str | os.PathLike) -> CodeStoreInfo:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = " (extraction did not finish?)" if any(root.glob("codes_*.npy")) or any(root.glob(".codes_*")) else ""
        raise CodeStoreError(f"--code-path {root}: no {MANIFEST}{hint}; run autoregressive/train/"
                             f"extract_codes_c2i*.py first")
    try:
        info = CodeStoreInfo(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CodeStoreError(f"{path}: not a code-store manifest ({e})") from None
    if info.version != FORMAT_VERSION:
        raise CodeStoreError(f"{path}: code-store format {info.version}, this code reads {FORMAT_VERSION}")
    for shard in info.shards:
        for kind in ("codes", "labels"):
            name = shard.get(kind) if isinstance(shard, dict) else None
            if not (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name):
                raise CodeStoreError(f"{path}: shard {kind} file {name!r} is not a file name inside the store "
                                     f"(a manifest names its shards relative to {root}, without folders)")
    return info


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a cheap, well-spread hash of uint64 values (vectorised)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class CodeDataset(Dataset):
    """Items are ``(codes (tokens, factors) int64, label int64)``; one stored augmentation is chosen per item,
    as a hash of (seed, epoch, index), so the choice does not depend on batching, workers or resumption.

    ``__getitems__`` serves a whole batch with one gather per shard; use ``collate_codes`` with it."""

    def __init__(self, root: str | os.PathLike, seed: int = 0, expect_factors: Optional[int] = None,
                 vocab_size: Optional[int] = None):
        self.root = Path(root)
        self.info = info = read_manifest(root)
        if expect_factors is not None and info.num_factors != expect_factors:
            raise CodeStoreError(f"--code-path {root}: holds {info.num_factors}-factor codes "
                                 f"({', '.join(info.factor_names)}), but {expect_factors} factors were expected")
        if vocab_size is not None and info.vocab_size > vocab_size:
            raise CodeStoreError(f"--code-path {root}: codes come from a {info.vocab_size}-entry codebook, "
                                 f"larger than --vocab-size {vocab_size}")
        self.codes, self.labels = [], []
        for s in info.shards:
            try:
                self.codes.append(np.load(self.root / s["codes"], mmap_mode="r"))
                self.labels.append(np.load(self.root / s["labels"], mmap_mode="r"))
            except (OSError, ValueError) as e:
                raise CodeStoreError(f"--code-path {root}: cannot read shard {s['codes']} ({e})") from None
            if len(self.codes[-1]) != s["count"] or len(self.labels[-1]) != s["count"]:
                raise CodeStoreError(f"--code-path {root}: shard {s['codes']} holds {len(self.codes[-1])} items, "
                                     f"the manifest says {s['count']}")
        self.offsets = np.cumsum([0] + [s["count"] for s in info.shards])
        # Images the extractor could not read are stored with label -1; leave them out.
        valid = np.concatenate([np.asarray(l) >= 0 for l in self.labels]) if self.labels else np.zeros(0, bool)
        self.valid = None if valid.all() else np.nonzero(valid)[0]
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.valid is None else len(self.valid)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def aug_index(self, indices: np.ndarray) -> np.ndarray:
        if self.info.num_augs == 1:
            return np.zeros(len(indices), dtype=np.int64)
        key = np.uint64((self.seed * 1_000_003 + self.epoch) & 0xFFFFFFFF) << np.uint64(32)
        return (_mix(indices.astype(np.uint64) ^ key) % np.uint64(self.info.num_augs)).astype(np.int64)

    def __getitems__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a code store of {len(self)} items")
        if self.valid is not None:
            idx = self.valid[idx]
        augs = self.aug_index(idx)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        codes = np.empty((len(idx), self.info.num_factors, self.info.tokens), dtype=np.int64)
        labels = np.empty(len(idx), dtype=np.int64)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = idx[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")  # ascending reads are kinder to the page cache
            rows, sel = local[order], sel[order]
            codes[sel] = self.codes[s][rows, augs[sel]]
            labels[sel] = self.labels[s][rows]
        return torch.from_numpy(codes).transpose(1, 2), torch.from_numpy(labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes, labels = self.__getitems__([index])
        return codes[0], labels[0]


def collate_codes(batch):
    """DataLoader collate for ``CodeDataset``: the batch arrives already stacked by ``__getitems__``."""
    if isinstance(batch, tuple):
        return batch
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
