"""Reconstruct one image with a tokenizer checkpoint (released or trained here) and save a comparison PNG.

    python tokenizer/reconstruct_image.py --vq-ckpt fqgan_dual_ds16.pt --image photo.jpg --out recon.png

The PNG shows, left to right: the centre-cropped input, its reconstruction, and (with --per-factor) the image
decoded from each factor alone (the other factors' codes zeroed), which shows what each sub-codebook learned.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional


import torch

from tokenizer.models import check_tokenizer_flags, load_tokenizer
from utils.argtypes import positive_int
from utils.checkpoint import CheckpointError, unsafe_load_flag
from utils.data import center_crop_arr, to_model_range
from utils.flags import flag, parse
from utils.images import open_rgb, save_grid


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] images, measured on the 8-bit range."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) * 127.5).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0 ** 2 / mse)).item()


@dataclass(frozen=True)
class ImageConfig:
    """The command line of one image's reconstruction."""
    vq_ckpt: str = flag("", required=True, help="tokenizer checkpoint: a file (.pt or .safetensors) or "
                                                 "hf://ZechenBai/FQGAN/fqgan_dual_ds16.pt")
    image: str = flag("", required=True, help="any image file PIL can read")
    out: str = flag("reconstruction.png")
    image_size: int = flag(256, type=positive_int)
    per_factor: bool = flag(False, help="also decode each factor alone")
    device: Optional[str] = flag(None, help="default: cuda when available, else cpu")
    unsafe_load: bool = unsafe_load_flag()


def main(argv=None) -> None:
    args = parse(ImageConfig, argv, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    try:
        model = load_tokenizer(args.vq_ckpt, map_location="cpu").to(device)
        check_tokenizer_flags(args, model)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    try:
        img = center_crop_arr(open_rgb(args.image), args.image_size)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --image {args.image}: cannot read it ({e})")
    x = to_model_range(img)[None].to(device)
    with torch.no_grad():
        indices = model.encode_indices(x)
        panels = [x, model.decode_indices(indices)]
        if args.per_factor:
            panels += [model.decode_indices(indices, keep=[f]) for f in range(model.config.num_factors)]
    save_grid(torch.cat(panels).cpu(), args.out, nrow=len(panels))
    names = ["input", "reconstruction"] + ([f"only {n}" for n in model.factor_names] if args.per_factor else [])
    print(f"Tokenizer: {model.loaded_from}")
    print(f"PSNR {psnr(panels[1], x):.2f} dB; codes {tuple(indices.shape[1:])} per image; "
          f"wrote {args.out} ({' | '.join(names)})")


if __name__ == "__main__":
    main()
