"""Tokenizer speed: encode and decode images/s, and one training forward+backward, as one JSON line.

    python benchmarks/encode_decode.py                       # VQ-16 dual, 256x256, on CUDA if present, else CPU
    python benchmarks/encode_decode.py --device cpu --iters 2 --encode-memory-images 64

Random weights (speed does not depend on them). The training step is the model's own forward and backward
(reconstruction MSE + every factor's quantizer losses + disentanglement + head outputs), without LPIPS, the
discriminator or teachers; benchmarks/train_tokenizer.py times the full training step.
"""
from __future__ import annotations

import argparse
import json
import platform
from contextlib import nullcontext
from typing import Optional

import torch

from benchmarks.timing import peak_memory_gb, timed
from tokenizer.models import FactorizedTokenizer
from utils.flags import add_precision_argument, torch_dtype


def autocast_for(device: torch.device, choice: Optional[str]):
    """(autocast context factory, dtype name) for --dtype (default: bf16 on GPU, fp32 on CPU)."""
    name = choice or ("bf16" if device.type == "cuda" else "fp32")
    if name == "fp32":
        return nullcontext, name
    return (lambda: torch.autocast(device.type, dtype=torch_dtype(name))), name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dual", choices=["dual", "triple"])
    p.add_argument("--vq-model", default="VQ-16", choices=["VQ-16", "VQ-8"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="encode/decode batch (default 2 on CPU, 32 on GPU)")
    p.add_argument("--train-batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_argument(p, "--dtype", None, "autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--encode-memory-images", type=int, default=0,
                   help="also encode this many images in one call and report the peak memory (e.g. 64)")
    args = p.parse_args()

    device = torch.device(args.device)
    amp, dtype_name = autocast_for(device, args.dtype)
    batch = args.batch_size or (32 if device.type == "cuda" else 2)
    torch.manual_seed(0)
    model = FactorizedTokenizer(args.preset, vq_model=args.vq_model, entropy_loss_ratio=0.03,
                                disentanglement_ratio=0.1).to(device)
    x = torch.rand(batch, 3, args.image_size, args.image_size, device=device) * 2 - 1

    peak = None
    if args.encode_memory_images:  # first, so the peak is the encoding's (process RSS never goes down on CPU)
        model.eval()
        big = torch.rand(args.encode_memory_images, 3, args.image_size, args.image_size, device=device) * 2 - 1
        with torch.no_grad(), amp():
            model.encode_indices(big)
        peak = round(peak_memory_gb(device), 3)
        del big
    model.eval()
    with torch.no_grad(), amp():
        idx = model.encode_indices(x, batch_size=batch)
        enc_s = timed(lambda: model.encode_indices(x, batch_size=batch), device, args.iters)
        dec_s = timed(lambda: model.decode_indices(idx, batch_size=batch), device, args.iters)

    model.train()
    xt = x[:args.train_batch_size].contiguous()
    if len(xt) < args.train_batch_size:
        xt = torch.rand(args.train_batch_size, *x.shape[1:], device=device) * 2 - 1

    def train_step():
        with amp():
            out = model(xt)
            loss = (out.recon.float() - xt).pow(2).mean() + out.quantizer_loss() + out.disentangle_loss + \
                sum(f.float().pow(2).mean() for f in out.head_features.values())
        loss.backward()
        model.zero_grad(set_to_none=True)

    train_s = timed(train_step, device, args.iters)
    result = {
        "benchmark": "tokenizer", "preset": args.preset, "vq_model": args.vq_model,
        "image_size": args.image_size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "dtype": dtype_name, "torch": torch.__version__,
        "encode_batch": batch, "encode_images_per_s": round(batch / enc_s, 3),
        "decode_images_per_s": round(batch / dec_s, 3),
        "train_batch": args.train_batch_size, "train_fwd_bwd_s": round(train_s, 4),
    }
    if peak is not None:
        result[f"encode_{args.encode_memory_images}_peak_memory_gb"] = peak
    print(json.dumps(result))


if __name__ == "__main__":
    main()
