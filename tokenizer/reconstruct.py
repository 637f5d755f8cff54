"""Reconstruction evaluation of a tokenizer: one implementation behind ``reconstruction_vq_ddp_dual.py`` and
``reconstruction_vq_ddp_triple.py`` (which only fix the factor count) and LlamaGen's ``reconstruction_vq_ddp.py``
(any tokenizer, the factor count read from the checkpoint: LlamaGen's ``vq_ds16_c2i.pt`` as well).

For every image of the set (ADM centre crop, dataset order, each exactly once whatever the world size) it
writes the reconstruction into ``<sample-dir>/<folder-name>.npz`` (``arr_0``, uint8 N x H x W x 3; row i is the
reconstruction of row i of ``val_ddp.py``'s reference batch), and reports:

* PSNR and SSIM exactly as the original script computes them, so numbers compare with published ones:
  both on [0, 1] float images (reconstruction rounded to uint8 first, original not), averaged per image;
  PSNR with data range 1; SSIM with scikit-image's defaults (7x7 uniform window) and ``data_range=2.0`` —
  a quirk of the original (the images span 1, not 2), which makes SSIM read higher than with the true
  range. We keep it for comparability and also report ``ssim_true_range``;
* LPIPS (VGG) when the VGG16 weights are available locally;
* per factor: the fraction of the codebook used over the whole set and the perplexity of the code histogram;
* with ``--fid-ref REF.npz`` (e.g. ``val_ddp.py``'s reference batch): rFID and the other ADM numbers, from Inception
  features taken on each rank while the reconstructions are made (``evaluations/inprocess.py``), the same numbers
  as ``evaluations/evaluator.py --backend torch REF.npz <folder-name>.npz``.

Everything is printed, written to ``<folder-name>_results.txt`` (the original's format) and to
``<folder-name>.json`` beside the npz.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from evaluations.inprocess import POOL, SPATIAL, InProcessFID, add_fid_arguments, write_result
from evaluations.errors import EvaluatorInputError
from tokenizer.factor_metrics import codebook_stats
from tokenizer.models import check_tokenizer_flags, describe_tokenizer, load_tokenizer
from utils.checkpoint import CheckpointError, add_unsafe_load_argument
from utils.data import ImageFolderSafe, eval_batches, eval_transform, rank_shard
from utils.distributed import all_reduce_sum, cleanup, init_distributed
from utils.factors import preset_name
from utils.flags import add_compat_flags, ignored, parse_flags
from utils.images import to_uint8
from utils.npz import ShardedNpzWriter


# The original evaluation scripts' flags that do nothing here: the checkpoint decides the model (heads included).
COMPAT = (
    ignored("--dataset", type=str, default="imagenet", help="--data-path is read as an ImageFolder"),
    ignored("--with_clip_supervision", action="store_true", help="the checkpoint decides whether heads exist"),
    ignored("--with_disentanglement", action="store_true", help="a training flag"),
    ignored("--disentanglement-ratio", type=float, default=0.1, help="a training flag"),
    ignored("--semantic-weight", type=float, default=0.5, help="a training flag"),
)


def get_parser(num_factors: Optional[int]) -> argparse.ArgumentParser:
    kind = "a tokenizer (FQGAN's or LlamaGen's: the checkpoint decides)" if num_factors is None else \
        f"an FQGAN-{preset_name(num_factors)} tokenizer"
    p = argparse.ArgumentParser(description=f"Reconstruction evaluation of {kind}.")
    p.add_argument("--data-path", type=str, required=True)
    p.add_argument("--vq-model", type=str, choices=["VQ-16", "VQ-8"], default=None,
                   help="checked against the checkpoint (which determines the model)")
    p.add_argument("--vq-ckpt", type=str, required=True)
    p.add_argument("--codebook-size", type=int, default=None, help="checked against the checkpoint")
    p.add_argument("--codebook-embed-dim", type=int, default=None, help="checked against the checkpoint")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--image-size-eval", type=int, default=None, help="resize both images to this for metrics")
    p.add_argument("--sample-dir", type=str, default="reconstructions")
    p.add_argument("--folder-name", type=str, default="default_recon")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--num-images", type=int, default=0, help="evaluate only the first N images (0: all)")
    p.add_argument("--save-png", action="store_true", help="also write <sample-dir>/<folder-name>/NNNNNN.png")
    p.add_argument("--vgg-path", type=str, default=None, help="VGG16 ImageNet weights for LPIPS (optional)")
    p.add_argument("--no-tf32", action="store_true", help="full fp32 matmuls on GPU (TF32 is on by default)")
    add_fid_arguments(p)
    add_unsafe_load_argument(p)
    add_compat_flags(p, COMPAT)
    return p


def image_metrics(recon_u8: np.ndarray, target01: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """Per-image PSNR, SSIM (the original's data_range=2 quirk) and SSIM with the true range 1."""
    psnr, ssim, ssim_true = [], [], []
    for rec, gt in zip(recon_u8, target01):
        rec = rec.astype(np.float32) / 255.0
        psnr.append(float(peak_signal_noise_ratio(gt, rec, data_range=1.0)))
        ssim.append(float(structural_similarity(rec, gt, data_range=2.0, channel_axis=-1)))
        ssim_true.append(float(structural_similarity(rec, gt, data_range=1.0, channel_axis=-1)))
    return psnr, ssim, ssim_true


def _lpips_or_none(vgg_path: Optional[str], device: torch.device, log) -> Optional[torch.nn.Module]:
    try:
        from tokenizer.losses.lpips import LPIPS, MissingWeightsError
    except ImportError:
        return None
    try:
        return LPIPS(vgg_path=vgg_path).to(device).eval()
    except MissingWeightsError as e:
        log(f"LPIPS skipped: {e}")
        return None


@torch.no_grad()  # evaluation only (and leaves grad mode alone for in-process callers)
def main(argv=None, num_factors: Optional[int] = 2) -> dict:
    """Evaluate; ``num_factors`` None takes any tokenizer, the factor count read from ``--vq-ckpt``."""
    args = parse_flags(get_parser(num_factors), COMPAT, argv)
    info = init_distributed()
    if not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = print if info.is_main else (lambda *a, **k: None)
    try:
        model = load_tokenizer(args.vq_ckpt, expect_factors=num_factors)
        check_tokenizer_flags(args, model)
        dataset = ImageFolderSafe(args.data_path, eval_transform(args.image_size), args.image_size)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    model = model.to(info.device)
    cfg = model.config
    num_factors = cfg.num_factors
    log(f"Loaded {describe_tokenizer(cfg)} from {model.loaded_from}")
    lpips = _lpips_or_none(args.vgg_path, info.device, log)

    n = min(len(dataset), args.num_images) if args.num_images else len(dataset)
    size = args.image_size_eval or args.image_size
    out = Path(args.sample_dir) / f"{args.folder_name}.npz"
    fid = None
    if args.fid_ref:
        try:  # before any image: a wrong reference fails now
            fid = InProcessFID(args.fid_ref, args.inception_graph, info.device, size, n, args.fid_batch_size)
        except EvaluatorInputError as e:
            sys.exit(f"error: {e}")
        log(f"--fid-ref: {fid.describe()}")
    writer = ShardedNpzWriter(out, {"arr_0": ((n, size, size, 3), np.uint8), **(fid.arrays(n) if fid else {})},
                              members=["arr_0"])
    png_dir = Path(args.sample_dir) / args.folder_name
    if args.save_png:
        png_dir.mkdir(parents=True, exist_ok=True)

    sums = torch.zeros(5, dtype=torch.float64)  # psnr, ssim, ssim_true, lpips, count
    hist = torch.zeros(num_factors, cfg.codebook_size, dtype=torch.float64)
    shard = rank_shard(n, info.rank, info.world_size)
    batches = eval_batches(dataset, shard, args.per_proc_batch_size, args.num_workers)
    total = -(-len(shard) // args.per_proc_batch_size)
    for x, _, idx, _ in tqdm(batches, total=total, disable=not info.is_main, desc=args.folder_name):
        x = x.to(info.device, non_blocking=True)
        indices = model.encode_indices(x, batch_size=len(x))
        recon = model.decode_indices(indices, batch_size=len(x))
        for f in range(num_factors):
            hist[f] += torch.bincount(indices[:, f].flatten().cpu(), minlength=cfg.codebook_size).double()
        if size != args.image_size:
            x = F.interpolate(x, size=(size, size), mode="bicubic")
            recon = F.interpolate(recon, size=(size, size), mode="bicubic")
        recon_u8 = to_uint8(recon)
        if fid is not None:
            pool, spatial = fid(recon_u8)
            writer.write(POOL, idx.numpy(), pool.cpu().numpy())
            writer.write(SPATIAL, idx.numpy(), spatial.cpu().numpy())
        recon_u8 = recon_u8.cpu().numpy()
        writer.write("arr_0", idx.numpy(), recon_u8)
        psnr, ssim, ssim_true = image_metrics(recon_u8, ((x.permute(0, 2, 3, 1).cpu().numpy() + 1.0) / 2.0))
        sums[:3] += torch.tensor([sum(psnr), sum(ssim), sum(ssim_true)], dtype=torch.float64)
        sums[4] += len(x)
        if lpips is not None:
            sums[3] += lpips(recon.clamp(-1, 1), x).sum().item()
        if args.save_png:
            from PIL import Image
            for i, img in zip(idx.tolist(), recon_u8):
                Image.fromarray(img).save(png_dir / f"{i:06d}.png")
    if fid is not None:  # every rank's features, on rank 0 (before close removes the parts)
        pool, spatial = writer.gather(POOL), writer.gather(SPATIAL)
    writer.close()

    all_reduce_sum(sums)
    all_reduce_sum(hist)
    count = sums[4].item()
    results = {"num_images": int(count), "psnr": sums[0].item() / count, "ssim": sums[1].item() / count,
               "ssim_true_range": sums[2].item() / count,
               "lpips": sums[3].item() / count if lpips is not None else None,
               "factors": [], "vq_ckpt": str(args.vq_ckpt), "vq_weights": model.loaded_from.weights,
               "model": describe_tokenizer(cfg),
               "image_size": args.image_size, "image_size_eval": size, "npz": str(out)}
    for f, name in enumerate(model.factor_names):
        results["factors"].append({"name": name, **codebook_stats(hist[f])})
    if info.is_main:
        line = f"PSNR: {results['psnr']:f}, SSIM: {results['ssim']:f} "
        print(line)
        extra = ", ".join(f"{f['name']} usage {f['usage']:.4f} perplexity {f['perplexity']:.1f}"
                          for f in results["factors"])
        print(f"SSIM (true data range): {results['ssim_true_range']:f}; "
              f"LPIPS: {'n/a' if results['lpips'] is None else format(results['lpips'], 'f')}; {extra}")
        (Path(args.sample_dir) / f"{args.folder_name}_results.txt").write_text(line + "\n")
        if fid is not None:
            scores = fid.score(pool, spatial)
            results.update(scores._asdict(), fid_reference=args.fid_ref)
            write_result(scores, Path(args.sample_dir) / f"{args.folder_name}.txt",
                         Path(args.sample_dir) / "fid.jsonl", name=args.folder_name, num_samples=n,
                         reference=args.fid_ref, vq_ckpt=str(args.vq_ckpt), inception=fid.net.describe())
        (Path(args.sample_dir) / f"{args.folder_name}.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"Saved {n} reconstructions to {out}")
    cleanup()
    return results
