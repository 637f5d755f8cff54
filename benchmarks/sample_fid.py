"""Speed of the whole FID sampling pipeline per image: generation + decoding + uint8 + writing the npz, with
random weights (speed does not depend on them); prints ONE JSON line.

    python benchmarks/sample_fid.py --gpt-model FAR-B --factors 2 --batch-size 1024 --num-images 3072
    python benchmarks/sample_fid.py --gpt-model FAR-B --factors 2 --attention flex   # a decode kernel
    python benchmarks/sample_fid.py --gpt-model FAR-B --factors 2 --no-compile        # eager, same batch rule
    python benchmarks/sample_fid.py --gpt-model FAR-T --device cpu --batch-size 4 --num-images 8

It runs the sampler's own pipeline (autoregressive/sample/pipeline.py: the same generate call, decoder, decode
stream and writer thread) over --num-images images, after an untimed set-up, reported in parts:

* ``setup_compile_s``: compiling the position step (one compilation serves every position; a second process
  on the same machine finds inductor's cache and pays only the tracing: run it twice for cold and warm);
* ``capture_s``: capturing the CUDA graphs (one per sampling plan);
* ``warmup_s``: the rest of one warm-up batch through the pipeline (the graphs' warm-up step, the decoder's
  compilation and first run, allocations); ``setup_s`` is the sum.

``images_per_s`` is the steady rate, and ``minutes_for_50k`` = 50,000 images at that rate on one device
(``minutes_for_50k_with_setup`` adds the set-up once). ``ms_per_position`` times single position steps at a few
attention lengths (``--positions``; CUDA events on a GPU, the captured graph itself when there is one). With
--stages (default), one batch of generation alone and of decoding alone are also timed.

    python benchmarks/sample_fid.py --decode-variants      # the decoder alone: fp32, bf16, +channels_last,
                                                           # +torch.compile, at --decode-batch-size
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoregressive.models import FAR, FAR_models, far_config, generate
from autoregressive.models.decode_attention import ATTENTION_KERNELS
from autoregressive.models.generate import (SamplingPlan, _runners, compiled_next_position, next_position,
                                            row_keys)
from autoregressive.sample.pipeline import ImageDecoder, auto_batch_size, sample_images
from benchmarks.timing import peak_memory_gb, sync
from tokenizer.models import FactorConfig, FactorizedTokenizer, tokenizer_config
from utils.factors import PRESET_FACTORS, factor_count, preset_name
from utils.flags import add_compile_argument, add_precision_argument, torch_dtype
from utils.npz import ShardedNpzWriter



def note(message: str) -> None:
    """Progress on stderr: what a timed-out run still tells (the GPU suite prints the tail)."""
    print(f"[sample_fid] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt-model", default="FAR-B", choices=sorted(FAR_models))
    p.add_argument("--factors", default="2", help="factor count or preset (dual, triple)")
    p.add_argument("--vq-model", default="VQ-16", choices=["VQ-16", "VQ-8"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images generated at once (default: from free GPU memory, as the sampler; 4 on CPU)")
    p.add_argument("--num-images", type=int, default=None, help="timed images (default: --num-batches batches)")
    p.add_argument("--num-batches", type=int, default=2, help="timed batches when --num-images is not given")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--attention", default="sdpa", choices=ATTENTION_KERNELS,
                   help="how a decoding query attends (see autoregressive/models/decode_attention.py)")
    add_compile_argument(p, None, "compiled position step + CUDA graphs (default: on with CUDA)")
    add_precision_argument(p, "--dtype", None, "generator precision (default: bf16 on CUDA)")
    p.add_argument("--decode-batch-size", type=int, default=None, help="default: 128 on CUDA, 4 on CPU")
    add_precision_argument(p, "--decode-dtype", None, "decoder precision (default: bf16 on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC decoder (default: on with CUDA)")
    add_compile_argument(p, None, "torch.compile the decoder (default: as --compile)", "--compile-decoder")
    p.add_argument("--decode-stream", choices=["off", "on", "both"], default="on",
                   help="decode on a second CUDA stream, overlapping the next batch's generation (the sampler's "
                        "default); 'both' times the pipeline without, then with it (images_per_s_decode_stream)")
    p.add_argument("--positions", default="1,64,128,255",
                   help="positions whose single step is timed (ms_per_position; attention length = position + 1)")
    p.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one batch of generation alone and of decoding alone")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where the npz goes (default: a temporary folder, removed)")
    p.add_argument("--decode-variants", action="store_true",
                   help="only time the decoder: fp32, bf16, bf16 + channels_last, and that compiled")
    p.add_argument("--iters", type=int, default=3, help="timed decoder calls per variant (--decode-variants)")
    return p.parse_args(argv)


@dataclass
class Settings:
    """What the flags resolve to on this device."""
    device: torch.device
    compile: bool
    dtype: torch.dtype
    decode_dtype: torch.dtype
    decode_batch: int
    channels_last: bool
    compile_decoder: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve(args) -> Settings:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    compile = cuda if args.compile is None else args.compile
    return Settings(device, compile, torch_dtype(args.dtype or ("bf16" if cuda else "fp32")),
                    torch_dtype(args.decode_dtype or ("bf16" if cuda else "fp32")),
                    args.decode_batch_size or (128 if cuda else 4),
                    cuda if args.channels_last is None else args.channels_last,
                    compile if args.compile_decoder is None else args.compile_decoder)


def benchmark_tokenizer(num_factors: int, vq_model: str) -> FactorizedTokenizer:
    """The paper's preset for its factor counts (dual, triple); any other count: a visual factor and
    semantic ones without feature heads (decoding speed depends on the count, not on the heads)."""
    name = preset_name(num_factors)
    if name in PRESET_FACTORS:
        return FactorizedTokenizer(name, vq_model=vq_model)
    factors = (FactorConfig("vis"),) + tuple(FactorConfig(f"sem{i}") for i in range(1, num_factors))
    return FactorizedTokenizer(tokenizer_config("dual", vq_model, factors=factors))


def build_generator(args, tok: FactorizedTokenizer, s: Settings) -> FAR:
    factors = tok.config.num_factors
    grid = args.image_size // tok.config.downsample
    cfg = far_config(args.gpt_model, factors, vocab_size=tok.config.codebook_size, block_size=grid * grid)
    with torch.device(s.device):
        far = FAR(cfg)
    for f in range(factors):  # the init zeroes the output layers; random ones give non-trivial sampling
        torch.nn.init.normal_(far.output_layer(f).weight, std=cfg.initializer_range)
    return far.to(s.dtype).eval()


class NpzSink:
    """The pipeline's ``write``: images (and labels, when the npz has them) into a sharded npz, rows shifted
    by ``offset``."""

    def __init__(self, path: Path, n: int, size: int, labels: bool = True, offset: int = 0):
        arrays = {"arr_0": ((n, size, size, 3), np.uint8)}
        if labels:
            arrays["arr_1"] = ((n,), np.int64)
        self.writer, self.offset, self.labels = ShardedNpzWriter(path, arrays, overwrite=True), offset, labels

    def __call__(self, rows, images, batch_labels) -> None:
        self.writer.write("arr_0", rows - self.offset, images)
        if self.labels:
            self.writer.write("arr_1", rows - self.offset, batch_labels)


def measure_setup(far: FAR, decoder: ImageDecoder, labels: np.ndarray, batch: int, n: int, args, s: Settings,
                  tmp: Path, kw: dict) -> dict:
    """Compile the position step, then one warm-up batch through the pipeline (CUDA graphs captured on the
    way); the parts of the set-up in seconds."""
    t0 = time.perf_counter()
    if s.compile:  # one position, no graphs: the compilation alone (it serves every position)
        y = torch.from_numpy(labels[:batch]).to(s.device)
        generate(far, y, 1, seed=args.seed, **dict(kw, cuda_graphs=False))
        sync(s.device)
    compile_s = time.perf_counter() - t0
    note(f"compile {compile_s:.1f} s")
    t0 = time.perf_counter()
    sink = NpzSink(tmp / "warmup.npz", batch, args.image_size, labels=False, offset=n)
    sample_images(far, decoder, labels, np.arange(n, n + batch), batch, args.seed, sink, **kw)
    sync(s.device)
    warm_s = time.perf_counter() - t0
    runner = _runners.get(far)
    capture_s = runner[1].timings["capture_s"] if runner is not None else 0.0
    note(f"warm-up batch {warm_s:.1f} s (capture {capture_s:.1f} s)")
    return {"setup_s": round(compile_s + warm_s, 1), "setup_compile_s": round(compile_s, 1),
            "warmup_s": round(warm_s - capture_s, 1), "capture_s": round(capture_s, 2)}


def timed_run(far: FAR, decoder: ImageDecoder, labels: np.ndarray, batch: int, n: int, args, s: Settings,
              path: Path, kw: dict) -> tuple[float, float]:
    """Seconds of the pipeline over n images, and of closing the npz (removed afterwards)."""
    sink = NpzSink(path, n, args.image_size)
    t0 = time.perf_counter()
    sample_images(far, decoder, labels, np.arange(n), batch, args.seed, sink, **kw)
    sync(s.device)
    run_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sink.writer.close()
    close_s = time.perf_counter() - t0
    path.unlink()  # keep the disk use to one npz
    return run_s, close_s


def step_inputs(far: FAR, labels: np.ndarray, batch: int, args, s: Settings) -> tuple:
    """What ``next_position`` takes, built as ``generate`` builds it (for timing single steps without graphs)."""
    cfg = far.config
    y = torch.from_numpy(labels[:batch]).to(s.device)
    guided = args.cfg_scale != 1.0
    cond = torch.cat([y, torch.full_like(y, cfg.num_classes)]) if guided else y
    Fn = cfg.num_factors
    plan = SamplingPlan((guided,) * Fn, (args.temperature,) * Fn, (args.top_k,) * Fn, (args.top_p,) * Fn, guided,
                        args.attention)
    prev = torch.zeros(cond.shape[0], Fn, dtype=torch.long, device=s.device)
    keys = row_keys(args.seed, torch.arange(batch, device=s.device))
    scales = torch.full((Fn,), args.cfg_scale, dtype=torch.float32, device=s.device)
    return prev, cond, keys, plan, scales


def time_step(run, device: torch.device, repeats: int = 5) -> float:
    """Median milliseconds of ``run()`` (CUDA events on a GPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


class GraphStep:
    """Replays the captured graph of position ``pos`` (the graph advances its position tensor: reset first)."""

    def __init__(self, runner, pos: int):
        self.runner, self.pos, self.graph = runner, pos, runner.graphs[runner.schedule[pos]]

    def __call__(self) -> None:
        self.runner.pos.fill_(self.pos)
        self.graph.replay()


class EagerStep:
    """Runs ``next_position`` (compiled or not) at position ``pos``."""

    def __init__(self, far: FAR, step, inputs: tuple, pos: int, device: torch.device):
        self.far, self.step, (self.prev, self.cond, self.keys, self.plan, self.scales) = far, step, inputs
        self.pos = torch.full((1,), pos, dtype=torch.long, device=device)

    @torch.no_grad()
    def __call__(self) -> None:
        self.step(self.far, self.prev, self.cond, self.pos, self.keys, self.plan, self.scales)


def ms_per_position(far: FAR, labels: np.ndarray, batch: int, args, s: Settings) -> dict:
    """Milliseconds of single position steps at ``--positions`` (attention length = position + 1): the
    captured CUDA graph when the pipeline uses graphs, else the (compiled) step."""
    positions = [int(p) for p in args.positions.split(",") if p and 0 <= int(p) < far.config.block_size]
    runner = _runners.get(far)
    inputs = None if runner is not None else step_inputs(far, labels, batch, args, s)
    step = compiled_next_position() if s.compile else next_position
    out = {}
    for p in positions:
        run = GraphStep(runner[1], p) if runner is not None else EagerStep(far, step, inputs, p, s.device)
        run()  # a step at a new position compiles nothing; this only warms caches
        sync(s.device)
        out[str(p)] = round(time_step(run, s.device), 3)
    return out


def time_stages(far: FAR, decoder: ImageDecoder, labels: np.ndarray, batch: int, args, s: Settings,
                kw: dict) -> dict:
    """One batch of generation alone, then of decoding alone (images/s)."""
    y = torch.from_numpy(labels[:batch]).to(s.device)
    t0 = time.perf_counter()
    codes = generate(far, y, far.config.block_size, seed=args.seed, **kw)
    sync(s.device)
    gen = batch / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    decoder(codes)
    sync(s.device)  # the whole device: a decode stream too
    return {"gen_images_per_s": round(gen, 2), "decode_images_per_s": round(batch / (time.perf_counter() - t0), 2)}


def choose_batch(args, far: FAR, s: Settings) -> tuple[int, str]:
    if args.batch_size:
        return args.batch_size, "given"
    choice = auto_batch_size(far.config, args.cfg_scale != 1.0, s.dtype, s.device, 1 << 30, s.decode_batch,
                             args.image_size)
    return choice.batch, choice.reason


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = resolve(args)
    if s.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the sampler
        torch.backends.cudnn.benchmark = True  # as the sampler: the decoder's convolutions tuned once
    torch.manual_seed(args.seed)
    tok = benchmark_tokenizer(factor_count(args.factors), args.vq_model).to(s.device).eval()
    grid = args.image_size // tok.config.downsample
    if args.decode_variants:
        return decode_variants(tok, grid, args, s.device, s.decode_batch)
    far = build_generator(args, tok, s)
    cfg = far.config
    batch, reason = choose_batch(args, far, s)
    n = args.num_images or args.num_batches * batch
    s.decode_batch = min(s.decode_batch, batch)
    note(f"{args.gpt_model} {cfg.num_factors} factors, batch {batch} ({reason}), {n} timed images, "
         f"compile {s.compile}, attention {args.attention}")
    stream = s.cuda and args.decode_stream in ("on", "both")
    decoder = ImageDecoder(tok, grid, args.image_size, s.decode_batch, s.decode_dtype, s.channels_last,
                           s.compile_decoder, stream=torch.cuda.Stream(s.device) if stream else None)
    kw = dict(cfg_scale=args.cfg_scale, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
              compile=s.compile, attention=args.attention)
    labels = np.random.default_rng(args.seed).integers(0, cfg.num_classes, size=n + batch)
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        setup = measure_setup(far, decoder, labels, batch, n, args, s, Path(tmp), kw)
        if s.cuda:
            torch.cuda.reset_peak_memory_stats(s.device)
        if args.decode_stream == "both":  # first without the stream, then (below) with it
            decoder.stream = None
        run_s, close_s = timed_run(far, decoder, labels, batch, n, args, s, Path(tmp) / "samples.npz", kw)
        note(f"pipeline: {n} images in {run_s:.1f} s, {n / run_s:.1f} images/s")
        peak_gb = peak_memory_gb(s.device) if s.cuda else None
        extra = {}
        if s.cuda and args.decode_stream == "both":
            decoder.stream = torch.cuda.Stream(s.device)
            stream_s, _ = timed_run(far, decoder, labels, batch, n, args, s, Path(tmp) / "stream.npz", kw)
            note(f"pipeline with a decode stream: {n / stream_s:.1f} images/s")
            extra = {"images_per_s_decode_stream": round(n / stream_s, 2),
                     "minutes_for_50k_decode_stream": round(50000 / (n / stream_s) / 60, 2)}
        per_position = ms_per_position(far, labels, batch, args, s)
        note(f"ms per position {per_position}")
        stages = time_stages(far, decoder, labels, batch, args, s, kw) if args.stages else {}
    result = describe(args, s, far, n / run_s, setup, extra, stages, per_position, close_s, batch, reason,
                      peak_gb)
    print(json.dumps(result), flush=True)
    return result


def describe(args, s: Settings, far: FAR, rate: float, setup: dict, extra: dict,
             stages: dict, per_position: dict, close_s: float, batch: int, reason: str, peak_gb) -> dict:
    """The JSON line."""
    dtype_name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    return {
        "benchmark": "sample_fid",
        "images_per_s": round(rate, 2),
        "minutes_for_50k": round(50000 / rate / 60, 2),
        "minutes_for_50k_with_setup": round((50000 / rate + setup["setup_s"]) / 60, 2),
        **setup,
        "ms_per_position": per_position,
        **extra,
        **stages,
        "npz_close_s": round(close_s, 2),
        "num_images": args.num_images or args.num_batches * batch,
        "batch_size": batch,
        "batch_choice": reason,
        "model": args.gpt_model,
        "factors": far.config.num_factors,
        "params_M": round(far.num_params() / 1e6, 1),
        "vq_model": args.vq_model,
        "image_size": args.image_size,
        "cfg_scale": args.cfg_scale,
        "top_k": args.top_k,
        "compile": s.compile,
        "attention": args.attention,
        "dtype": dtype_name(s.dtype),
        "decode_batch": s.decode_batch,
        "decode_dtype": dtype_name(s.decode_dtype),
        "channels_last": s.channels_last,
        "compile_decoder": s.compile_decoder,
        "decode_stream": args.decode_stream if s.cuda else "off",
        "peak_memory_gb": None if peak_gb is None else round(peak_gb, 2),
        "device": torch.cuda.get_device_name(s.device) if s.cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def decode_variants(tok: FactorizedTokenizer, grid: int, args, device: torch.device, batch: int) -> dict:
    """Images/s of the decoder alone (codebook lookup, decoder, uint8) in each configuration, one JSON line."""
    cuda = device.type == "cuda"
    codes = torch.randint(0, tok.config.codebook_size, (batch, grid * grid, tok.config.num_factors), device=device)
    variants = {"fp32": (torch.float32, False, False), "bf16": (torch.bfloat16, False, False),
                "bf16_channels_last": (torch.bfloat16, True, False),
                "bf16_channels_last_compiled": (torch.bfloat16, True, True)}
    result = {"benchmark": "decode", "batch": batch, "vq_model": args.vq_model, "image_size": args.image_size}
    for name, (dtype, channels_last, compile) in variants.items():
        if not cuda and dtype != torch.float32:
            continue  # CPU autocast to bf16 is slow and not what the sampler does there
        decoder = ImageDecoder(copy.deepcopy(tok), grid, args.image_size, batch, dtype, channels_last, compile)
        t0 = time.perf_counter()
        decoder(codes)  # warm-up (compilation)
        if cuda:
            torch.cuda.synchronize(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.iters):
            decoder(codes)
        if cuda:
            torch.cuda.synchronize(device)
        result[f"{name}_images_per_s"] = round(batch * args.iters / (time.perf_counter() - t0), 1)
        if compile:
            result[f"{name}_setup_s"] = round(warm, 1)
        del decoder
    result.update(device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                  threads=torch.get_num_threads(), torch=torch.__version__)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
