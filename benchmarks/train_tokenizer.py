"""Tokenizer training steps as tokenizer/train.py runs them (its own build() and train_step()); ONE JSON line per
step kind.

    python benchmarks/train_tokenizer.py                                  # GPU: VQ-16 dual, batch 32, bf16
    python benchmarks/train_tokenizer.py --compile --steps model,full
    python benchmarks/train_tokenizer.py --device cpu --batch-size 2 --iters 1

Step kinds:
  model  the tokenizer update alone: reconstruction MSE, quantizer losses (entropy 0.03), disentanglement, the
         feature heads' forward, backward, clipping, Adam; the discriminator is idle (before --disc-start).
  full   the recipe after --disc-start: the same plus LPIPS and the PatchGAN generator loss, then the
         discriminator update.
No semantic teacher runs in either (none can be downloaded here): the heads are computed without their loss.
Weights are random (LPIPS' VGG16 too, written to a temporary file in torchvision's layout; the cost is the same);
the batch is random and already on the device, so data loading is not timed.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


import numpy as np
import torch
import torchvision
from PIL import Image

from benchmarks.timing import peak_memory_gb, sync
from tokenizer.train import build, parse_config, train_step
from utils.flags import add_compile_argument, add_precision_argument


def random_image_folder(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "c").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "c" / f"{i}.png")
    return root


def random_vgg16(path: Path) -> Path:
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


def run(kind: str, args, tmp: Path) -> dict:
    flags = ["--data-path", str(tmp / "data"), "--results-dir", str(tmp / "results"), "--exp-name", kind,
             "--vq-model", args.vq_model, "--image-size", str(args.image_size),
             "--global-batch-size", str(args.batch_size), "--num-workers", "0", "--device", args.device,
             "--mixed-precision", args.mixed_precision, "--entropy-loss-ratio", "0.03", "--with_disentanglement",
             "--channels-last", args.channels_last, "--log-every", "1000000", "--no-local-save",
             "--with_clip_supervision", "--semantic-weight", "0"]  # the heads run; no teacher, no semantic loss
    if kind == "model":
        flags += ["--perceptual-weight", "0", "--disc-start", "1000000"]
    else:
        flags += ["--perceptual-weight", "1", "--vgg-path", str(tmp / "vgg16.pth"), "--disc-start", "0"]
    flags += ["--compile"] if args.compile else []
    t = build(parse_config(flags, args.preset))
    device = t.run.info.device
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    t0 = time.perf_counter()
    train_step(t, x, 1)  # warm-up: compilation, cuDNN autotuning, allocations
    sync(device)
    compile_s = time.perf_counter() - t0
    train_step(t, x, 2)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.iters):
        logs, _, _ = train_step(t, x, 3 + i)
    sync(device)
    sec = (time.perf_counter() - t0) / args.iters
    return {"benchmark": "train_tokenizer", "step": kind, "preset": args.preset, "vq_model": args.vq_model,
            "batch_size": args.batch_size, "image_size": args.image_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "mixed_precision": args.mixed_precision if device.type == "cuda" else "fp32",
            "compile": args.compile, "channels_last": args.channels_last, "seconds_per_step": round(sec, 4),
            "images_per_s": round(args.batch_size / sec, 2), "peak_memory_gb": round(peak_memory_gb(device), 2),
            "first_step_s": round(compile_s, 1), "loss": round(float(logs["loss"]), 4), "torch": torch.__version__}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dual", choices=["dual", "triple"])
    p.add_argument("--vq-model", default="VQ-16", choices=["VQ-16", "VQ-8"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on a GPU (the recipe's), 2 on CPU")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", default="model,full", help="comma-separated step kinds: model, full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_argument(p, "--mixed-precision", "bf16")
    add_compile_argument(p, False, "torch.compile the tokenizer, LPIPS and the discriminator (as --compile)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (32 if args.device.startswith("cuda") else 2)
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        random_image_folder(tmp / "data", args.batch_size, 64)
        random_vgg16(tmp / "vgg16.pth")
        for kind in args.steps.split(","):
            results.append(run(kind, args, tmp))
            print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
