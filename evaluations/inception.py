"""Inception-v3 features from ``classify_image_graph_def.pb`` through TensorFlow, as the ADM evaluator gets them.

TensorFlow is imported only when a graph is loaded, so nothing else in the project needs it. Facts taken from
the ADM evaluator: a float32 NHWC batch with values in [0, 255] is fed in place of the graph's ``ExpandDims:0``
(the tensor right after its JPEG decoder), so the graph's own bilinear resize to 299x299 and its scaling to
[-1, 1] still run, whatever the image size; ``pool_3:0`` gives the 2048-d features for FID, IS and precision/recall,
the first 7 channels of ``mixed_6/conv:0`` (17x17x7 = 2023 values, flattened HWC) give sFID, and class
probabilities use the weight matrix read by the ``softmax/logits/MatMul`` op (see metrics.softmax_probabilities).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from evaluations.npz_stream import EvaluatorInputError

GRAPH_FILENAME = "classify_image_graph_def.pb"
GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
GRAPH_ENV_VAR = "INCEPTION_GRAPH"

INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
SPATIAL_CHANNELS = 7
SOFTMAX_MATMUL_OP = "softmax/logits/MatMul"
BATCH_SIZE = 64  # ADM's; each image is resized on its own, so it only affects speed and memory


class InceptionGraphMissing(EvaluatorInputError):
    pass


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fqgan" / GRAPH_FILENAME


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


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter would bury our output
    import tensorflow.compat.v1 as tf
    return tf


class InceptionFeatures:
    """Owns a TF1-style session on the imported graph; use as a context manager or call close()."""

    def __init__(self, graph_path: str | os.PathLike):
        tf = _import_tf()
        graph_def = tf.GraphDef()
        try:
            graph_def.ParseFromString(Path(graph_path).read_bytes())
        except Exception as e:  # protobuf's DecodeError; e.g. an HTML error page saved as .pb
            raise EvaluatorInputError(f"{graph_path}: not a TensorFlow GraphDef ({type(e).__name__})") from None
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = tf.placeholder(tf.float32, shape=[None, None, None, 3], name="images")
            try:
                pool, spatial, matmul = tf.import_graph_def(
                    graph_def, input_map={INPUT_TENSOR: self.images},
                    return_elements=[POOL_TENSOR, SPATIAL_TENSOR, SOFTMAX_MATMUL_OP], name="inception")
            except (ValueError, KeyError) as e:
                msg = str(e).splitlines()[0]
                raise EvaluatorInputError(
                    f"{graph_path}: not the Inception graph the evaluator needs ({msg})") from None
            self.pool = pool
            self.spatial = spatial[..., :SPATIAL_CHANNELS]
            softmax_weights = matmul.inputs[1]
        config = tf.ConfigProto(allow_soft_placement=True)  # as ADM: lets DecodeJpeg & co stay on the CPU
        config.gpu_options.allow_growth = True
        self.session = tf.Session(graph=self.graph, config=config)
        # A constant of the graph (2048 x 1008 for the real one); fetched once, the softmax then runs in numpy.
        self.softmax_weights: np.ndarray = self.session.run(softmax_weights)

    def __enter__(self) -> "InceptionFeatures":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def activations(self, batches: Iterable[np.ndarray], total: int | None = None,
                    desc: str = "Inception features") -> tuple[np.ndarray, np.ndarray]:
        """(pool_3 [N, 2048], spatial [N, 2023]) float32 for uint8 NHWC batches."""
        pools, spatials = [], []
        for batch in tqdm(batches, total=total, desc=desc, unit="batch"):
            pool, spatial = self.session.run([self.pool, self.spatial],
                                             {self.images: batch.astype(np.float32)})
            pools.append(pool.reshape(len(pool), -1))
            spatials.append(spatial.reshape(len(spatial), -1))
        return np.concatenate(pools, axis=0), np.concatenate(spatials, axis=0)


def _tf_squared_distances(tf, u, v):
    norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
    norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
    return tf.maximum(norm_u - 2 * tf.matmul(u, v, transpose_b=True) + norm_v, 0.0)


class TFPairwiseDistances:
    """ADM's DistanceBlock as a callable for metrics.ManifoldEstimator: squared distances in float16, the block
    recomputed in float32 when any entry is not finite. Precision/recall compare distances with radii at the
    float16 ulp level, so using TensorFlow's own float16 kernels (and their accumulation order) reproduces ADM's
    numbers bit for bit on the same device, where the numpy emulation may differ by ~0.001."""

    def __init__(self):
        tf = _import_tf()
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.u = tf.placeholder(tf.float32, shape=[None, None])
            self.v = tf.placeholder(tf.float32, shape=[None, None])
            d16 = _tf_squared_distances(tf, tf.cast(self.u, tf.float16), tf.cast(self.v, tf.float16))
            self.distances = tf.cond(tf.reduce_all(tf.math.is_finite(d16)),
                                     lambda: tf.cast(d16, tf.float32),
                                     lambda: _tf_squared_distances(tf, self.u, self.v))
        self.session = tf.Session(graph=self.graph)

    def __call__(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.session.run(self.distances, {self.u: u, self.v: v})

    def close(self) -> None:
        self.session.close()
