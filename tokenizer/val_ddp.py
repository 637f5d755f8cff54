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
from pathlib import Path


import numpy as np
import torch
from tqdm import tqdm

from utils.data import eval_batches, eval_transform, image_dataset, rank_shard
from utils.distributed import cleanup, init_distributed
from utils.flags import add_compat_flags, ignored, parse_flags
from utils.images import to_uint8
from utils.npz import ShardedNpzWriter


COMPAT = (ignored("--global-seed", type=int, default=0, help="nothing is random"),)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", type=str, required=True,
                   help="ImageFolder root (or a flat folder for coco), or tar shards (docs/data.md)")
    p.add_argument("--dataset", type=str, default="imagenet", help="names the output: <sample-dir>/val_<dataset>.npz")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--sample-dir", type=str, default="reconstructions")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--num-images", type=int, default=0, help="use only the first N images (0: all)")
    add_compat_flags(p, COMPAT)
    return p


@torch.no_grad()  # evaluation only (and leaves grad mode alone for in-process callers)
def main(argv=None) -> Path:
    args = parse_flags(get_parser(), COMPAT, argv)
    info = init_distributed()
    try:
        dataset = image_dataset(args.data_path, eval_transform(args.image_size), args.image_size)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    n = min(len(dataset), args.num_images) if args.num_images else len(dataset)
    out = Path(args.sample_dir) / f"val_{args.dataset}.npz"
    writer = ShardedNpzWriter(out, {"arr_0": ((n, args.image_size, args.image_size, 3), np.uint8)})
    batches = eval_batches(dataset, rank_shard(n, info.rank, info.world_size), args.per_proc_batch_size,
                           args.num_workers)
    total = -(-len(rank_shard(n, info.rank, info.world_size)) // args.per_proc_batch_size)
    for x, _, idx, _ in tqdm(batches, total=total, disable=not info.is_main, desc="reference batch"):
        writer.write("arr_0", idx.numpy(), to_uint8(x).numpy())
    writer.close()
    if info.is_main:
        print(f"Saved {n} images ({args.image_size}x{args.image_size}) to {out}")
    cleanup()
    return out


if __name__ == "__main__":
    main()
