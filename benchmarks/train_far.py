"""FAR training steps as autoregressive/train/train_c2i.py runs them (its own build() and train_step()); ONE JSON
line.

    python benchmarks/train_far.py                                   # GPU: FAR-B dual, batch 64, bf16, compiled
    python benchmarks/train_far.py --gpt-model FAR-L --no-compile
    torchrun --nproc_per_node=2 benchmarks/train_far.py --fsdp       # sharded (several processes)
    python benchmarks/train_far.py --device cpu --gpt-model FAR-T --batch-size 4 --iters 2

Random codes in a temporary code store (16x16 positions, vocabulary 16384, 1000 classes); the batch is already
on the device, so data loading is not timed. Compilation happens in the warm-up steps and is reported apart.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


import numpy as np
import torch

from autoregressive.data.code_store import CodeStoreWriter
from autoregressive.models.far import FAR_models
from autoregressive.train.train_c2i import build, parse_config, train_step
from benchmarks.timing import peak_memory_gb, sync
from utils.distributed import all_gather_objects, cleanup, get_world_size, init_distributed
from utils.factors import factor_count, factor_names
from utils.flags import add_compile_argument, add_precision_argument


def random_code_store(root: Path, items: int, factors: int, vocab: int, classes: int) -> Path:
    """A code store of random codes (every rank writes its own shard)."""
    rng = np.random.default_rng(0)
    w = CodeStoreWriter(root, items, 1, list(factor_names(factors)), (16, 16), vocab)
    w.write(rng.integers(0, vocab, (items, 1, factors, 256)), rng.integers(0, classes, items))
    w.close(num_classes=classes)
    return root


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt-model", default="FAR-B", choices=list(FAR_models))
    p.add_argument("--factors", default="dual", help="dual, triple or a count")
    p.add_argument("--batch-size", type=int, default=None, help="per process; default 64 on a GPU, 4 on CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_precision_argument(p, "--mixed-precision", "bf16")
    add_compile_argument(p, True, "torch.compile the model (GPU only, as train_c2i.py)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (run under torchrun)")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (64 if args.device.startswith("cuda") else 4)
    factors = factor_count(args.factors)
    init_distributed(args.device)  # before the (collective) code store is written; build() reuses the group
    world = get_world_size()
    with tempfile.TemporaryDirectory() as mine:
        d = Path(all_gather_objects(mine)[0])  # rank 0's folder: the store's shards must sit side by side
        random_code_store(d / "codes", args.batch_size * 4, factors, 16384, 1000)
        flags = ["--gpt-model", args.gpt_model, "--exp-name", "bench", "--results-dir", str(d / "results"),
                 "--code-path", str(d / "codes"), "--global-batch-size", str(args.batch_size * world),
                 "--num-workers", "0", "--device", args.device, "--mixed-precision", args.mixed_precision,
                 "--log-every", "1000000", "--no-local-save"]
        flags += [] if args.compile else ["--no-compile"]
        flags += ["--fsdp"] if args.fsdp else []
        t = build(parse_config(flags, factors))
        device = t.run.info.device
        codes = torch.randint(0, 16384, (args.batch_size, 256, factors), device=device)
        labels = torch.randint(0, 1000, (args.batch_size,), device=device)
        t0 = time.perf_counter()
        for _ in range(2):  # warm-up: compilation, autotuning, allocations
            train_step(t, codes, labels)
        sync(device)
        warmup_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            logs, _ = train_step(t, codes, labels)
        sync(device)
        sec = (time.perf_counter() - t0) / args.iters
        result = {"benchmark": "train_far", "gpt_model": args.gpt_model, "factors": factors,
                  "batch_size_per_process": args.batch_size, "processes": world,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "mixed_precision": args.mixed_precision if device.type == "cuda" else "fp32",
                  "compile": args.compile and device.type == "cuda", "fsdp": args.fsdp,
                  "seconds_per_step": round(sec, 4), "steps_per_s": round(1 / sec, 3),
                  "images_per_s": round(args.batch_size * world / sec, 1),
                  "peak_memory_gb": round(peak_memory_gb(device), 2), "warmup_s": round(warmup_s, 1),
                  "loss": round(float(logs["loss"]), 4), "torch": torch.__version__}
        if t.run.info.is_main:
            print(json.dumps(result), flush=True)
        cleanup()
    return result


if __name__ == "__main__":
    main()
