"""The TensorFlow backend: ``classify_image_graph_def.pb`` imported and run by TensorFlow, as the ADM evaluator
does, and ADM's own float16 distance block for precision/recall. TensorFlow is imported only here."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from evaluations.inception import (BATCH_SIZE, INPUT_TENSOR, POOL_TENSOR, SOFTMAX_MATMUL_OP, SPATIAL_CHANNELS,
                                   SPATIAL_TENSOR, InceptionBackend)
from evaluations.errors import EvaluatorInputError


def import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter would bury our output
    import tensorflow.compat.v1 as tf
    return tf


class TFInception(InceptionBackend):
    """A TF1-style session on the imported graph, fed in place of ``ExpandDims:0`` as ADM does."""

    name = "tf"

    def __init__(self, graph_path: str | os.PathLike, batch_size: int = BATCH_SIZE):
        try:
            tf = import_tf()
        except Exception as e:
            raise EvaluatorInputError(
                f"--backend tf needs TensorFlow, which cannot be imported ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); install tensorflow-cpu or use --backend torch") from None
        self.tf, self.batch_size = tf, batch_size
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
        self._distances: TFPairwiseDistances | None = None

    def features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.session.run([self.pool, self.spatial], {self.images: batch.astype(np.float32)}))

    def pairwise_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self._distances is None:
            self._distances = TFPairwiseDistances()
        return self._distances(u, v)

    def describe(self) -> str:
        gpus = self.tf.config.list_physical_devices("GPU")
        return f"TensorFlow {self.tf.__version__} on {'GPU' if gpus else 'CPU'}, batch {self.batch_size}"

    def close(self) -> None:
        self.session.close()
        if self._distances is not None:
            self._distances.close()


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
        tf = import_tf()
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
