"""Training data loading: an ImageFolder against the tar shards of the same images, read as training reads them
(decode + ADM random crop + flip, batches through the training loader) with 0, 2 and all workers; prints one
JSON line per (source, workers).

    python benchmarks/data.py                                   # 2,000 JPEG photo crops of 400 px, made here
    python benchmarks/data.py --data-path /data/ImageNet/train --num-images 20000 --out /scratch/bench-shards
    python benchmarks/data.py --num-images 32 --source-size 48 --image-size 32 --workers 0,2   # a toy size

``images_per_s`` is the whole epoch (worker start included) over its images; ``setup_s`` what a run pays
before its first batch: listing the folder (``find_images``), or indexing the shards with an empty index cache
(``setup_cached_s``: with the cache a second start finds). Torch runs one thread in the main process, as in each
worker. With ``--data-path`` the images are ``--num-images`` spread evenly over the folder, linked into a
temporary folder that both sources read. Files just written sit in the page cache, so this measures decoding and
the loader, not a cold shared file system, where every image of a folder costs an ``open`` (a metadata request)
and a shard one per process.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from utils.data import ResumableSampler, collate_train, epoch_loader, find_images, image_dataset, train_transform
from utils.shards import brace_pattern, convert


def make_images(root: Path, n: int, size: int) -> None:
    """``n`` JPEG crops (quality 90, about ImageNet's) of scikit-image's photographs, in 4 classes."""
    from demo.photos import load_photo, random_crops

    rng = np.random.default_rng(0)
    names = ["astronaut", "cat", "coffee", "rocket"]
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        count = n // len(names) + (c < n % len(names))
        for i, crop in enumerate(random_crops(load_photo(name), count, size, rng, min_frac=0.6, max_frac=1.0)):
            crop.save(root / name / f"{i:05d}.jpg", quality=90)


def link_subset(src: Path, root: Path, n: int) -> None:
    """``n`` images of the folder ``src``, spread evenly over it (every class keeps its share), linked under
    ``root/<class>/``."""
    samples, classes = find_images(src)
    for i in np.unique(np.linspace(0, len(samples) - 1, min(n, len(samples))).round().astype(np.int64)):
        path, label = samples[i]
        (root / classes[label]).mkdir(parents=True, exist_ok=True)
        (root / classes[label] / Path(path).name).symlink_to(Path(path).resolve())


def timed_setup(path, image_size: int):
    t = time.perf_counter()
    ds = image_dataset(path, train_transform(image_size), image_size, fallback=True)
    return ds, time.perf_counter() - t


def index_cold_and_warm(folder: Path, shards: str, cache: Path, image_size: int):
    """Both data sets with their set-up times, the shards' first with an empty index cache, then the warm one's."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        sources = {"folder": timed_setup(folder, image_size), "shards": timed_setup(shards, image_size)}
        cached = timed_setup(shards, image_size)[1]
    finally:
        if before is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = before
    for ds, _ in sources.values():  # decoders imported, first files touched: neither source pays it in its timing
        for i in range(min(len(ds), 8)):
            ds[i]
    return sources, cached


def epoch_rate(ds, workers: int, batch: int) -> tuple[float, float]:
    """(images/s, seconds) of one training epoch over ``ds``."""
    sampler = ResumableSampler(len(ds), batch)
    loader = epoch_loader(ds, sampler, batch, workers, collate_train, torch.device("cpu"), seed=0)
    t = time.perf_counter()
    count = sum(len(x) for x, _, _ in loader)
    seconds = time.perf_counter() - t
    return count / seconds, seconds


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=None, help="an ImageFolder to sample from (default: make JPEG crops)")
    p.add_argument("--out", default=None, help="where the shards go (default: a temporary folder)")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--source-size", type=int, default=400, help="side of the made images")
    p.add_argument("--image-size", type=int, default=256, help="the training crop")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="0,2,all", help="comma-separated worker counts; all: every CPU")
    args = p.parse_args(argv)

    # One intra-op thread, as in every loader worker: with 0 workers the transform's few tensor ops would otherwise
    # wake a thread pool per op, which on a busy machine costs more than decoding (6x slower on a loaded 2-core).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # (an in-process caller keeps its own)


def run(args) -> list[dict]:
    cpus = len(os.sched_getaffinity(0))
    workers = list(dict.fromkeys(cpus if w == "all" else int(w) for w in args.workers.split(",")))  # all may be 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        if args.data_path:
            link_subset(Path(args.data_path), folder, args.num_images)
        else:
            make_images(folder, args.num_images, args.source_size)
        out = Path(args.out) if args.out else tmp / "shards"
        manifest = convert(folder, out, prefix="bench", log=lambda *a: None)
        shards = brace_pattern(out, "bench", len(manifest["shards"]))
        sources, cached = index_cold_and_warm(folder, shards, tmp / "cache", args.image_size)
        results = []
        for w in workers:  # the two sources side by side at each worker count: a busy machine's load drifts
            for name, (ds, setup_s) in sources.items():
                rate, seconds = epoch_rate(ds, w, args.batch_size)
                result = {"benchmark": "data", "source": name, "workers": w, "images": len(ds),
                          "image_size": args.image_size, "batch_size": args.batch_size,
                          "source_size": None if args.data_path else args.source_size,
                          "images_per_s": round(rate, 1), "epoch_s": round(seconds, 3), "setup_s": round(setup_s, 4),
                          **({"setup_cached_s": round(cached, 4), "shards": len(manifest["shards"])}
                             if name == "shards" else {}), "cpus": cpus, "torch": torch.__version__}
                print(json.dumps(result), flush=True)
                results.append(result)
    return results


if __name__ == "__main__":
    main()
