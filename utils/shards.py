"""Images in WebDataset tar shards: the map-style reader every ``--data-path`` accepts, and the converter.

A shard is a plain tar whose members are grouped by key, the member name up to the first dot of its file name
(timm's ``imagenet-1k-wds``: ``n01440764_10026.jpg`` + ``n01440764_10026.cls``). A sample is one image member
(``jpg``, ``jpeg``, ``png``, ``webp``, or another extension PIL reads) and its label: a ``cls`` member (an
integer) or else a ``json`` member's ``label`` field. Other members are ignored.

**Why an index, not a stream.** Each shard is scanned once (its tar headers and label members; the image bytes
are not read) into an index of (image member, offset, size, label). Reading an image is then one ``pread`` at
its offset, so the shards are a map-style data set like the folder: the project's ``ResumableSampler`` decides
the order, which is the same for a seed whatever the number of workers, gives every rank its own slice once per
epoch and resumes mid-epoch exactly. A streaming reader (``webdataset.WebDataset``) would give these up, and
``wids`` wants a shard list with per-shard counts and keeps its own shard cache; Python's ``tarfile`` and an
index of a few arrays per shard need no dependency. The index is cached in
``${XDG_CACHE_HOME:-~/.cache}/fqgan/shard-index/`` keyed by the shard's path, size and modification time; under
``torchrun`` the ranks scan the uncached shards between them and exchange the results.

**The converter** (``python -m utils.shards --data-path FOLDER --out DIR``) writes an ImageFolder as shards in
that convention: members in the folder's listing order, the image's own bytes (``.JPEG`` becomes ``jpg``), a
``cls`` label, the class names in ``DIR/classes.json``, at most ``--max-count`` images and ``--max-size`` bytes
per shard. Each shard is written to a temporary and renamed, and ``DIR/<prefix>.json`` records the finished
ones, so a killed conversion rerun with the same command continues with the next shard.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import re
import resource
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils.argtypes import byte_size, positive_int
from utils.checkpoint import atomic_write
from utils.data import IMG_EXTENSIONS, SafeImageDataset, find_images, sample_key
from utils.distributed import all_gather_objects, get_rank, get_world_size
from utils.flags import exits_on, flag, parse
from utils.images import open_rgb
from utils.runfiles import FolderInUse, FolderLock

IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
CLASSES_FILE = "classes.json"
INDEX_VERSION = 1
BLOCK = tarfile.BLOCKSIZE


class ShardError(FileNotFoundError):
    """A ``--data-path`` that cannot be read as shards: a missing shard, not a tar, cut short, an image without a
    label, a label outside the classes (one line naming the shard and the member). A FileNotFoundError, as a
    missing image folder is, so every entry point reports it in that one line."""


# ------------------------------------------------------------------------------------------------------------
# which shards --data-path names
# ------------------------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar a-001.tar a-002.tar; ``{x,y}`` lists; several groups multiply, left to
    right (the WebDataset / bash convention; no nesting). A range keeps the zero padding of its first bound."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") or len(r.group(1)) == len(r.group(2)) else 0
        choices = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def _visible_tars(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".tar" and not p.name.startswith(".") and p.is_file())


def shard_paths(path: str | os.PathLike) -> Optional[list[Path]]:
    """The shards ``--data-path`` names, in order, or None when it is not shards (an image folder). Shards are a
    brace pattern, one ``.tar`` file, a folder holding ``.tar`` files (sorted by name), or a text file listing
    one shard (or pattern) per line, relative to the list's folder (``#`` comments and blank lines skipped)."""
    text = str(path)
    p = Path(path)
    if "{" in text:
        found = [Path(s) for s in expand_braces(text)]
    elif p.is_dir():
        return _visible_tars(p) or None
    elif p.suffix == ".tar":
        found = [p]
    elif not p.exists():
        return None  # the image folder's own "no such folder" follows
    else:
        lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines()]
        found = [p.parent / s for ln in lines if ln and not ln.startswith("#") for s in expand_braces(ln)]
        if not found:
            raise ShardError(f"--data-path {path}: lists no shards")
    for shard in found:
        if not shard.is_file():
            raise ShardError(f"--data-path {path}: shard {shard} does not exist")
    return found


