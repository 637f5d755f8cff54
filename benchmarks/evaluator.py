"""Inception feature speed of the FID evaluator's backends (evaluations/evaluator.py): one JSON line per backend.

    python benchmarks/evaluator.py                                  # both backends; torch on CUDA if present
    python benchmarks/evaluator.py --device cpu --images 32 --batch-size 16
    python benchmarks/evaluator.py --backend torch --device cuda    # a GPU machine without TensorFlow

Times what the evaluator does per batch (uint8 images in, pool_3 and mixed_6/conv features back in host memory,
the next batch prefetched), after one warm-up batch (cudnn.benchmark / oneDNN set-up). Uses the real
classify_image_graph_def.pb when --graph is given or the evaluator finds it, else a full-size stand-in with the
real graph's layout and shapes and random weights (benchmarks/standin.py; built without TensorFlow, ~100 MB in a
temporary folder). On CUDA the torch line also gives the peak memory and the largest difference of its features
from the same backend on the CPU (TF32 off, so expect ~1e-5 relative). The TensorFlow line says "skipped" when
TensorFlow cannot be imported.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


import numpy as np
import torch

from benchmarks.standin import write_standin_graph
from benchmarks.timing import peak_memory_gb
from evaluations.inception import InceptionBackend, InceptionGraphMissing, find_inception_graph
from evaluations.inception_torch import TorchBackendConfig, TorchInception


def _time_backend(net: InceptionBackend, batch: np.ndarray, images: int) -> dict:
    t = time.perf_counter()
    net.features(batch)  # warm-up: algorithm search / primitive creation for this shape
    warmup = time.perf_counter() - t
    count = max(1, images // len(batch))
    t = time.perf_counter()
    net.activations((batch for _ in range(count)), total=count, desc=net.name)
    elapsed = time.perf_counter() - t
    per_s = count * len(batch) / elapsed
    return {"images": count * len(batch), "images_per_s": round(per_s, 2),
            "minutes_per_60k": round(60000 / per_s / 60, 2), "warmup_s": round(warmup, 2)}


def _cpu_difference(net: TorchInception, graph: Path, cache: Path, batch: np.ndarray) -> dict:
    """Largest |cuda - cpu| over a few images, absolute and relative to the largest feature."""
    cpu = TorchInception(graph, TorchBackendConfig(device="cpu", cache_dir=cache))
    few = batch[:8]
    diffs = {}
    for name, a, b in zip(("pool", "spatial"), net.features(few), cpu.features(few)):
        diffs[f"{name}_max_abs_diff_vs_cpu"] = float(np.abs(a - b).max())
        diffs[f"{name}_max_rel_diff_vs_cpu"] = float(np.abs(a - b).max() / np.abs(b).max())
    return diffs


def run_torch(args, graph: Path, cache: Path, batch: np.ndarray, channels_last: bool) -> dict:
    net = TorchInception(graph, TorchBackendConfig(args.device, len(batch), channels_last, cache))
    device = net.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"backend": "torch", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "precision": "float32, TF32 off" if device.type == "cuda" else "float32",
              "channels_last": channels_last, **_time_backend(net, batch, args.images)}
    if device.type == "cuda":
        result["peak_memory_gb"] = round(peak_memory_gb(device), 2)
        if not args.no_cpu_check:
            result.update(_cpu_difference(net, graph, cache, batch))
    return result


def run_tf(args, graph: Path, batch: np.ndarray) -> dict:
    try:
        from evaluations.inception_tf import TFInception, import_tf
        tf = import_tf()
    except Exception as e:  # noqa: BLE001 -- reported, not fatal: the GPU suite has no TensorFlow
        return {"backend": "tf", "skipped": f"TensorFlow cannot be imported ({type(e).__name__})"}
    with TFInception(graph, len(batch)) as net:
        on = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        return {"backend": "tf", "device": on, "tensorflow": tf.__version__, "precision": "float32",
                **_time_backend(net, batch, args.images)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="both", choices=["both", "tf", "torch"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch backend's")
    p.add_argument("--graph", default=None, help="classify_image_graph_def.pb (default: the evaluator's search, "
                                                 "else a full-size stand-in)")
    p.add_argument("--width", type=float, default=1.0, help="stand-in channel scale (1.0: real Inception-v3 shapes)")
    p.add_argument("--image-size", type=int, default=256, help="input images (resized to 299 inside the graph)")
    p.add_argument("--batch-size", type=int, default=None, help="default 500 on CUDA, 16 on CPU")
    p.add_argument("--images", type=int, default=None, help="images timed (default 5000 on CUDA, 32 on CPU)")
    p.add_argument("--channels-last", default=None, choices=["off", "on", "both"],
                   help="torch memory format (default: both on CUDA, off on CPU)")
    p.add_argument("--no-cpu-check", action="store_true", help="on CUDA, skip the comparison with CPU features")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    batch_size = args.batch_size or (500 if cuda else 16)
    args.images = args.images or (5000 if cuda else 32)
    layouts = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last or ("both" if cuda else "off")]

    with tempfile.TemporaryDirectory(prefix="fqgan-bench-") as tmp:
        tmp = Path(tmp)
        graph, which = (Path(args.graph), "given") if args.graph else (None, None)
        if graph is None:
            try:
                graph, which = find_inception_graph(), "real"
            except InceptionGraphMissing:
                graph, which = write_standin_graph(tmp / "standin.pb", args.width), f"stand-in, width {args.width}"
        # The real graph's conversion goes to the evaluator's cache (reused later); a stand-in's stays temporary.
        cache = None if which == "real" else tmp / "cache"
        batch = np.random.default_rng(0).integers(0, 256, (batch_size, args.image_size, args.image_size, 3),
                                                  dtype=np.uint8)
        common = {"benchmark": "evaluator", "graph": which, "image_size": args.image_size, "batch_size": batch_size}
        results = []
        if args.backend in ("both", "torch"):
            results += [run_torch(args, graph, cache, batch, cl) for cl in layouts]
        if args.backend in ("both", "tf"):
            results.append(run_tf(args, graph, batch))
        for r in results:
            print(json.dumps({**common, **r}), flush=True)
    return results


if __name__ == "__main__":
    main()
