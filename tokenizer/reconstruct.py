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

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from evaluations.inprocess import POOL, SCORING_ERRORS, SPATIAL, FIDFlags, InProcessFID, write_result
from evaluations.errors import EvaluatorInputError
from tokenizer.factor_metrics import codebook_stats
from tokenizer.models import TokenizerFlags, check_tokenizer_flags, describe_tokenizer, load_tokenizer
from utils.argtypes import nonnegative_int, positive_int, seed_int
from utils.checkpoint import CheckpointError, unsafe_load_flag
from utils.data import UnreadableImage, eval_batches, eval_transform, image_dataset, rank_shard
from utils.distributed import all_reduce_sum, cleanup, init_distributed
from utils.factors import preset_name
from utils.flags import exits_on, flag, ignored, parse
from utils.images import to_uint8
from utils.npz import ShardedNpzWriter
from utils.runfiles import NoSpace, OutputExists


@dataclass(frozen=True)
class ReconstructConfig(TokenizerFlags, FIDFlags):
    """The command line of reconstruction evaluation."""
    IGNORED = (  # the original evaluation scripts' flags that do nothing here: the checkpoint decides the model
        ignored("--dataset", type=str, default="imagenet", help="--data-path is read as an ImageFolder or tar shards"),
        ignored("--with_clip_supervision", action="store_true", help="the checkpoint decides whether heads exist"),
        ignored("--with_disentanglement", action="store_true", help="a training flag"),
        ignored("--disentanglement-ratio", type=float, default=0.1, help="a training flag"),
        ignored("--semantic-weight", type=float, default=0.5, help="a training flag"),
    )
    data_path: str = flag("", required=True, help="ImageFolder root of the evaluation images, or tar shards")
    image_size: int = flag(256, type=positive_int)
    image_size_eval: Optional[int] = flag(None, type=positive_int, help="resize both images to this for metrics")
    sample_dir: str = flag("reconstructions")
    folder_name: str = flag("default_recon", help="names the outputs: <sample-dir>/<folder-name>.npz ...")
    per_proc_batch_size: int = flag(32, type=positive_int)
    global_seed: int = flag(0, type=seed_int, help="(nothing is random)")
    num_workers: int = flag(4, type=nonnegative_int)
    num_images: int = flag(0, type=nonnegative_int, help="evaluate only the first N images (0: all)")
    save_png: bool = flag(False, help="also write <sample-dir>/<folder-name>/NNNNNN.png")
    vgg_path: Optional[str] = flag(None, help="VGG16 ImageNet weights for LPIPS (optional)")
    no_tf32: bool = flag(False, help="full fp32 matmuls on GPU (TF32 is on by default)")
    overwrite: bool = flag(False, help="write over a finished <sample-dir>/<folder-name>.npz (else refused)")
    unsafe_load: bool = unsafe_load_flag()


def parse_config(argv=None, num_factors: Optional[int] = 2) -> ReconstructConfig:
    kind = "a tokenizer (FQGAN's or LlamaGen's: the checkpoint decides)" if num_factors is None else \
        f"an FQGAN-{preset_name(num_factors)} tokenizer"
    return parse(ReconstructConfig, argv, f"Reconstruction evaluation of {kind}.")


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


def main(argv=None, num_factors: Optional[int] = 2) -> dict:
    """Evaluate; ``num_factors`` None takes any tokenizer, the factor count read from ``--vq-ckpt``."""
    cfg = parse_config(argv, num_factors)
    with exits_on(UnreadableImage):
        return evaluate(cfg, num_factors)


