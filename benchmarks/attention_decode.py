"""Single-query decode attention, every kernel side by side at FAR-B's decoding shapes; JSON lines.

    python benchmarks/attention_decode.py                       # GPU: 2048 rows, 16 heads, head dim 64, bf16
    python benchmarks/attention_decode.py --kernels flex,triton --lengths 1,129,257
    python benchmarks/attention_decode.py --toy                 # CPU, tiny, seconds (what `make test` runs)

Each kernel (``autoregressive/models/decode_attention.py``) runs compiled (``torch.compile(fullgraph=True,
dynamic=False)``, one compilation per kernel serving every length: the filled length is a tensor) against a
static cache of ``--cache`` entries (default: FAR-B's trunk cache, 257 rounded up to 272), at each filled length
of ``--lengths`` (FAR-B decodes at 1..257). One line per (kernel, length): microseconds per call (CUDA events on
a GPU), the bytes the filled part of the cache holds and the rate that makes (``gb_per_s``: what a kernel that
reads only the filled part achieves; whole-cache kernels read more than they are credited with), and the
largest difference from SDPA on the filled part. A last line ("attention_decode_summary") names the fastest
kernel over all lengths (sum of microseconds), which the GPU suite then samples with.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from autoregressive.models.decode_attention import ATTENTION_KERNELS, bytes_read, decode_attention
from utils.flags import add_precision_argument, torch_dtype

TOY = dict(rows=2, heads=4, kv_heads=2, head_dim=16, cache=48, lengths="1,17,48", dtype="fp32", iters=2,
           warmup=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(ATTENTION_KERNELS), help="comma-separated kernel names")
    p.add_argument("--rows", type=int, default=2048, help="batch rows (1024 images with guidance: 2048)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query KV heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cache", type=int, default=272, help="static cache entries (FAR-B: 257 rounded up to 16s)")
    p.add_argument("--lengths", default="1,64,128,129,256,257", help="filled lengths to time")
    add_precision_argument(p, "--dtype", "bf16", "cache and query precision")
    p.add_argument("--iters", type=int, default=50, help="timed calls per length (the median is reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each kernel (default: on, off with --toy)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--toy", action="store_true", help="a tiny size on the CPU, eager unless --compile: seconds")
    args = p.parse_args(argv)
    if args.toy:
        for name, value in TOY.items():
            setattr(args, name, value)
        args.device = "cpu"
    args.compile = (not args.toy) if args.compile is None else args.compile
    args.kernels = [k for k in args.kernels.split(",") if k]
    args.lengths = [int(n) for n in args.lengths.split(",") if n]
    unknown = sorted(set(args.kernels) - set(ATTENTION_KERNELS))
    if unknown:
        p.error(f"unknown kernels {unknown}; choose from {ATTENTION_KERNELS}")
    if not all(1 <= n <= args.cache for n in args.lengths):
        p.error(f"--lengths must lie in [1, --cache {args.cache}]")
    return args


def make_inputs(args, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    kv_heads = args.kv_heads or args.heads
    dtype = torch_dtype(args.dtype)
    q = torch.randn(args.rows, args.heads, 1, args.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(args.rows, kv_heads, args.cache, args.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(args.rows, kv_heads, args.cache, args.head_dim, generator=gen).to(device, dtype)
    return q, k, v


def reference(q, k, v, n: int) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k[:, :, :n].float().repeat_interleave(g, 1),
                                          v[:, :, :n].float().repeat_interleave(g, 1))


def build(kernel: str, compile: bool):
    def attend(q, k, v, length):
        return decode_attention(kernel, q, k, v, length)

    return torch.compile(attend, fullgraph=True, dynamic=False) if compile else attend


def time_calls(fn, inputs, iters: int, warmup: int, cuda: bool) -> float:
    """Median microseconds of one call."""
    for _ in range(warmup):
        fn(*inputs)
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def bench_kernel(kernel: str, args, q, k, v, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    fn = build(kernel, args.compile)
    length = torch.ones(1, dtype=torch.int64, device=device)
    t0 = time.perf_counter()
    fn(q, k, v, length)  # compilation (once: every length below reuses it)
    if cuda:
        torch.cuda.synchronize(device)
    setup_s = time.perf_counter() - t0
    rows = []
    for n in args.lengths:
        length.fill_(n)
        err = (fn(q, k, v, length).float() - reference(q, k, v, n)).abs().max().item()
        us = time_calls(fn, (q, k, v, length), args.iters, args.warmup, cuda)
        rows.append({"benchmark": "attention_decode", "kernel": kernel, "length": n, "us": round(us, 2),
                     "gb_per_s": float(f"{bytes_read(q, k, n) / us / 1e3:.4g}"), "max_abs_err": float(f"{err:.3g}"),
                     "setup_s": round(setup_s, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    q, k, v = make_inputs(args, device)
    shape = dict(rows=args.rows, heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                 cache=args.cache, dtype=args.dtype, compile=args.compile)
    results, failed = [], {}
    for kernel in args.kernels:
        try:
            results += bench_kernel(kernel, args, q, k, v, device)
        except Exception as e:  # one kernel failing must not hide the others' numbers
            failed[kernel] = f"{type(e).__name__}: {str(e)[:400]}"
            print(json.dumps({"benchmark": "attention_decode", "kernel": kernel, "error": failed[kernel]}),
                  flush=True)
    totals = {kern: sum(r["us"] for r in results if r["kernel"] == kern) for kern in args.kernels
              if kern not in failed}
    summary = {"benchmark": "attention_decode_summary", "fastest": min(totals, key=totals.get) if totals else None,
               "total_us": {kern: round(us, 1) for kern, us in totals.items()}, "failed": failed, **shape,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__}
    print(json.dumps(summary), flush=True)
    return results + [summary]


if __name__ == "__main__":
    main()
