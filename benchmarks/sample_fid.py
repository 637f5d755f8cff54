"""Speed of the whole FID sampling pipeline per image: generation + decoding + uint8 + writing the npz, with
random weights (speed does not depend on them); prints ONE JSON line.

    python benchmarks/sample_fid.py --gpt-model FAR-B --factors 2 --batch-size 1024 --num-images 3072
    python benchmarks/sample_fid.py --gpt-model FAR-B --factors 2 --no-compile        # eager, same batch rule
    python benchmarks/sample_fid.py --gpt-model FAR-T --device cpu --batch-size 4 --num-images 8

It runs the sampler's own pipeline (autoregressive/sample/pipeline.py: the same generate call, decoder and
writer thread) over --num-images images, after one untimed warm-up batch (compilation, CUDA-graph capture;
its time is ``setup_s``). ``images_per_s`` is the steady rate, and ``minutes_for_50k`` = 50,000 images at that
rate on one device (``minutes_for_50k_with_setup`` adds the warm-up once). With --stages (default), one
batch of generation alone and of decoding alone are also timed, to show where the time goes.

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
from pathlib import Path


import numpy as np
import torch

from autoregressive.models import FAR, FAR_models, far_config, generate
from autoregressive.models.decode_attention import ATTENTION_KERNELS
from autoregressive.sample.pipeline import ImageDecoder, auto_batch_size, sample_images
from tokenizer.models import FactorizedTokenizer
from utils.factors import factor_count
from utils.npz import ShardedNpzWriter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def note(message: str) -> None:
    """Progress on stderr: what a timed-out run still tells (the GPU suite prints the tail)."""
    print(f"[sample_fid] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
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
                   help="how a decoding query attends (generate's attention; see autoregressive/models/decode_attention.py)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled position step + CUDA graphs (default: on with CUDA)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="generator dtype (default: bf16 on CUDA)")
    p.add_argument("--decode-batch-size", type=int, default=None, help="default: 128 on CUDA, 4 on CPU")
    p.add_argument("--decode-dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC decoder (default: on with CUDA)")
    p.add_argument("--compile-decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoder (default: as --compile)")
    p.add_argument("--decode-stream", choices=["off", "on", "both"], default="off",
                   help="decode on a second CUDA stream, overlapping the next batch's generation; 'both' times "
                        "the pipeline without, then with it (images_per_s_decode_stream)")
    p.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one batch of generation alone and of decoding alone")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where the npz goes (default: a temporary folder, removed)")
    p.add_argument("--decode-variants", action="store_true",
                   help="only time the decoder: fp32, bf16, bf16 + channels_last, and that compiled")
    p.add_argument("--iters", type=int, default=3, help="timed decoder calls per variant (--decode-variants)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the sampler
    compile = cuda if args.compile is None else args.compile
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    decode_dtype = DTYPES[args.decode_dtype or ("bf16" if cuda else "fp32")]
    decode_batch = args.decode_batch_size or (128 if cuda else 4)
    channels_last = cuda if args.channels_last is None else args.channels_last
    compile_decoder = compile if args.compile_decoder is None else args.compile_decoder
    factors = factor_count(args.factors)
    preset = {2: "dual", 3: "triple"}[factors]

    torch.manual_seed(args.seed)
    tok = FactorizedTokenizer(preset, vq_model=args.vq_model).to(device).eval()
    grid = args.image_size // tok.config.downsample
    if args.decode_variants:
        return decode_variants(tok, grid, args, device, decode_batch)
    cfg = far_config(args.gpt_model, factors, vocab_size=tok.config.codebook_size, block_size=grid * grid)
    with torch.device(device):
        far = FAR(cfg)
    for f in range(factors):  # the init zeroes the output layers; random ones give non-trivial sampling
        torch.nn.init.normal_(far.output(f).weight, std=cfg.initializer_range)
    far = far.to(dtype).eval()

    guided = args.cfg_scale != 1.0
    if args.batch_size:
        batch, reason = args.batch_size, "given"
    else:
        choice = auto_batch_size(cfg, guided, dtype, device, 1 << 30, decode_batch, args.image_size)
        batch, reason = choice.batch, choice.reason
    n = args.num_images or args.num_batches * batch
    decode_batch = min(decode_batch, batch)
    note(f"{args.gpt_model} {factors} factors, batch {batch} ({reason}), {n} timed images, compile {compile}")
    decoder = ImageDecoder(tok, grid, args.image_size, decode_batch, decode_dtype, channels_last, compile_decoder,
                           stream=torch.cuda.Stream(device) if cuda and args.decode_stream == "on" else None)
    kw = dict(cfg_scale=args.cfg_scale, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
              compile=compile, attention=args.attention)
    labels = np.random.default_rng(args.seed).integers(0, cfg.num_classes, size=n + batch)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        size = args.image_size
        # warm-up: one batch through generation and decoding (compilation, graph capture, allocation)
        t0 = time.perf_counter()
        warm = ShardedNpzWriter(Path(tmp) / "warmup.npz", {"arr_0": ((batch, size, size, 3), np.uint8)})
        sample_images(far, decoder, labels, np.arange(n, n + batch), batch, args.seed,
                      lambda rows, images, _: warm.write("arr_0", rows - n, images), **kw)
        sync()
        setup_s = time.perf_counter() - t0
        note(f"setup (warm-up batch of {batch}: compile, capture) {setup_s:.1f} s")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        def timed_run(name: str) -> tuple[float, float]:
            """Seconds of the pipeline over n images, and of closing the npz."""
            writer = ShardedNpzWriter(Path(tmp) / f"{name}.npz",
                                      {"arr_0": ((n, size, size, 3), np.uint8), "arr_1": ((n,), np.int64)})

            def write(rows, images, batch_labels):
                writer.write("arr_0", rows, images)
                writer.write("arr_1", rows, batch_labels)

            t0 = time.perf_counter()
            sample_images(far, decoder, labels, np.arange(n), batch, args.seed, write, **kw)
            sync()
            run_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            writer.close()
            close_s = time.perf_counter() - t0
            Path(tmp, f"{name}.npz").unlink()  # keep the disk use to one npz
            return run_s, close_s

        run_s, close_s = timed_run("samples")
        note(f"pipeline: {n} images in {run_s:.1f} s, {n / run_s:.1f} images/s")
        peak_gb = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
        extra = {}
        if cuda and args.decode_stream == "both":  # the same graphs and decoder, decoding on a second stream
            decoder.stream = torch.cuda.Stream(device)
            stream_s, _ = timed_run("samples_decode_stream")
            note(f"pipeline with a decode stream: {n / stream_s:.1f} images/s")
            extra = {"images_per_s_decode_stream": round(n / stream_s, 2),
                     "minutes_for_50k_decode_stream": round(50000 / (n / stream_s) / 60, 2)}

        stages = {}
        if args.stages:
            y = torch.from_numpy(labels[:batch]).to(device)
            t0 = time.perf_counter()
            codes = generate(far, y, cfg.block_size, seed=args.seed, **kw)
            sync()
            stages["gen_images_per_s"] = round(batch / (time.perf_counter() - t0), 2)
            t0 = time.perf_counter()
            decoder(codes)
            sync()  # the whole device: a decode stream too
            stages["decode_images_per_s"] = round(batch / (time.perf_counter() - t0), 2)

    rate = n / run_s
    result = {
        "benchmark": "sample_fid",
        "images_per_s": round(rate, 2),
        "minutes_for_50k": round(50000 / rate / 60, 2),
        "minutes_for_50k_with_setup": round((50000 / rate + setup_s) / 60, 2),
        "setup_s": round(setup_s, 1),
        **extra,
        **stages,
        "npz_close_s": round(close_s, 2),
        "num_images": n,
        "batch_size": batch,
        "batch_choice": reason,
        "model": args.gpt_model,
        "factors": factors,
        "params_M": round(far.num_params() / 1e6, 1),
        "vq_model": args.vq_model,
        "image_size": args.image_size,
        "cfg_scale": args.cfg_scale,
        "top_k": args.top_k,
        "compile": compile,
        "attention": args.attention,
        "dtype": str(dtype).replace("torch.", ""),
        "decode_batch": decode_batch,
        "decode_dtype": str(decode_dtype).replace("torch.", ""),
        "channels_last": channels_last,
        "compile_decoder": compile_decoder,
        "decode_stream": args.decode_stream if cuda else "off",
        "peak_memory_gb": None if peak_gb is None else round(peak_gb, 2),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)
    return result


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