@torch.no_grad()  # evaluation only (and leaves grad mode alone for in-process callers)
def evaluate(cfg: ReconstructConfig, num_factors: Optional[int]) -> dict:
    """Reconstruct every image of ``--data-path``, write the npz, and compute and write the metrics."""
    info = init_distributed()
    if not cfg.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = print if info.is_main else (lambda *a, **k: None)
    try:
        model = load_tokenizer(cfg.vq_ckpt, expect_factors=num_factors)
        check_tokenizer_flags(cfg, model)
        dataset = image_dataset(cfg.data_path, eval_transform(cfg.image_size), cfg.image_size)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    model = model.to(info.device)
    tok = model.config
    num_factors = tok.num_factors
    log(f"Loaded {describe_tokenizer(tok)} from {model.loaded_from}")
    lpips = _lpips_or_none(cfg.vgg_path, info.device, log)

    n = min(len(dataset), cfg.num_images) if cfg.num_images else len(dataset)
    size = cfg.image_size_eval or cfg.image_size
    out = Path(cfg.sample_dir) / f"{cfg.folder_name}.npz"
    fid = None
    if cfg.fid_ref:
        try:  # before any image: a wrong reference fails now
            fid = InProcessFID(cfg.fid_ref, cfg.inception_graph, info.device, size, n, cfg.fid_batch_size)
        except EvaluatorInputError as e:
            sys.exit(f"error: {e}")
        log(f"--fid-ref: {fid.describe()}")
    try:
        writer = ShardedNpzWriter(out, {"arr_0": ((n, size, size, 3), np.uint8), **(fid.arrays(n) if fid else {})},
                                  members=["arr_0"], overwrite=cfg.overwrite)
    except (NoSpace, OutputExists) as e:
        sys.exit(f"error: {e}")
    png_dir = Path(cfg.sample_dir) / cfg.folder_name
    if cfg.save_png:
        png_dir.mkdir(parents=True, exist_ok=True)

    sums = torch.zeros(5, dtype=torch.float64)  # psnr, ssim, ssim_true, lpips, count
    hist = torch.zeros(num_factors, tok.codebook_size, dtype=torch.float64)
    shard = rank_shard(n, info.rank, info.world_size)
    batches = eval_batches(dataset, shard, cfg.per_proc_batch_size, cfg.num_workers)
    total = -(-len(shard) // cfg.per_proc_batch_size)
    for x, _, idx, _ in tqdm(batches, total=total, disable=not info.is_main, desc=cfg.folder_name):
        x = x.to(info.device, non_blocking=True)
        indices = model.encode_indices(x, batch_size=len(x))
        recon = model.decode_indices(indices, batch_size=len(x))
        for f in range(num_factors):
            hist[f] += torch.bincount(indices[:, f].flatten().cpu(), minlength=tok.codebook_size).double()
        if size != cfg.image_size:
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
        if cfg.save_png:
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
               "factors": [], "vq_ckpt": str(cfg.vq_ckpt), "vq_weights": model.loaded_from.weights,
               "model": describe_tokenizer(tok),
               "image_size": cfg.image_size, "image_size_eval": size, "npz": str(out)}
    for f, name in enumerate(model.factor_names):
        results["factors"].append({"name": name, **codebook_stats(hist[f])})
    if info.is_main:
        line = f"PSNR: {results['psnr']:f}, SSIM: {results['ssim']:f} "
        print(line)
        extra = ", ".join(f"{f['name']} usage {f['usage']:.4f} perplexity {f['perplexity']:.1f}"
                          for f in results["factors"])
        print(f"SSIM (true data range): {results['ssim_true_range']:f}; "
              f"LPIPS: {'n/a' if results['lpips'] is None else format(results['lpips'], 'f')}; {extra}")
        (Path(cfg.sample_dir) / f"{cfg.folder_name}_results.txt").write_text(line + "\n")
        if fid is not None:
            try:
                scores = fid.score(pool, spatial)
            except SCORING_ERRORS as e:
                sys.exit(f"error: {e} (the reconstructions are kept in {out}: score them with "
                         f"evaluations/evaluator.py)")
            results.update(scores._asdict(), fid_reference=cfg.fid_ref)
            write_result(scores, Path(cfg.sample_dir) / f"{cfg.folder_name}.txt",
                         Path(cfg.sample_dir) / "fid.jsonl", name=cfg.folder_name, num_samples=n,
                         reference=cfg.fid_ref, vq_ckpt=str(cfg.vq_ckpt), inception=fid.net.describe())
        (Path(cfg.sample_dir) / f"{cfg.folder_name}.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"Saved {n} reconstructions to {out}")
    cleanup()
    return results
