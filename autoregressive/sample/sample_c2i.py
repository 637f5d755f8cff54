"""Class-conditional sampling from a FAR generator into an FID-ready npz; one implementation behind
``sample_c2i_ddp_dual_code.py`` and ``sample_c2i_ddp_triple_code.py``, and LlamaGen's ``sample_c2i_ddp.py`` (any
generator, FAR or LlamaGen's GPT, its factor count read from the checkpoints; LlamaGen's defaults ``--gpt-model
GPT-B``, ``--image-size 384``). The token grid is the checkpoint's (stored config or training args; else
``--image-size`` / ``--downsample-size``). A GPT, as LlamaGen's sampler, guides only at a ``--cfg-scale`` above 1.

Writes ``<sample-dir>/<name>.npz`` with ``arr_0`` (exactly ``--num-fid-samples`` uint8 images, split across the
ranks) and ``arr_1`` (their class labels), directly (no PNG folder round trip), plus ``<name>.png``, a grid of
the first samples. ``<name>`` follows the original sampler's naming
(``FAR-B-<ckpt>-size-256-size-256-VQ-16-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0``).
Labels are uniform random draws, like the original, or exactly balanced with ``--class-balanced``
(50 per class for 50,000 samples of 1000 classes).

With ``--fid-ref REF.npz`` each rank also runs the torch Inception backend on its decoded images as they come
(``evaluations/inprocess.py``); rank 0 prints the five ADM numbers at the end, exactly as ``evaluator.py --backend
torch`` would on the npz, writes them to ``<name>.txt`` and appends a JSON line to ``<sample-dir>/fid.jsonl``.
``--no-save-npz`` then skips the npz (the PNG grid stays). ``--cfg-scales 1.5,2.0,...`` samples (and scores) every
guidance scale in one process: the scale is data to the compiled step, so compilation and CUDA graphs are paid once.

Image i is sampled from the random stream (``--global-seed``, i) whatever the batch it falls in, so the
samples do not depend on the number of processes or the batch size. On a GPU, generation is compiled with
CUDA graphs by default (``--no-compile`` to opt out), the batch size follows the free memory unless given,
decoding runs at its own batch in bf16 on a second CUDA stream (``--no-decode-stream`` to opt out), and a
writer thread stores finished batches while the GPU goes on (see ``pipeline.py``). ``--attention`` picks the
decode attention kernel (``sdpa``, ``reductions``, ``flex``, ``triton``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from autoregressive.models import MODELS, describe_far
from autoregressive.models.checkpoint import far_from_checkpoint, trained_block_size
from autoregressive.models.decode_attention import ATTENTION_KERNELS
from autoregressive.sample.pipeline import ImageDecoder, auto_batch_size, sample_images
from evaluations.inprocess import POOL, SCORING_ERRORS, SPATIAL, FIDFlags, InProcessFID, write_result
from evaluations.errors import EvaluatorInputError
from tokenizer.models import TokenizerFlags, check_tokenizer_flags, describe_tokenizer, load_tokenizer
from utils.argtypes import (finite_float, nonnegative_int, positive_float, positive_int, positive_unit_float,
                            seed_int)
from utils.checkpoint import load_file, unsafe_load_flag, weight_preference
from utils.data import rank_shard
from utils.distributed import all_gather_objects, cleanup, init_distributed
from utils.flags import (COMPAT_GROUP, compile_flag, exits_on, flag, flag_name, ignored, output_values, parse,
                         precision_flag, require, torch_dtype)
from utils.images import save_grid
from utils.npz import ShardedNpzWriter
from utils.runfiles import FolderInUse, FolderLock, NoSpace, OutputExists, checkpoint_digest


PER_FACTOR = ("cfg_scale", "top_k", "temperature", "top_p")  # the flags that take one value or one per factor


@dataclass(frozen=True)
class SampleConfig(TokenizerFlags, FIDFlags):
    """The sampler's command line. ``output=False`` marks what does not change the images (speed choices, the
    scoring): a rerun that differs only there resumes the images already written."""
    IGNORED = (  # the original sampler's flags that this project does not use
        ignored("--gpt-type", type=str, choices=["c2i"], default="c2i", help="class-conditional is the only type"),
        ignored("--cls-token-num", type=positive_int, default=1, help="the checkpoint decides"),
    )
    # the entry point's factor count (not a flag): what per-factor lists are checked against (None: any generator,
    # its lists checked once the checkpoint is read)
    num_factors: Optional[int] = 2
    gpt_model: str = flag("FAR-B", choices=tuple(MODELS),
                          help="names the output; the checkpoint decides the architecture (this gives the head count "
                               "of a file that does not say it)")
    gpt_ckpt: str = flag("", required=True, help="the generator checkpoint")
    ema: bool = flag(False, help="sample with the generator's EMA weights (default: 'model', as the original sampler)")
    precision: str = precision_flag("bf16", "generator dtype on GPU (CPU runs fp32)")
    compile: Optional[bool] = compile_flag(None, "torch.compile the position step and capture CUDA graphs (default: "
                                                 "on with a GPU)", output=False)
    vq_ema: bool = flag(False, help="decode with the tokenizer's EMA weights (default: 'model', which extraction "
                                    "encodes with)")
    image_size: Optional[int] = flag(None, type=positive_int,
                                     help="checked against --gpt-ckpt (default: its trained grid x the tokenizer's "
                                          "downsampling; for a file that does not say, 256, or 384 for "
                                          "sample_c2i_ddp.py as LlamaGen)")
    image_size_eval: int = flag(256, type=positive_int)
    downsample_size: Optional[int] = flag(None, type=int, choices=(4, 8, 16),
                                          help="checked against --vq-ckpt (default: its downsampling)")
    num_classes: int = flag(1000, type=positive_int)
    cfg_scale: tuple[float, ...] = flag((1.5,), type=positive_float, nargs="+",
                                        help="guidance scale (> 0; 1: unguided): one value, or one per factor (visual "
                                             "first). A LlamaGen GPT, as in LlamaGen, is guided only above 1: a "
                                             "scale below 1 samples it unguided")
    cfg_scales: Optional[str] = flag(None, output=False,
                                     help="a guidance sweep, e.g. 1.5,1.75,2.0: every scale (for all factors) sampled "
                                          "in turn, each its own npz/score, in one process (replaces --cfg-scale)")
    cfg_interval: float = flag(-1.0, type=finite_float)
    sample_dir: str = flag("samples")
    per_proc_batch_size: Optional[int] = flag(None, type=positive_int, output=False,
                                              help="images generated at once per process (default: from free GPU "
                                                   "memory; 32 on CPU)")
    decode_batch_size: Optional[int] = flag(None, type=positive_int, output=False,
                                            help="images decoded at once (default: 128 on GPU, 8 on CPU)")
    decode_precision: str = precision_flag("bf16", "tokenizer decoder autocast dtype on GPU (CPU decodes in fp32)",
                                           output=False)
    channels_last: Optional[bool] = flag(None, action=argparse.BooleanOptionalAction, output=False,
                                         help="decode in NHWC memory layout (default: on with a GPU)")
    compile_decoder: Optional[bool] = compile_flag(None, "torch.compile the decoder (default: as --compile)",
                                                   output=False)
    decode_stream: Optional[bool] = flag(None, action=argparse.BooleanOptionalAction, output=False,
                                         help="decode on a second CUDA stream, overlapping the next batch's "
                                              "generation (default: on with a GPU)")
    attention: str = flag("sdpa", choices=ATTENTION_KERNELS, output=False,
                          help="how each position's single query attends to the KV cache (see "
                               "autoregressive/models/decode_attention.py; a speed choice, like --compile)")
    num_fid_samples: int = flag(50000, type=positive_int)
    global_seed: int = flag(0, type=seed_int)
    top_k: tuple[int, ...] = flag((0,), type=nonnegative_int, nargs="+", help="one value or one per factor (0: off)")
    temperature: tuple[float, ...] = flag((1.0,), type=positive_float, nargs="+", help="one value or one per factor")
    top_p: tuple[float, ...] = flag((1.0,), type=positive_unit_float, nargs="+",
                                    help="in (0, 1]: one value or one per factor (1: off)")
    class_balanced: bool = flag(False, help="the same number of samples for every class")
    grid_samples: int = flag(64, type=nonnegative_int, output=False, help="how many samples the PNG grid shows")
    name: Optional[str] = flag(None, help="output name (default: the original's naming)")
    save_npz: bool = flag(True, action=argparse.BooleanOptionalAction, output=False,
                          help="write the npz (--no-save-npz with --fid-ref: only the scores and the grid)")
    overwrite: bool = flag(False, output=False, help="sample again into an npz that is already finished (else a "
                                                     "finished <sample-dir>/<name>.npz is refused in one line)")
    unsafe_load: bool = unsafe_load_flag()
    from_fsdp: bool = flag(False, group=COMPAT_GROUP, help="names the output after the checkpoint's folder, as the "
                                                           "original; our FSDP checkpoints are full state dicts")

    def __post_init__(self):
        require(self.save_npz or self.fid_ref, "--no-save-npz keeps nothing but the grid without --fid-ref")
        if self.num_factors is not None:
            self.check_per_factor(self.num_factors)
        self.sweep  # a malformed --cfg-scales fails here

    def check_per_factor(self, num_factors: int) -> None:
        """Every per-factor list has one value, or one per factor (a ValueError naming the flag otherwise)."""
        for name in PER_FACTOR:
            values = getattr(self, name)
            require(len(values) in (1, num_factors),
                    f"{flag_name(name)} {' '.join(map(str, values))}: give one value, or one per factor "
                    f"({num_factors})")

    @property
    def sweep(self) -> list[tuple[float, ...]]:
        """The guidance scales to sample, in turn: --cfg-scales (one scale for every factor each), else --cfg-scale."""
        if not self.cfg_scales:
            return [self.cfg_scale]
        try:
            scales = [float(v) for v in self.cfg_scales.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--cfg-scales {self.cfg_scales}: expected comma-separated numbers, e.g. "
                             f"1.5,1.75,2.0") from None
        require(bool(scales), f"--cfg-scales {self.cfg_scales!r}: no scale given")
        require(all(math.isfinite(s) and s > 0 for s in scales),
                f"--cfg-scales {self.cfg_scales}: every scale must be a finite number > 0")
        return [(s,) for s in scales]


# The defaults of LlamaGen's sample_c2i_ddp.py where they differ from the FAR scripts' (``image_size``: the size a
# checkpoint that does not record its grid is sampled at).
LLAMAGEN_DEFAULTS = {"gpt_model": "GPT-B", "image_size": 384}


def parse_config(argv=None, num_factors: Optional[int] = 2, defaults: Optional[dict] = None) -> SampleConfig:
    kind = "FAR or LlamaGen GPT (the checkpoints decide)" if num_factors is None else f"{num_factors}-factor FAR"
    flags = {k: v for k, v in (defaults or {}).items() if k != "image_size"}
    return parse(SampleConfig, argv, f"Sample {kind} images for FID.", defaults=flags, num_factors=num_factors)


def _one_or_list(values):
    return values[0] if len(values) == 1 else list(values)


def output_name(args, vq_model: str) -> str:
    ckpt = Path(args.gpt_ckpt).name.replace(".pth", "").replace(".pt", "")
    if args.from_fsdp:
        ckpt = Path(args.gpt_ckpt).parent.name
    fmt = lambda v: "_".join(map(str, v))  # noqa: E731
    return (f"{args.gpt_model}-{ckpt}-size-{args.image_size}-size-{args.image_size_eval}-{vq_model}-"
            f"topk-{fmt(args.top_k)}-topp-{fmt(args.top_p)}-temperature-{fmt(args.temperature)}-"
            f"cfg-{fmt(args.cfg_scale)}-seed-{args.global_seed}")


def sample_labels(n: int, num_classes: int, seed: int, balanced: bool) -> np.ndarray:
    """All n labels, drawn once from the global seed, so the set does not depend on the world size."""
    rng = np.random.default_rng(seed)
    if balanced:
        return rng.permutation(np.arange(n) % num_classes)
    return rng.integers(0, num_classes, size=n)


def checkpoint_sizes(args: SampleConfig, trained: Optional[int], downsample: int,
                     fallback_size: int = 256) -> SampleConfig:
    """``args`` with --image-size and --downsample-size as the checkpoints decide them: the tokenizer's
    downsampling, and the generator's trained grid (``trained`` positions; None when its file does not say, then
    --image-size, default ``fallback_size``). A flag given with another value is one line (ValueError)."""
    if args.downsample_size not in (None, downsample):
        raise ValueError(f"--downsample-size {args.downsample_size} does not match {args.vq_ckpt} ({downsample})")
    if trained is None:
        size = args.image_size or fallback_size
        require(size % downsample == 0, f"--image-size {size} is not a multiple of {args.vq_ckpt}'s downsampling "
                                        f"{downsample}")
    else:
        grid = math.isqrt(trained)
        require(grid * grid == trained, f"{args.gpt_ckpt} was trained on {trained} positions, not a square grid")
        size = grid * downsample
        require(args.image_size in (None, size),
                f"--image-size {args.image_size} does not fit {args.gpt_ckpt}, trained on {grid}x{grid} tokens, "
                f"which {args.vq_ckpt} ({downsample}x downsampling) decodes to {size}x{size} images: leave "
                f"--image-size out, or give {size}")
    return dataclasses.replace(args, image_size=size, downsample_size=downsample)


@torch.no_grad()  # evaluation only (and leaves grad mode alone for in-process callers)
def main(argv=None, num_factors: Optional[int] = 2, defaults: Optional[dict] = None):
    """The npz path (None with --no-save-npz); a list of them for a --cfg-scales sweep. ``num_factors`` None
    samples any generator (the factor count read from the checkpoints); ``defaults`` replaces flag defaults
    (``LLAMAGEN_DEFAULTS``; ``image_size`` is then the size of a checkpoint that does not record its grid)."""
    defaults = {"image_size": 256, **(defaults or {})}
    with exits_on(ValueError):
        args = parse_config(argv, num_factors, defaults)
    sweep = args.sweep
    info = init_distributed()
    device = info.device
    log = print if info.is_main else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the decoder's convolutions: one shape, tuned once
    dtype = torch_dtype(args.precision) if device.type == "cuda" else torch.float32
    try:
        # the original sampler decodes with the tokenizer's "model" weights, as its codes were extracted with
        tokenizer = load_tokenizer(args.vq_ckpt, expect_factors=num_factors, prefer=weight_preference(args.vq_ema))
        check_tokenizer_flags(args, tokenizer)
        gpt = load_file(args.gpt_ckpt)
        args = checkpoint_sizes(args, trained_block_size(gpt), tokenizer.config.downsample, defaults["image_size"])
        grid = args.image_size // args.downsample_size
        far = far_from_checkpoint(gpt, args.gpt_ckpt, expect_factors=tokenizer.config.num_factors,
                                  prefer=weight_preference(args.ema), gpt_model=args.gpt_model, block_size=grid * grid)
        del gpt
        args.check_per_factor(far.config.num_factors)
    except ValueError as e:  # CheckpointError included
        sys.exit(f"error: {e}")
    if far.config.is_gpt:
        sweep = unguided_below_one(sweep, log)
    if far.config.vocab_size != tokenizer.config.codebook_size:
        sys.exit(f"error: {args.gpt_ckpt} generates codes of a {far.config.vocab_size}-entry codebook, but "
                 f"{args.vq_ckpt} has {tokenizer.config.codebook_size} entries")
    if args.num_classes != far.config.num_classes:
        sys.exit(f"error: --num-classes {args.num_classes} does not match {args.gpt_ckpt} "
                 f"({far.config.num_classes} classes)")
    tokenizer = tokenizer.to(device)
    far = far.to(device=device, dtype=dtype)
    log(f"Generator: {describe_far(far.config)} from {far.loaded_from}; "
        f"tokenizer: {describe_tokenizer(tokenizer.config)} from {tokenizer.loaded_from}")

    n = args.num_fid_samples
    labels = sample_labels(n, args.num_classes, args.global_seed, args.class_balanced)
    size = args.image_size_eval
    cuda = device.type == "cuda"
    compile = cuda if args.compile is None else args.compile
    decode_dtype = torch_dtype(args.decode_precision) if cuda else torch.float32
    decode_batch = args.decode_batch_size or (128 if cuda else 8)
    mine = rank_shard(n, info.rank, info.world_size)
    fid = None
    if args.fid_ref:  # before any sampling (a wrong reference fails now, not after hours) and the batch size
        try:
            fid = InProcessFID(args.fid_ref, args.inception_graph, device, size, n, args.fid_batch_size)
        except EvaluatorInputError as e:
            sys.exit(f"error: {e}")
        log(f"--fid-ref: {fid.describe()}")
    batch = args.per_proc_batch_size
    if batch is None:
        choice = auto_batch_size(far.config, any(s != 1.0 for scales in sweep for s in scales), dtype, device,
                                 -(-n // info.world_size), decode_batch, args.image_size)
        batch = choice.batch
        log(f"--per-proc-batch-size {batch} ({choice.reason})")
    decode_batch = min(decode_batch, batch)  # a batch never needs more
    decoder = ImageDecoder(tokenizer, grid, size, decode_batch, decode_dtype,
                           channels_last=cuda if args.channels_last is None else args.channels_last,
                           compile=compile if args.compile_decoder is None else args.compile_decoder,
                           stream=torch.cuda.Stream(device) if cuda and args.decode_stream is not False else None)
    outs, rows = [], []
    for scales in sweep:  # one model, decoder and compiled step for every scale: the scale is data
        out, result = _sample_one(dataclasses.replace(args, cfg_scale=scales), info, far, tokenizer, decoder, fid,
                                  labels, mine, batch, compile)
        outs.append(out)
        if result is not None:
            rows.append((_one_or_list(scales), result))
    if len(rows) > 1:
        log(f"{'cfg':>10} {'IS':>10} {'FID':>10} {'sFID':>10} {'Prec':>8} {'Rec':>8}")
        for scale, r in rows:
            log(f"{str(scale):>10} {r.inception_score:10.4f} {r.fid:10.4f} {r.sfid:10.4f} "
                f"{r.precision:8.4f} {r.recall:8.4f}")
    cleanup()
    return outs[0] if len(outs) == 1 else outs


def unguided_below_one(sweep: list[tuple[float, ...]], log) -> list[tuple[float, ...]]:
    """LlamaGen guides its GPT only at a scale above 1 (below, its sampler takes the conditional logits alone);
    a GPT sampled here does the same, so a LlamaGen command line samples the same model."""
    out = []
    for scales in sweep:
        if any(s < 1 for s in scales):
            log(f"--cfg-scale {_one_or_list(scales)}: a LlamaGen GPT is guided only above 1, as in LlamaGen; "
                f"sampling it unguided (scale 1)")
        out.append(tuple(max(s, 1.0) for s in scales))
    return out


def _finish(writer: ShardedNpzWriter):
    try:
        return writer.close()
    except NoSpace as e:
        sys.exit(f"error: {e}")


def _sample_one(args, info, far, tokenizer, decoder, fid: InProcessFID | None, labels: np.ndarray,
                mine: np.ndarray, batch: int, compile: bool):
    """Sample (and score) the images of ``args.cfg_scale``: (the npz path or None, the EvalResult or None)."""
    log = print if info.is_main else (lambda *a, **k: None)
    n, size = args.num_fid_samples, args.image_size_eval
    name = args.name or output_name(args, args.vq_model or f"VQ-{tokenizer.config.downsample}")
    if args.name and args.cfg_scales:
        name = f"{args.name}-cfg-{'_'.join(map(str, args.cfg_scale))}"
    out = Path(args.sample_dir) / f"{name}.npz"
    # What the images depend on: a killed run rerun with the same command continues where each rank stopped.
    fingerprint = {**output_values(args), "world_size": info.world_size}
    # keyed by the checkpoints' content: one replaced at the same path starts afresh (a moved one resumes)
    fingerprint.update(gpt_ckpt=checkpoint_digest(args.gpt_ckpt), vq_ckpt=checkpoint_digest(args.vq_ckpt))
    try:  # one sampling run per output: rank 0 holds <sample-dir>/.<name>.npz.lock until it ends
        lock = FolderLock(out.parent, "sample output", f".{out.name}.lock") if info.is_main else None
        error = None
    except FolderInUse as e:
        error = str(e)
    error = all_gather_objects(error)[0]
    if error:
        sys.exit(f"error: {error}")

    def stop(message: str):  # one line, and the output looks as it did (no lock file left behind)
        if lock is not None:
            lock.release(remove=True)
        sys.exit(f"error: {message}")

    arrays = {"arr_0": ((n, size, size, 3), np.uint8), "arr_1": ((n,), np.int64)} if args.save_npz else {}
    if fid is not None:
        arrays.update(fid.arrays(n))
        fingerprint["inception_graph_sha256"] = fid.graph_sha
    try:
        writer = ShardedNpzWriter(out, arrays, fingerprint, members=["arr_0", "arr_1"] if args.save_npz else [],
                                  rows=len(mine), overwrite=args.overwrite)
    except (NoSpace, OutputExists) as e:
        stop(str(e))
    if writer.done:
        print(f"rank {info.rank}: resuming after {writer.done} of its {len(mine)} images, already written")
    todo = mine[writer.done:]
    kw = dict(cfg_scale=_one_or_list(args.cfg_scale), cfg_interval=args.cfg_interval,
              temperature=_one_or_list(args.temperature), top_k=_one_or_list(args.top_k),
              top_p=_one_or_list(args.top_p), compile=compile, attention=args.attention)
    grid_images = []

    def write(rows, images, payload):  # runs in the writer thread
        batch_labels, feats = payload if fid is not None else (payload, None)
        if args.save_npz:
            writer.write("arr_0", rows, images)
            writer.write("arr_1", rows, batch_labels)
        if feats is not None:
            writer.write(POOL, rows, feats[0].cpu().numpy())
            writer.write(SPATIAL, rows, feats[1].cpu().numpy())
        writer.mark_done(len(rows))
        if info.is_main and sum(len(g) for g in grid_images) < args.grid_samples:
            grid_images.append(torch.from_numpy(images.copy()))

    start = time.perf_counter()
    progress = lambda it: tqdm(it, disable=not info.is_main, desc=name[:40])  # noqa: E731
    sample_images(far, decoder, labels, todo, batch, args.global_seed, write, progress, features=fid, **kw)
    seconds = time.perf_counter() - start
    log(f"Rank 0 generated, decoded{', scored' if fid else ''} and wrote {len(todo)} images in {seconds:.1f} s "
        f"({len(todo) / max(seconds, 1e-9):.1f} images/s, compile {'on' if compile else 'off'})")
    result = None
    features = (writer.gather(POOL), writer.gather(SPATIAL)) if fid is not None else None
    # The npz is finished and in place before anything is scored; with --no-save-npz the features stay in the parts
    # until they are scored, so a rerun after a failed score scores them again at once.
    saved = _finish(writer) if args.save_npz else None
    if fid is not None and info.is_main:
        kept = (f"the {n} samples are kept in {out}: score them with evaluations/evaluator.py" if args.save_npz
                else f"their features are kept in {writer.parts}: rerun the same command to score them")
        try:
            result = fid.score(*features)
        except SCORING_ERRORS as e:
            stop(f"{e} ({kept})")
        write_result(result, out.with_suffix(".txt"), Path(args.sample_dir) / "fid.jsonl", name=name,
                     cfg_scale=_one_or_list(args.cfg_scale), num_samples=n, reference=args.fid_ref,
                     gpt_ckpt=args.gpt_ckpt, vq_ckpt=args.vq_ckpt, inception=fid.net.describe())
    if not args.save_npz:
        _finish(writer)
    if lock is not None:
        lock.release(remove=True)
    if info.is_main:
        if saved:
            print(f"Saved {n} samples to {out} (arr_0 images, arr_1 labels)")
        if grid_images and args.grid_samples > 0:
            shown = torch.cat(grid_images)[:args.grid_samples].permute(0, 3, 1, 2).float() / 127.5 - 1
            save_grid(shown, out.with_suffix(".png"), nrow=int(np.ceil(np.sqrt(len(shown)))))
            print(f"Grid of the first {len(shown)} samples: {out.with_suffix('.png')}")
    return saved, result
