"""Reconstruction evaluation speed (what reconstruction_vq_ddp_*.py does per image); prints ONE JSON line.

    python benchmarks/reconstruct.py                  # VQ-16 dual, 256x256
    python benchmarks/reconstruct.py --device cpu --batch-size 2 --iters 2

Times encode + decode + uint8 conversion (the model part) and, separately, the per-image PSNR/SSIM the script
computes on the CPU; images_per_s is the whole per-image cost on one process. Random weights and images.
"""
from __future__ import annotations

import argparse
import json
import time


import numpy as np
import torch

from benchmarks.timing import sync
from tokenizer.models import FactorizedTokenizer
from tokenizer.reconstruct import image_metrics
from utils.images import to_uint8


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dual", choices=["dual", "triple"])
    p.add_argument("--vq-model", default="VQ-16", choices=["VQ-16", "VQ-8"])
    p.add_argument("--batch-size", type=int, default=None, help="default 2 on CPU, 64 on GPU")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":  # as the evaluation script runs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = args.batch_size or (64 if device.type == "cuda" else 2)
    torch.manual_seed(0)
    model = FactorizedTokenizer(args.preset, vq_model=args.vq_model).to(device).eval()
    x = torch.rand(batch, 3, args.image_size, args.image_size, device=device) * 2 - 1

    @torch.no_grad()
    def model_part():
        rec = model.decode_indices(model.encode_indices(x, batch_size=batch), batch_size=batch)
        return to_uint8(rec).cpu().numpy()

    model_part()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        rec = model_part()
    sync(device)
    model_s = (time.perf_counter() - t) / args.iters / batch
    target = (x.permute(0, 2, 3, 1).cpu().numpy() + 1) / 2
    t = time.perf_counter()
    image_metrics(rec, target.astype(np.float32))
    metric_s = (time.perf_counter() - t) / batch
    result = {"benchmark": "reconstruct", "preset": args.preset, "vq_model": args.vq_model,
              "image_size": args.image_size, "batch_size": batch,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "model_images_per_s": round(1 / model_s, 3),
              "metrics_images_per_s": round(1 / metric_s, 3), "images_per_s": round(1 / (model_s + metric_s), 3),
              "torch": torch.__version__}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