# ------------------------------------------------------------------------------------------------------------
# the index of one shard
# ------------------------------------------------------------------------------------------------------------
def _split(name: str) -> tuple[str, str]:
    """A member name -> (key, extension): the key ends at the first dot of the file name (WebDataset's rule)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _read_label(f, shard: Path, name: str, offset: int, size: int) -> int:
    f.seek(offset)
    data = f.read(size)
    try:
        if name.lower().endswith(".json"):
            value = json.loads(data)["label"]
        else:
            value = data.decode("ascii").strip()
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (KeyError, TypeError):
        raise ShardError(f"{shard}: member {name} has no label field") from None
    except ValueError:
        raise ShardError(f"{shard}: member {name}: label {data[:40]!r} is not an integer") from None


def scan_shard(shard: Path) -> dict[str, np.ndarray]:
    """Index one shard: its samples' image member names, data offsets, sizes and labels, in member order.
    ``tarfile`` ends an archive quietly at a short or damaged header, so the extents and the end-of-archive
    block are checked here: a shard cut short or damaged is one line naming the member where it happens."""
    try:
        f = open(shard, "rb")
    except OSError as e:
        raise ShardError(f"{shard}: cannot open ({e.strerror})") from None
    with f:
        end = os.fstat(f.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise ShardError(f"{shard}: not a tar file ({e})") from None
        images: dict[str, tuple[str, int, int]] = {}  # key -> (member, offset, size)
        labels: dict[str, dict[str, tuple[str, int, int]]] = {"cls": {}, "json": {}}
        last = None
        try:
            for info in tar:
                if info.offset_data + info.size > end:
                    raise ShardError(f"{shard}: cut short in member {info.name} ({end - info.offset_data:,} of its "
                                     f"{info.size:,} bytes)")
                last = info.name
                if not info.isreg():
                    continue
                key, ext = _split(info.name)
                if ext in IMAGE_EXTS:
                    if key in images:
                        raise ShardError(f"{shard}: members {images[key][0]} and {info.name} are two images of one "
                                         f"key")
                    images[key] = (info.name, info.offset_data, info.size)
                elif ext in labels:
                    labels[ext][key] = (info.name, info.offset_data, info.size)
        except tarfile.ReadError as e:
            raise ShardError(f"{shard}: damaged tar header after member {last} ({e})") from None
        f.seek(tar.offset)
        tail = f.read(BLOCK)
        if tail != bytes(BLOCK):
            what = "cut short" if len(tail) < BLOCK and not tail.strip(b"\0") else "damaged tar header"
            raise ShardError(f"{shard}: {what} after member {last}" if last else f"{shard}: {what} at its start")
        names, offsets, sizes, targets = [], [], [], []
        for key, (name, offset, size) in images.items():
            label = labels["cls"].get(key) or labels["json"].get(key)  # a cls member wins
            if label is None:
                raise ShardError(f"{shard}: member {name} has no label ({key}.cls or {key}.json)")
            names.append(name.encode("utf-8", "surrogateescape"))
            offsets.append(offset)
            sizes.append(size)
            targets.append(_read_label(f, shard, *label))
    return {"names": np.array(names, dtype=bytes) if names else np.zeros(0, "S1"),
            "offsets": np.array(offsets, np.int64), "sizes": np.array(sizes, np.int64),
            "labels": np.array(targets, np.int64)}


def _cache_file(shard: Path) -> Path:
    st = os.stat(shard)
    ident = f"{INDEX_VERSION}\0{os.path.realpath(shard)}\0{st.st_size}\0{st.st_mtime_ns}"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fqgan" / "shard-index" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.npz"


def _cached_index(shard: Path) -> Optional[dict[str, np.ndarray]]:
    try:
        with np.load(_cache_file(shard), allow_pickle=False) as z:
            return {k: z[k] for k in ("names", "offsets", "sizes", "labels")}
    except (OSError, KeyError, ValueError):
        return None


def _build_index(shard: Path) -> dict[str, np.ndarray]:
    index = scan_shard(shard)
    path = _cache_file(shard)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # a cache that cannot be written (a read-only home) only costs the scan next time
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **index)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half an index
    except OSError:
        tmp.unlink(missing_ok=True)
    return index


def shard_indices(shards: list[Path]) -> list[dict[str, np.ndarray]]:
    """Every shard's index, from the cache or scanned. Under torchrun (collective) the shards that any rank
    lacks are scanned once, split over the ranks, and exchanged: a first start on a thousand shards does not
    scan each of them on every rank. A bad shard stops every rank with the same line."""

    found = [_cached_index(s) for s in shards]
    world = get_world_size()
    if world == 1:
        return [ix if ix is not None else _build_index(s) for s, ix in zip(shards, found)]
    todo = sorted(set().union(*all_gather_objects([i for i, ix in enumerate(found) if ix is None])))
    built, error = {}, None
    try:
        for i in todo[get_rank()::world]:
            built[i] = found[i] if found[i] is not None else _build_index(shards[i])
    except ShardError as e:
        error = str(e)
    for err, part in all_gather_objects((error, built)):
        if err:
            raise ShardError(err)
        for i, ix in part.items():
            found[i] = ix if found[i] is None else found[i]
    return found


def read_classes(shards: list[Path], labels: np.ndarray) -> tuple[list[str], Optional[Path]]:
    """The class names recorded beside the first shard (``classes.json``, as the converter writes it) and that
    file; without one, the labels' own range named by number (``"0"`` ... ``"max"``)."""
    path = shards[0].parent / CLASSES_FILE
    if path.is_file():
        try:
            classes = json.loads(path.read_text())
            if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
                raise ValueError("not a list of names")
        except ValueError as e:
            raise ShardError(f"{path}: not a list of class names ({e})") from None
        return classes, path
    return [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 1)], None


