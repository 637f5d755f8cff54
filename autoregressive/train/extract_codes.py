"""Encode an ImageFolder into a code store for generator training; one implementation behind
``extract_codes_c2i_dual_code.py`` and ``extract_codes_c2i_triple_code.py`` and LlamaGen's
``extract_codes_c2i.py`` (any tokenizer, the factor count read from the checkpoint).

Each image is stored as several augmented views: with ``--ten-crop`` the ADM centre crop to
``image_size * crop_range`` followed by the ten ``image_size`` crops (four corners and centre, and their mirror
images); otherwise the centre crop and its mirror image. Training picks one view per image per epoch.
Unreadable images are skipped (stored with label -1, which the loader leaves out) and counted.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torchvision.transforms.functional as TF
from tqdm import tqdm

from autoregressive.data.code_store import CodeStoreError, CodeStoreWriter, finished_store
from tokenizer.models import TokenizerFlags, check_tokenizer_flags, describe_tokenizer, load_tokenizer
from utils.argtypes import nonnegative_int, positive_float, positive_int, seed_int
from utils.checkpoint import CheckpointError, unsafe_load_flag, weight_preference
from utils.data import center_crop_arr, eval_batches, image_dataset, rank_shard, to_model_range
from utils.distributed import all_gather_objects, all_reduce_sum, cleanup, init_distributed
from utils.flags import flag, ignored, output_values, parse
from utils.runfiles import FolderInUse, FolderLock, NoSpace, checkpoint_digest


@dataclass(frozen=True)
class ExtractConfig(TokenizerFlags):
    """The command line of code extraction. ``output=False`` marks what does not change the codes: a rerun that
    differs only there resumes the codes already written."""
    IGNORED = (  # the original extraction's flags that do nothing here
        ignored("--dataset", type=str, default="imagenet", help="--data-path is read as an ImageFolder or tar shards"),
        ignored("--debug", action="store_true"),
    )
    data_path: str = flag("", required=True, help="ImageFolder root of the images to encode, or tar shards")
    code_path: str = flag("", required=True, output=False, help="the code store to write")
    ema: bool = flag(False, help="encode with the tokenizer's EMA weights (default: 'model', as the original "
                                 "extraction)")
    image_size: int = flag(256, type=positive_int)
    ten_crop: bool = flag(False, help="store ten crops per image (else centre crop + flip)")
    crop_range: float = flag(1.1, type=positive_float, help="centre crop to image_size * crop_range first")
    global_seed: int = flag(0, type=seed_int, output=False, help="(nothing is random: the views are fixed crops)")
    num_workers: int = flag(4, type=nonnegative_int, output=False)
    batch_size: int = flag(16, type=positive_int, output=False,
                           help="images per forward pass (each with all its views)")
    num_images: int = flag(0, type=nonnegative_int, help="only the first N images (0: all)")
    overwrite: bool = flag(False, output=False, help="replace a finished code store at --code-path (else a store "
                                                     "of other settings is refused, and one of these is reported "
                                                     "finished)")
    unsafe_load: bool = unsafe_load_flag()


def parse_config(argv=None, num_factors: Optional[int] = 2) -> ExtractConfig:
    codes = "tokenizer codes (any factor count: the checkpoint decides)" if num_factors is None else \
        f"{num_factors}-factor tokenizer codes"
    return parse(ExtractConfig, argv, f"Extract {codes} for generator training.")


def views_transform(image_size: int, ten_crop: bool, crop_range: float):
    """PIL image -> (views, 3, S, S) in [-1, 1]."""
    def f(img, rng=None) -> torch.Tensor:
        if ten_crop:
            big = center_crop_arr(img, int(image_size * crop_range))
            crops = TF.ten_crop(big, [image_size, image_size])
        else:
            c = center_crop_arr(img, image_size)
            crops = (c, TF.hflip(c))
        return torch.stack([to_model_range(c) for c in crops])
    return f


def _codes_key(fingerprint: dict) -> dict:
    """What the stored codes depend on, in JSON form (as a manifest holds it): not how many processes wrote them."""
    return json.loads(json.dumps({k: v for k, v in fingerprint.items() if k != "world_size"}))


def finished_or_error(cfg: ExtractConfig, fingerprint: dict) -> Optional[tuple[str, str]]:
    """Rank 0, before anything is written: ("finished", line) when --code-path already holds the codes these
    settings give, ("error", line) when it holds a finished store of other settings (or an unreadable manifest)
    and --overwrite was not given; None to extract."""
    try:
        store = finished_store(cfg.code_path)
    except CodeStoreError as e:
        return None if cfg.overwrite else ("error", f"{e}; pass --overwrite to replace it")
    if store is None or cfg.overwrite:
        return None
    had, want = _codes_key(store.extra.get("fingerprint") or {}), _codes_key(fingerprint)
    changed = sorted(k for k in set(had) | set(want) if had.get(k) != want.get(k))
    if not changed:
        return "finished", (f"--code-path {cfg.code_path} is a finished code store of these images with this "
                            f"tokenizer ({store.num_items} images x {store.num_augs} views): nothing to do "
                            f"(--overwrite extracts them again)")
    return "error", (f"--code-path {cfg.code_path} holds a finished code store made with other settings (they "
                     f"differ in: {', '.join(changed)}); pass --overwrite to replace it, or choose another "
                     f"--code-path")


@torch.no_grad()  # evaluation only (and leaves grad mode alone for in-process callers)
def main(argv=None, num_factors: Optional[int] = 2) -> None:
    """Extract; ``num_factors`` None takes any tokenizer, the factor count read from ``--vq-ckpt``."""
    cfg = parse_config(argv, num_factors)
    info = init_distributed()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log = print if info.is_main else (lambda *a, **k: None)
    try:
        # The original extraction reads the "model" weights (not "ema"); so do we, for identical codes.
        model = load_tokenizer(cfg.vq_ckpt, expect_factors=num_factors, prefer=weight_preference(cfg.ema))
        check_tokenizer_flags(cfg, model)
        dataset = image_dataset(cfg.data_path, views_transform(cfg.image_size, cfg.ten_crop, cfg.crop_range),
                                cfg.image_size)
        # One extraction per code store: rank 0 holds its lock until the process ends.
        lock = FolderLock(cfg.code_path, "code store") if info.is_main else None
        error = None
    except (CheckpointError, FileNotFoundError, FolderInUse) as e:
        error = str(e)
    error = next((e for e in all_gather_objects(error) if e), None)  # every rank stops with the same line
    if error:
        sys.exit(f"error: {error}")
    vq_digest = checkpoint_digest(cfg.vq_ckpt)  # progress is keyed by the checkpoint's content, not its path
    model = model.to(info.device)
    num_factors = model.config.num_factors
    log(f"Extracting codes with {describe_tokenizer(model.config)} from {model.loaded_from}")
    n = min(len(dataset), cfg.num_images) if cfg.num_images else len(dataset)
    shard = rank_shard(n, info.rank, info.world_size)
    num_views = 10 if cfg.ten_crop else 2
    grid = (cfg.image_size // model.config.downsample,) * 2
    # What the codes depend on: a killed extraction rerun with the same command continues where it stopped.
    fingerprint = {**output_values(cfg), "vq_ckpt": vq_digest, "vq_weights": model.loaded_from.weights,
                   "images": n, "world_size": info.world_size}

    def stop(error: Optional[str] = None) -> None:  # every rank alike; the store looks as it did (no lock file)
        if lock is not None:
            lock.release(remove=True)
        if error:
            sys.exit(f"error: {error}")
        cleanup()

    found = all_gather_objects(finished_or_error(cfg, fingerprint) if info.is_main else None)[0]
    if found is not None:
        kind, line = found
        if kind == "error":
            stop(line)
        log(line)
        stop()
        return
    try:
        writer = CodeStoreWriter(cfg.code_path, len(shard), num_views, model.factor_names, grid,
                                 model.config.codebook_size, fingerprint)
    except NoSpace as e:
        sys.exit(f"error: {e}")
    if writer.filled:
        print(f"rank {info.rank}: resuming an interrupted extraction after {writer.filled} of {len(shard)} images")
    todo = shard[writer.filled:]
    batches = eval_batches(dataset, todo, cfg.batch_size, cfg.num_workers, allow_bad=True)
    skipped = torch.tensor([writer.state.get("skipped", 0)], dtype=torch.long)
    for x, y, _, bad in tqdm(batches, total=-(-len(todo) // cfg.batch_size), disable=not info.is_main,
                             desc="codes"):
        b = len(x)
        skipped += int(bad.sum())
        y = torch.where(bad, torch.full_like(y, -1), y)
        x = x.to(info.device).flatten(0, 1)  # (b * views, 3, S, S)
        codes = model.encode_indices(x, batch_size=len(x))  # (b * views, F, h, w)
        writer.write(codes.reshape(b, num_views, num_factors, -1).cpu().numpy(), y.numpy(),
                     {"skipped": int(skipped)})
    all_reduce_sum(skipped)
    if int(skipped.item()) == n:  # nothing to train on: not a finished store
        stop(f"none of the {n} images under --data-path {cfg.data_path} could be read; no code store was written")
    writer.close(num_classes=len(dataset.classes), extra={
        "vq_ckpt": str(cfg.vq_ckpt), "vq_ckpt_sha256": vq_digest, "vq_weights": model.loaded_from.weights,
        "tokenizer": describe_tokenizer(model.config),
        "image_size": cfg.image_size, "ten_crop": cfg.ten_crop, "crop_range": cfg.crop_range,
        "data_path": str(cfg.data_path), "skipped": int(skipped.item()), "classes": dataset.classes})
    if skipped.item():
        log(f"Skipped {int(skipped.item())} unreadable images")
    log(f"Saved codes of {n - int(skipped.item())} images x {num_views} views to {cfg.code_path}")
    stop()  # the finished store holds nothing but its files
