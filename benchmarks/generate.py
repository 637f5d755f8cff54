"""Generation speed of FAR with random weights; prints ONE JSON line.

    python benchmarks/generate.py --gpt-model FAR-B --factors 2 --batch-size 4 --cfg-scale 2.0 --device cpu
    python benchmarks/generate.py --gpt-model GPT-B --batch-size 4 --cfg-scale 2.0 --device cpu --compile

tokens_per_s counts positions x batch per second (each position carries one code per factor);
images_per_s = tokens_per_s / positions per image, i.e. extrapolated when --num-positions is below the full
image (the JSON says so). Attention reads the filled part of the cache only, so later positions cost more
than early ones and a prefix overestimates the full-image rate: time full images for real figures.
An untimed warm-up generation runs first (compilation, CUDA-graph capture, allocation; its time is
``setup_s``): --warmup positions, or the whole timed shape when CUDA graphs are on (they are per shape).
See benchmarks/sample_fid.py for the whole pipeline (generation, decoding, writing).

--attention picks how each position's single query attends (generate's ``attention``: sdpa, reductions, flex, triton).
--profile adds where the device time goes: one more full generation, compiled but without CUDA graphs (so
every kernel shows up by name), under torch.profiler; a second JSON line ("generate_profile") gives the
kernels with the most device time per position (``profile_top``) and their sum
(``profile_device_ms_per_position``), to set against ``ms_per_position``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from autoregressive.models.decode_attention import ATTENTION_KERNELS
from autoregressive.models.far import FAR, GPT_models, MODELS, far_config
from autoregressive.models.generate import generate
from benchmarks.timing import sync
from utils.factors import factor_count
from utils.flags import add_compile_argument, add_precision_argument, torch_dtype


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt-model", default="FAR-B", choices=list(MODELS), help="FAR-* or LlamaGen's GPT-*")
    p.add_argument("--factors", default=None,
                   help="factor count or preset (dual, triple; default: 2 for FAR-*, 1 for GPT-*)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_argument(p, "--dtype", None, "default: bf16 on cuda, else fp32")
    p.add_argument("--num-positions", type=int, default=256, help="positions generated per image (timed)")
    p.add_argument("--warmup", type=int, default=8, help="positions of the untimed warm-up generation")
    p.add_argument("--repeats", type=int, default=1, help="timed generations; the fastest is reported")
    add_compile_argument(p, False, "torch.compile the position step (CUDA graphs on GPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture every position as a CUDA graph (default: with --compile on CUDA)")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION_KERNELS,
                   help="how a decoding query attends (see autoregressive/models/decode_attention.py)")
    p.add_argument("--profile", action="store_true", help="also print the device time per kernel (see above)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loader-items", type=int, default=8192,
                   help="also time the code-store loader on a temporary store of this many images x 10 views "
                        "(0: skip)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    factors = factor_count(args.factors) if args.factors else 1 if args.gpt_model in GPT_models else 2
    cfg = far_config(args.gpt_model, factors)
    if not 1 <= args.num_positions <= cfg.block_size:
        p.error(f"--num-positions must be in [1, {cfg.block_size}]")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = FAR(cfg)
    for f in range(cfg.num_factors):  # the init zeroes output layers; random ones give non-trivial sampling
        torch.nn.init.normal_(model.output_layer(f).weight, std=cfg.initializer_range)
    model = model.to(torch_dtype(dtype_name)).eval()
    labels = torch.randint(0, cfg.num_classes, (args.batch_size,), device=device)
    graphs = args.cuda_graphs if args.cuda_graphs is not None else args.compile and device.type == "cuda"
    kw = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, compile=args.compile,
              cuda_graphs=graphs, seed=args.seed, attention=args.attention)

    t0 = time.perf_counter()
    if graphs:  # graphs are captured per shape: warm up with the timed one
        generate(model, labels, args.num_positions, **kw)
    elif args.warmup > 0:
        generate(model, labels, min(max(args.warmup, 1), cfg.block_size), **kw)  # its first position compiles the step
    sync(device)
    setup_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        generate(model, labels, args.num_positions, **kw)
        sync(device)
        best = min(best, time.perf_counter() - t0)

    tokens_per_s = args.num_positions * args.batch_size / best
    result = {
        "benchmark": "generate",
        "tokens_per_s": round(tokens_per_s, 3),
        "images_per_s": round(tokens_per_s / cfg.block_size, 5),
        "images_per_s_extrapolated": args.num_positions < cfg.block_size,
        "seconds": round(best, 3),
        "ms_per_position": round(best / args.num_positions * 1e3, 3),
        "model": args.gpt_model,
        "factors": cfg.num_factors,
        "params_M": round(model.num_params() / 1e6, 1),
        "batch_size": args.batch_size,
        "cfg_scale": args.cfg_scale,
        "num_positions": args.num_positions,
        "positions_per_image": cfg.block_size,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": dtype_name,
        "compile": args.compile,
        "cuda_graphs": graphs,
        "attention": args.attention,
        "setup_s": round(setup_s, 2),
        "threads": torch.get_num_threads(),
        "warmup_positions": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    if args.loader_items:
        result.update(loader_speed(args.loader_items, cfg.num_factors, cfg.block_size, cfg.vocab_size))
    print(json.dumps(result), flush=True)
    if args.profile:  # a line of its own, after the timing (which a slow profile cannot lose)
        profiled = kernel_profile(model, labels, args.num_positions, {**kw, "cuda_graphs": False})
        print(json.dumps({"benchmark": "generate_profile", "attention": args.attention,
                          "batch_size": args.batch_size, **profiled}), flush=True)
        result.update(profiled)
    return result


def kernel_profile(model: FAR, labels: torch.Tensor, positions: int, kw: dict, top: int = 12) -> dict:
    """Device time per kernel name over one generation (see --profile), per position, the largest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = labels.device.type == "cuda"
    generate(model, labels, positions, **kw)  # warm-up without graphs (the compiled step is already built)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        generate(model, labels, positions, **kw)
        if cuda:
            torch.cuda.synchronize(labels.device)
    times: dict = {}
    for event in prof.events():  # on CUDA the kernels themselves; on the CPU each op's own (self) time
        if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time_total if cuda else event.self_cpu_time_total
        if us:
            times[event.name] = times.get(event.name, 0.0) + us
    total = sum(times.values())
    largest = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {"profile_device_ms_per_position": round(total / 1e3 / positions, 3),
            "profile_top": [{"kernel": name[:90], "ms_per_position": round(us / 1e3 / positions, 3),
                             "share": round(us / total, 3)} for name, us in largest],
            "profile_kernels": len(times)}


