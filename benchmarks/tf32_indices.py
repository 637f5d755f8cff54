"""How much TF32 changes a tokenizer's codes on a GPU; ONE JSON line.

    python benchmarks/tf32_indices.py            # VQ-16 dual, photographs from scikit-image, 256x256

PyTorch may run float32 matmuls (``torch.backends.cuda.matmul.allow_tf32``) and convolutions
(``torch.backends.cudnn.allow_tf32``) in TF32, with 10-bit mantissas. The nearest-code search compares distances
to 16384 unit vectors, so small errors flip near-tie codes. Encodes the same images with:
  fp32          TF32 off everywhere (the reference)
  tf32          TF32 on for matmuls and convolutions, the search's dot products in float64 (this project)
  tf32_search   TF32 on everywhere, the search in float32 too (what TF32 would do without the float64 product)
and reports the fraction of codes equal to the reference, per factor. Weights are random (seeded), so this is
an upper bound of sorts: a trained encoder separates codes better.
"""
from __future__ import annotations

import argparse
import json
import sys


import numpy as np
import torch

from demo.photos import load_photo, random_crops
from tokenizer.models import FactorizedTokenizer
from tokenizer.models.quantizer import VectorQuantizer
from utils.data import to_model_range

PHOTOS = ("astronaut", "cat", "coffee", "rocket")


def float32_distances(self, z, e):
    return torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * (z @ e.t())


def encode(model, x, tf32: bool) -> torch.Tensor:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    with torch.no_grad():
        return model.encode_indices(x, batch_size=16)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dual", choices=["dual", "triple"])
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: TF32 exists on CUDA GPUs only")
    torch.manual_seed(0)
    model = FactorizedTokenizer(args.preset, with_feature_heads=False).cuda().eval()
    rng = np.random.default_rng(0)
    crops = [c for name in PHOTOS for c in random_crops(load_photo(name), args.images // len(PHOTOS), 256, rng)]
    x = torch.stack([to_model_range(c) for c in crops]).cuda()
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    reference = encode(model, x, False)
    ours = encode(model, x, True)
    original = VectorQuantizer._distances
    VectorQuantizer._distances = float32_distances
    try:
        plain = encode(model, x, True)
    finally:
        VectorQuantizer._distances = original
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    agree = lambda a: [round(float((a[:, f] == reference[:, f]).float().mean()), 5)  # noqa: E731
                       for f in range(reference.shape[1])]
    result = {"benchmark": "tf32_indices", "preset": args.preset, "images": len(x),
              "factors": model.factor_names, "device": torch.cuda.get_device_name(),
              "agreement_tf32": agree(ours), "agreement_tf32_search": agree(plain), "torch": torch.__version__}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