# ------------------------------------------------------------------------------------------------------------
# the data set
# ------------------------------------------------------------------------------------------------------------
def _open_file_budget() -> int:
    """How many shards a process keeps open: the soft descriptor limit is raised to the hard one (often 1024
    against a million), and half of it is given to shards, so a random order over a thousand shards reads each
    image with one ``pread`` and no ``open``, the metadata call shared file systems are slow at."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(16, (soft if soft != resource.RLIM_INFINITY else 1 << 20) // 2)


class ShardDataset(SafeImageDataset):
    """Tar shards as a SafeImageDataset: image ``i`` is the ``i``-th sample in shard order, then member order
    (the converter's order is the folder's listing, so an image has the same index in both).

    Descriptors are opened per process on first use and kept (least recently used closed past the budget);
    they are never pickled, so workers started by fork or spawn each open their own."""

    def __init__(self, shards: list[str | os.PathLike], transform: Callable[[Image.Image, random.Random], torch.Tensor],
                 image_size: int, seed: int = 0, fallback: bool = False, max_fallbacks: int = 100):
        super().__init__(transform, image_size, seed, fallback, max_fallbacks)
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recently used first
        self.shards = [Path(s) for s in shards]
        indices = shard_indices(self.shards)
        counts = [len(ix["offsets"]) for ix in indices]
        self.names = np.concatenate([ix["names"] for ix in indices])
        self.offsets = np.concatenate([ix["offsets"] for ix in indices])
        self.sizes = np.concatenate([ix["sizes"] for ix in indices])
        self.targets = np.concatenate([ix["labels"] for ix in indices])
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
        if not len(self.targets):
            raise ShardError(f"{self.shards[0].parent}: no images in {len(self.shards)} shards (expected KEY.jpg / "
                             f"KEY.png / KEY.webp members with KEY.cls labels)")
        self.classes, classes_file = read_classes(self.shards, self.targets)
        bad = np.flatnonzero((self.targets < 0) | (self.targets >= len(self.classes)))
        if len(bad):
            i = int(bad[0])
            where = f"the {len(self.classes)} classes of {classes_file}" if classes_file else "0 or more"
            raise ShardError(f"{self.shards[self.shard_of[i]]}: member {self.member(i)}: label {self.targets[i]} is "
                             f"outside {where}")
        self._budget = _open_file_budget()

    def __getstate__(self):
        return {**self.__dict__, "_files": OrderedDict()}  # descriptors belong to the process that opened them

    def __len__(self) -> int:
        return len(self.targets)

    def member(self, index: int) -> str:
        return self.names[index].decode("utf-8", "surrogateescape")

    def _fd(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY)
            while len(self._files) >= self._budget:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd
        return fd

    def read(self, index: int) -> Image.Image:
        size = int(self.sizes[index])
        data = os.pread(self._fd(int(self.shard_of[index])), size, int(self.offsets[index]))
        if len(data) != size:
            raise ShardError(f"{self.where(index)}: {len(data)} of {size} bytes (the shard changed since it was "
                             f"indexed)")
        return open_rgb(io.BytesIO(data))

    def label(self, index: int) -> int:
        return int(self.targets[index])

    def where(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]]} member {self.member(index)}"

    def key(self, index: int) -> str:
        return _split(self.member(index))[0]

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    __del__ = close


# ------------------------------------------------------------------------------------------------------------
# the converter
# ------------------------------------------------------------------------------------------------------------
def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o444  # owner and group stay 0 / "": shards are shareable
    return info


def _header_bytes(info: tarfile.TarInfo) -> int:
    return len(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))  # long names add a pax header


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _tar_bytes(members: int) -> int:
    """A tar's size from its members' bytes: two zero blocks end it, and it is padded to whole records."""
    return -(-(members + 2 * BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def plan_shards(samples: list[tuple[str, int]], root: Path, max_count: int, max_size: int) -> list[list[dict]]:
    """The converter's shards: consecutive images in listing order, each shard closed before it would pass
    ``max_count`` images or ``max_size`` bytes of tar (an image larger than that gets a shard of its own)."""
    shards, current, used, keys = [], [], 0, set()
    for path, label in samples:
        st = os.stat(path)
        rel = os.path.relpath(path, root)
        key = sample_key(rel)
        for n in itertools.count(1):  # keys are unique over the set (a.b.png and a_b.png would meet)
            if key not in keys:
                break
            key = f"{sample_key(rel)}_{n}"
        keys.add(key)
        ext = Path(path).suffix[1:].lower().replace("jpeg", "jpg")
        mtime = int(st.st_mtime)
        item = {"path": path, "rel": rel, "label": label, "image": f"{key}.{ext}", "cls": f"{key}.cls",
                "size": st.st_size, "mtime": mtime, "mtime_ns": st.st_mtime_ns}
        item["bytes"] = (_header_bytes(_member(item["image"], st.st_size, mtime)) + _padded(st.st_size)
                         + _header_bytes(_member(item["cls"], len(str(label)), mtime)) + BLOCK)
        if current and (len(current) == max_count or _tar_bytes(used + item["bytes"]) > max_size):
            shards.append(current)
            current, used = [], 0
        current.append(item)
        used += item["bytes"]
    return shards + ([current] if current else [])


def _write_shard(path: Path, items: list[dict]) -> int:

    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for it in items:
                data = Path(it["path"]).read_bytes()
                if len(data) != it["size"]:
                    raise ShardError(f"{it['path']}: changed while converting ({len(data):,} bytes, "
                                     f"{it['size']:,} when listed)")
                label = str(it["label"]).encode()
                tar.addfile(_member(it["image"], len(data), it["mtime"]), io.BytesIO(data))
                tar.addfile(_member(it["cls"], len(label), it["mtime"]), io.BytesIO(label))

    size = _tar_bytes(sum(it["bytes"] for it in items))
    atomic_write(path, write, size)
    return size


def _listing_digest(plan: list[list[dict]]) -> str:
    """What the shards are made of: every image's path, class, size and modification time, in order."""
    h = hashlib.sha256()
    for it in itertools.chain.from_iterable(plan):
        h.update(f"{it['rel']}\0{it['label']}\0{it['size']}\0{it['mtime_ns']}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _record_classes(out: Path, classes: list[str]) -> None:
    path = out / CLASSES_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except ValueError:
            recorded = None
        if recorded != classes:
            raise ShardError(f"{path} records other classes than the folder's {len(classes)}; convert into another "
                             f"--out (shards of one folder share one classes.json)")
    else:
        _write_json(path, classes)


def brace_pattern(out: Path, prefix: str, count: int) -> str:
    return f"{out}/{prefix}-{{{0:06d}..{count - 1:06d}}}.tar" if count > 1 else f"{out}/{prefix}-000000.tar"


def convert(src: str | os.PathLike, out: str | os.PathLike, prefix: Optional[str] = None, max_count: int = 1000,
            max_size: int = 1 << 30, log=print) -> dict:
    """Write the ImageFolder ``src`` as shards ``out/<prefix>-NNNNNN.tar`` (see the module's docstring); returns
    the manifest it leaves in ``out/<prefix>.json``. A conversion killed part-way continues from its last
    finished shard when run again with the same arguments; other arguments or changed images are refused."""


    src, out = Path(src), Path(out)
    prefix = prefix or src.resolve().name
    samples, classes = find_images(src)
    lock = FolderLock(out, "shard folder", name=f".{prefix}.lock")  # one conversion per output
    for stale in out.glob(f".{prefix}-*.tar.*.tmp"):  # a killed write's half shard
        stale.unlink()
    _record_classes(out, classes)
    plan = plan_shards(samples, src, max_count, max_size)
    settings = {"source": str(src.resolve()), "source_digest": _listing_digest(plan), "prefix": prefix,
                "max_count": max_count, "max_size": max_size}
    manifest_path = out / f"{prefix}.json"
    done: list[dict] = []
    if manifest_path.is_file():
        recorded = json.loads(manifest_path.read_text())
        if recorded.get("source_digest") != settings["source_digest"]:
            raise ShardError(f"{manifest_path}: shards of other images (from {recorded.get('source')}, or the folder "
                             f"changed since); choose another --out or --prefix")
        if (recorded.get("max_count"), recorded.get("max_size")) != (max_count, max_size):
            raise ShardError(f"{manifest_path}: made with --max-count {recorded.get('max_count')} --max-size "
                             f"{recorded.get('max_size')}; rerun with those, or choose another --out or --prefix")
        done = recorded["shards"]
        if recorded.get("complete"):
            log(f"{manifest_path}: already complete, {recorded['images']} images in {len(done)} shards")
            lock.release(remove=True)
            return recorded
    manifest = {**settings, "format": "webdataset: KEY.<image extension> + KEY.cls (class index)",
                "images": len(samples), "classes": len(classes), "shards": done, "complete": False}
    bar = tqdm(total=len(samples), initial=sum(s["images"] for s in done), unit="img", desc="shards")
    for i, items in enumerate(plan):
        name = f"{prefix}-{i:06d}.tar"
        if i < len(done):
            if not (out / name).is_file() or (out / name).stat().st_size != done[i]["bytes"]:
                raise ShardError(f"{out / name}: missing or changed since it was written; remove {manifest_path} "
                                 f"to convert afresh")
            continue
        size = _write_shard(out / name, items)
        done.append({"name": name, "images": len(items), "bytes": size})
        manifest["complete"] = i == len(plan) - 1
        _write_json(manifest_path, manifest)
        bar.update(len(items))
    bar.close()
    lock.release(remove=True)
    log(f"{len(samples)} images in {len(plan)} shards; read them with --data-path "
        f"'{brace_pattern(out, prefix, len(plan))}'")
    return manifest


@dataclass(frozen=True)
class ShardsConfig:
    """The converter's command line (``python -m utils.shards``)."""
    data_path: str = flag("", required=True, help="the ImageFolder: one sub-folder of images per class")
    out: str = flag("", required=True, help="folder for the shards, classes.json and <prefix>.json")
    prefix: Optional[str] = flag(None, help="shard names <prefix>-000000.tar ... (default: the folder's name)")
    max_count: int = flag(1000, type=positive_int, help="at most this many images per shard")
    max_size: int = flag(1 << 30, type=byte_size, help="at most this many bytes per shard (suffix K, M, G, T: "
                                                       "powers of 1024)")


def main(argv=None) -> dict:
    cfg = parse(ShardsConfig, argv, "Convert an ImageFolder into WebDataset tar shards (KEY.jpg + KEY.cls), "
                                     "resumable; see docs/data.md.")
    with exits_on(OSError, FolderInUse):  # ShardError, a missing folder, a full disk, another conversion
        return convert(cfg.data_path, cfg.out, cfg.prefix, cfg.max_count, cfg.max_size)


if __name__ == "__main__":
    main()
