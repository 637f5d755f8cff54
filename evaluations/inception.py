"""Inception-v3 features from ``classify_image_graph_def.pb`` as the ADM evaluator gets them, through one interface
(``InceptionBackend``) with two implementations: TensorFlow running the graph (``inception_tf``, what ADM does) and
torch running the same graph file op by op (``inception_torch``, no TensorFlow needed; GPU or CPU).

Facts taken from the ADM evaluator: a float32 NHWC batch with values in [0, 255] is fed in place of the graph's
``ExpandDims:0`` (the tensor right after its JPEG decoder), so the graph's own bilinear resize to 299x299 and its
scaling to [-1, 1] still run, whatever the image size; ``pool_3:0`` gives the 2048-d features for FID, IS and
precision/recall, the first 7 channels of ``mixed_6/conv:0`` (17x17x7 = 2023 values, flattened HWC) give sFID, and
class probabilities use the weight matrix read by the ``softmax/logits/MatMul`` op (see
metrics.softmax_probabilities).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from evaluations import metrics
from evaluations.errors import EvaluatorInputError
from evaluations.npz_stream import prefetch

GRAPH_FILENAME = "classify_image_graph_def.pb"
GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
GRAPH_ENV_VAR = "INCEPTION_GRAPH"

INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
SPATIAL_CHANNELS = 7
SOFTMAX_MATMUL_OP = "softmax/logits/MatMul"
BATCH_SIZE = 64  # ADM's, and the CPU default; each image is resized on its own, so it only affects speed
BACKENDS = ("tf", "torch")


class InceptionGraphMissing(EvaluatorInputError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fqgan"


def cache_path() -> Path:
    return cache_dir() / GRAPH_FILENAME


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def find_inception_graph(explicit: str | os.PathLike | None = None) -> Path:
    """--inception-graph, then $INCEPTION_GRAPH, then ./classify_image_graph_def.pb (where the ADM evaluator keeps
    it), then the cache folder. A path the user named explicitly must exist: falling through to another copy
    would silently evaluate with a graph they did not ask for."""
    for given, origin in ((explicit, "--inception-graph"), (os.environ.get(GRAPH_ENV_VAR), f"${GRAPH_ENV_VAR}")):
        if given:
            if not Path(given).is_file():
                raise InceptionGraphMissing(
                    f"Inception graph not found at {given} (from {origin}); download {GRAPH_URL} to that path")
            return Path(given)
    for candidate in (Path.cwd() / GRAPH_FILENAME, cache_path()):
        if candidate.is_file():
            return candidate
    raise InceptionGraphMissing(
        f"the Inception graph {GRAPH_FILENAME} (about 100 MB) is needed but was not found: download {GRAPH_URL} "
        f"and put it in the current directory or in {cache_path().parent}/, "
        f"or pass --inception-graph PATH (or set ${GRAPH_ENV_VAR})")


class InceptionBackend:
    """What the evaluator needs from an Inception implementation; use as a context manager or call close().

    Subclasses set ``name``, ``batch_size`` and ``softmax_weights`` (the constant read by ``softmax/logits/MatMul``,
    [2048, 1008] for the real graph) and implement ``features``; ``pairwise_distances`` is the precision/recall
    distance block (metrics.ManifoldEstimator's ``distance_fn``)."""

    name: str
    batch_size: int
    softmax_weights: np.ndarray

    def features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool_3, mixed_6/conv[..., :7]) as float32 NHWC arrays for a uint8 NHWC batch."""
        raise NotImplementedError

    def pairwise_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return metrics.numpy_pairwise_distances(u, v)

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        pass

    def __enter__(self) -> "InceptionBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def activations(self, batches: Iterable[np.ndarray], total: int | None = None,
                    desc: str = "Inception features") -> tuple[np.ndarray, np.ndarray]:
        """(pool_3 [N, 2048], spatial [N, 2023]) float32 for uint8 NHWC batches; the next batch is read while
        this one runs."""
        pools, spatials = [], []
        for batch in tqdm(prefetch(batches), total=total, desc=desc, unit="batch"):
            pool, spatial = self.features(batch)
            pools.append(pool.reshape(len(pool), -1))
            spatials.append(spatial.reshape(len(spatial), -1))
        return np.concatenate(pools, axis=0), np.concatenate(spatials, axis=0)


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """(backend, why). auto: torch on a GPU (TensorFlow's GPU build rarely matches the installed torch/CUDA), else
    TensorFlow when it imports (what ADM runs), else torch."""
    if requested in BACKENDS:
        return requested, "chosen with --backend"
    import torch
    if torch.cuda.is_available():
        return "torch", "a GPU is present"
    try:
        from evaluations.inception_tf import import_tf
        import_tf()
    except Exception as e:  # ImportError, or a broken install failing in its own way
        return "torch", f"TensorFlow cannot be imported ({type(e).__name__})"
    return "tf", "TensorFlow is installed and no GPU is present"


def open_backend(name: str, graph_path: str | os.PathLike, batch_size: int | None = None,
                 device: str | None = None) -> InceptionBackend:
    if name == "tf":
        if device is not None:
            raise EvaluatorInputError("--device applies to --backend torch only (TensorFlow places ops itself)")
        from evaluations.inception_tf import TFInception
        return TFInception(graph_path, batch_size or BATCH_SIZE)
    if name == "torch":
        from evaluations.inception_torch import TorchBackendConfig, TorchInception
        return TorchInception(graph_path, TorchBackendConfig(device=device, batch_size=batch_size))
    raise EvaluatorInputError(f"--backend {name}: unknown backend (choose from {', '.join(BACKENDS)})")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