def loader_speed(items: int, factors: int, tokens: int, vocab: int, batch: int = 256) -> dict:
    """Samples/s of CodeDataset + DataLoader over one shuffled epoch of a temporary store (page cache warm)."""
    import tempfile

    import numpy as np
    from torch.utils.data import DataLoader

    from autoregressive.data.code_store import CodeDataset, CodeStoreWriter, collate_codes

    with tempfile.TemporaryDirectory() as root:
        w = CodeStoreWriter(root, items, 10, [f"f{i}" for i in range(factors)], (int(tokens ** 0.5),) * 2, vocab)
        rng = np.random.default_rng(0)
        for start in range(0, items, 1024):
            n = min(1024, items - start)
            w.write(rng.integers(0, vocab, (n, 10, factors, tokens)), rng.integers(0, 1000, n))
        w.close(num_classes=1000)
        loader = DataLoader(CodeDataset(root), batch_size=batch, shuffle=True, collate_fn=collate_codes)
        for _ in loader:  # warm the page cache
            pass
        t0 = time.perf_counter()
        seen = sum(len(codes) for codes, _ in loader)
        dt = time.perf_counter() - t0
    return {"loader_samples_per_s": round(seen / dt, 1), "loader_items": items, "loader_batch": batch}


if __name__ == "__main__":
    main()
