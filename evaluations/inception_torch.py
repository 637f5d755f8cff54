"""The torch backend: ``classify_image_graph_def.pb`` itself (not ported weights), read without TensorFlow and run
op by op with torch (``torch_graph``) on a GPU or the CPU, giving ADM's features to float32 rounding.

The graph is converted once (parse, keep what lies between ``ExpandDims:0`` and the outputs, fold each batchnorm
into its convolution) and the result cached as ``inception-torch-<sha256 of the .pb>.safetensors`` beside the
graph's download location (``${XDG_CACHE_HOME:-~/.cache}/fqgan/``); a different graph file gets its own entry.
Precision: float32 throughout. On GPUs, TF32 is switched off inside the backend (TensorFlow's float32 convolutions
don't use it, and TF32's 10-bit mantissa would move features by ~1e-3); cudnn.benchmark is on while it runs.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluations import graphdef
from evaluations.graphdef import GraphFormatError, Program
from evaluations.inception import (BATCH_SIZE, INPUT_TENSOR, POOL_TENSOR, SOFTMAX_MATMUL_OP, SPATIAL_CHANNELS,
                                   SPATIAL_TENSOR, InceptionBackend, cache_dir, file_sha256, warn)
from evaluations.errors import EvaluatorInputError
from evaluations.torch_graph import TorchGraph

GPU_BATCH_SIZE = 500  # ~8 GB of activations in float32; a GPU needs large batches to be busy
CACHE_FORMAT = "fqgan-inception-torch/2"  # bump when the conversion changes, so old cache entries are redone
_SOFTMAX_KEY = "__softmax_weights__"


@dataclass(frozen=True)
class TorchBackendConfig:
    device: str | None = None  # None: cuda when available, else cpu
    batch_size: int | None = None  # None: GPU_BATCH_SIZE on a GPU, BATCH_SIZE on the CPU
    channels_last: bool = False  # NHWC memory format for the convolutions (a speed choice; same numbers)
    cache_dir: str | os.PathLike | None = None  # None: ${XDG_CACHE_HOME:-~/.cache}/fqgan


def convert_graph(graph_path: str | os.PathLike) -> tuple[Program, np.ndarray]:
    """(program from ExpandDims:0 to pool_3 and mixed_6/conv, softmax weights) from the .pb, without TensorFlow."""
    graph_def = graphdef.read_graph_def(graph_path)
    where = str(graph_path)
    program = graphdef.extract_program(graph_def, INPUT_TENSOR, [POOL_TENSOR, SPATIAL_TENSOR], where)
    softmax = graphdef.constant_input(graph_def, SOFTMAX_MATMUL_OP, 1, where)
    return graphdef.simplify(program), softmax


def load_converted(graph_path: str | os.PathLike, cache: str | os.PathLike | None = None
                   ) -> tuple[Program, np.ndarray, str]:
    """(program, softmax weights, where they came from): the cache entry for this graph file's sha256 if there is
    one, else a fresh conversion, which is then cached (a read-only cache only costs a warning)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    sha = file_sha256(graph_path)
    path = Path(cache if cache is not None else cache_dir()) / f"inception-torch-{sha[:16]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                if meta.get("format") == CACHE_FORMAT and meta.get("sha256") == sha:
                    shapes = json.loads(meta["shapes"])  # safetensors' numpy reader turns 0-d arrays into (1,)
                    tensors = {k: f.get_tensor(k).reshape(shapes[k]) for k in f.keys()}
                    softmax = tensors.pop(_SOFTMAX_KEY)
                    return Program.from_json(json.loads(meta["program"]), tensors), softmax, f"cache {path}"
        except Exception as e:  # a truncated or foreign file: convert again and overwrite it
            warn(f"{path}: unreadable cache entry ({type(e).__name__}), converting the graph again")
    program, softmax = convert_graph(graph_path)
    tensors = {**program.consts, _SOFTMAX_KEY: softmax}
    meta = {"format": CACHE_FORMAT, "sha256": sha, "graph": os.path.basename(graph_path),
            "program": json.dumps(program.to_json()),
            "shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()})}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: a concurrent evaluator never reads half a file
        return program, softmax, f"converted, cached at {path}"
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        warn(f"cannot cache the converted graph at {path} ({e.strerror or e}); it will be converted again next time")
        return program, softmax, "converted (not cached)"


_NEW_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision") and \
    hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


@contextmanager
def exact_float32(device: torch.device):
    """Full float32 for cuDNN convolutions and cuBLAS matmuls (no TF32) and cudnn.benchmark on; the caller's
    settings are restored afterwards. A no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    b = torch.backends
    benchmark = b.cudnn.benchmark
    if _NEW_PRECISION_API:  # torch >= 2.9; the legacy allow_tf32 flags may not be mixed with it
        saved = b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision
        b.cudnn.conv.fp32_precision = b.cuda.matmul.fp32_precision = "ieee"
    else:
        saved = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
    b.cudnn.benchmark = True
    try:
        yield
    finally:
        b.cudnn.benchmark = benchmark
        if _NEW_PRECISION_API:
            b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = saved
        else:
            b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


def resolve_device(device: str | None) -> torch.device:
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise EvaluatorInputError(f"--device {device}: {str(e).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluatorInputError(f"--device {device}: CUDA is not available to torch {torch.__version__}")
    return dev


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """metrics._squared_distances in torch: operands and every intermediate rounded to u's dtype, sums and the
    matmul accumulated in float32."""
    norm_u = u.square().sum(1, dtype=torch.float32).to(u.dtype)
    norm_v = v.square().sum(1, dtype=torch.float32).to(u.dtype)
    d = (u.float() @ v.float().T).to(u.dtype) * 2
    return ((norm_u[:, None] - d) + norm_v[None, :]).clamp_min(0)


class TorchInception(InceptionBackend):
    name = "torch"

    def __init__(self, graph_path: str | os.PathLike, config: TorchBackendConfig = TorchBackendConfig()):
        self.device = resolve_device(config.device)
        self.batch_size = config.batch_size or (GPU_BATCH_SIZE if self.device.type == "cuda" else BATCH_SIZE)
        self.channels_last = config.channels_last
        program, softmax, self.source = load_converted(graph_path, config.cache_dir)
        self.softmax_weights = softmax.astype(np.float32)
        try:
            self.graph = TorchGraph(program, self.device, config.channels_last)
        except GraphFormatError as e:
            raise EvaluatorInputError(f"{graph_path}: {e}") from None

    def features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings():  # batches streamed from an npz are read-only; torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(batch)
        pool, spatial = self.device_features(x)
        return pool.cpu().numpy(), spatial.cpu().numpy()

    @torch.inference_mode()
    def device_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool_3 [n, 1, 1, D], mixed_6/conv[..., :7] [n, h, w, 7]) float32 on this backend's device for uint8
        NHWC images on any device, ``batch_size`` at a time, without a host sync: what the evaluator reads from
        an npz, and what the samplers' --fid-ref hands over while the images are still on the GPU."""
        pools, spatials = [], []
        for x in images.split(self.batch_size):
            n = len(x)
            x = x.to(self.device).float()  # uint8 crosses to the GPU (4x less than float32); [0, 255] as in ADM
            if self.device.type == "cuda" and n < self.batch_size:
                # One batch shape for the whole run: a new shape would make cudnn.benchmark search algorithms
                # again (seconds), more than the padding images cost. Images are independent, so the padding
                # changes nothing.
                x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
            with exact_float32(self.device):
                out = self.graph(x)
            pools.append(out[POOL_TENSOR][:n])
            spatials.append(out[SPATIAL_TENSOR][:n, ..., :SPATIAL_CHANNELS].contiguous())
        return torch.cat(pools), torch.cat(spatials)

    @torch.inference_mode()
    def pairwise_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """ADM's distance block (float16, redone in float32 on overflow). On a GPU in torch, the same arithmetic as
        metrics.numpy_pairwise_distances, used on the CPU; TensorFlow's kernels accumulate in another order, so a
        distance can differ by a float16 ulp, which moves precision/recall by ~0.001 at most on 50k images."""
        if self.device.type != "cuda":
            return super().pairwise_distances(u, v)
        with exact_float32(self.device):
            u_t, v_t = torch.from_numpy(u).to(self.device), torch.from_numpy(v).to(self.device)
            d = _squared_distances(u_t.half(), v_t.half())
            if not bool(torch.isfinite(d).all()):
                d = _squared_distances(u_t.float(), v_t.float())
            return d.float().cpu().numpy()

    def describe(self) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            f"CPU, {torch.get_num_threads()} threads"
        tf32 = ", TF32 off" if self.device.type == "cuda" else ""
        return (f"torch {torch.__version__} on {self.device} ({where}), float32{tf32}, batch {self.batch_size}; "
                f"graph {self.source}")
