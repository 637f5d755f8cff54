"""Write the reference batch for rFID: the validation images, ADM centre-cropped, as one uint8 ``.npz``.

    torchrun --nnodes=1 --nproc_per_node=8 --node_rank=0 --master_port=12343 tokenizer/val_ddp.py \\
        --data-path /data/ImageNet/val --image-size 256 --per-proc-batch-size 128

writes ``reconstructions/val_imagenet.npz`` with ``arr_0`` of shape (N, 256, 256, 3): every image of the folder
exactly once, in dataset (sorted ImageFolder) order, whatever the number of processes. Image i here is the
original of reconstruction i written by ``reconstruction_vq_ddp_{dual,triple}.py``. (The original script
shuffled this file; the order changes only the Inception Score's split, never FID.)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.argtypes import nonnegative_int, positive_int
from utils.data import UnreadableImage, eval_batches, eval_transform, image_dataset, rank_shard
from utils.distributed import cleanup, init_distributed
from utils.flags import exits_on, flag, ignored, parse
from utils.images import to_uint8
from utils.npz import ShardedNpzWriter
from utils.runfiles import NoSpace, OutputExists


@dataclass(frozen=True)
class ValConfig:
    """The command line of the reference batch."""
    IGNORED = (ignored("--global-seed", type=int, default=0, help="nothing is random"),)
    data_path: str = flag("", required=True, help="ImageFolder root (or a flat folder for coco), or tar shards")
    dataset: str = flag("imagenet", help="names the output: <sample-dir>/val_<dataset>.npz")
    image_size: int = flag(256, type=positive_int)
    sample_dir: str = flag("reconstructions")
    per_proc_batch_size: int = flag(32, type=positive_int)
    num_workers: int = flag(4, type=nonnegative_int)
    num_images: int = flag(0, type=nonnegative_int, help="use only the first N images (0: all)")
    overwrite: bool = flag(False, help="write over a finished <sample-dir>/val_<dataset>.npz (else refused)")


def main(argv=None) -> Path:
    cfg = parse(ValConfig, argv, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    with exits_on(UnreadableImage):
        return write_reference_batch(cfg)


@torch.no_grad()  # evaluation only (and leaves grad mode alone for in-process callers)
def write_reference_batch(cfg: ValConfig) -> Path:
    info = init_distributed()
    try:
        dataset = image_dataset(cfg.data_path, eval_transform(cfg.image_size), cfg.image_size)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    n = min(len(dataset), cfg.num_images) if cfg.num_images else len(dataset)
    out = Path(cfg.sample_dir) / f"val_{cfg.dataset}.npz"
    try:
        writer = ShardedNpzWriter(out, {"arr_0": ((n, cfg.image_size, cfg.image_size, 3), np.uint8)},
                                  overwrite=cfg.overwrite)
    except (NoSpace, OutputExists) as e:
        sys.exit(f"error: {e}")
    batches = eval_batches(dataset, rank_shard(n, info.rank, info.world_size), cfg.per_proc_batch_size,
                           cfg.num_workers)
    total = -(-len(rank_shard(n, info.rank, info.world_size)) // cfg.per_proc_batch_size)
    for x, _, idx, _ in tqdm(batches, total=total, disable=not info.is_main, desc="reference batch"):
        writer.write("arr_0", idx.numpy(), to_uint8(x).numpy())
    writer.close()
    if info.is_main:
        print(f"Saved {n} images ({cfg.image_size}x{cfg.image_size}) to {out}")
    cleanup()
    return out


if __name__ == "__main__":
    main()
