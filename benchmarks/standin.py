"""A stand-in for ``classify_image_graph_def.pb`` (the 2015 Inception-v3 graph ADM's evaluator runs), written with
tensorboard's protobuf classes so that neither building nor reading it needs TensorFlow. For tests and benchmarks
only (so it lives here, not in the evaluations package): the evaluator never uses it.

It has the real graph's layout, as far as public listings of that graph show it: a JPEG decoder feeding
``Cast`` -> ``ExpandDims`` -> ``ResizeBilinear`` (to 299x299) -> ``Sub`` 128 -> ``Mul`` 1/128; every layer a
``conv2d_params`` Const, ``Conv2D``, ``batchnorm`` (BatchNormWithGlobalNormalization, so GraphDef producer 8: the op
stopped working at version 9), ``CheckNumerics``, a control-dependency ``Identity`` and a ``Relu`` named after the
layer; pools wrapped the same way; blocks ``mixed`` .. ``mixed_10`` joined by the old ``Concat`` op (axis first);
``pool_3`` (8x8 average), ``pool_3/_reshape`` to [1, 2048], ``softmax/logits/MatMul`` + biases and ``softmax``.
Weights are random (He-scaled so activations stay O(1) through 94 layers). ``width`` scales every layer's channels:
1.0 gives the real shapes (2048-d pool_3, 192-channel mixed_6/conv, 1008 classes, ~24M weights) for timing;
tests use a narrow graph with the same nodes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_DT_FLOAT, _DT_INT32, _DT_UINT8, _DT_STRING = 1, 3, 4, 7
PRODUCER_VERSION = 8  # BatchNormWithGlobalNormalization is rejected from GraphDef version 9 on


class _Type(int):
    """Marks an attribute value as a DataType enum rather than an int."""


class _Writer:
    def __init__(self, width: float, seed: int, bn_scale_every: int):
        from tensorboard.compat.proto import graph_pb2
        self.graph = graph_pb2.GraphDef()
        self.graph.versions.producer = PRODUCER_VERSION
        self.rng = np.random.default_rng(seed)
        self.width = width
        self.bn_scale_every = bn_scale_every  # vary scale_after_normalization so both variants are exercised
        self.layers = 0

    def ch(self, n: int) -> int:
        return max(1, round(n * self.width))

    def node(self, name: str, op: str, inputs=(), **attrs) -> str:
        n = self.graph.node.add(name=name, op=op)
        n.input.extend(inputs)
        for key, value in attrs.items():
            a = n.attr[key]
            if isinstance(value, _Type):
                a.type = int(value)
            elif isinstance(value, bool):
                a.b = value
            elif isinstance(value, int):
                a.i = value
            elif isinstance(value, float):
                a.f = value
            elif isinstance(value, (str, bytes)):
                a.s = value.encode() if isinstance(value, str) else value
            elif isinstance(value, list):
                a.list.i.extend(value)
            elif isinstance(value, np.ndarray):
                self._tensor(a.tensor, value)
            else:
                raise TypeError(f"attribute {key}={value!r}")
        return name

    @staticmethod
    def _tensor(t, value: np.ndarray) -> None:
        if value.dtype == object:  # the JPEG contents placeholder: one empty string
            t.dtype = _DT_STRING
            t.string_val.extend(value.ravel().tolist())
        else:
            t.dtype = {np.float32: _DT_FLOAT, np.int32: _DT_INT32}[value.dtype.type]
            if value.ndim == 0:  # scalars the way TF writes them: in the typed list, not as raw bytes
                (t.float_val if t.dtype == _DT_FLOAT else t.int_val).append(value.item())
            else:
                t.tensor_content = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
        for size in value.shape:
            t.tensor_shape.dim.add(size=size)

    def const(self, name: str, value) -> str:
        value = np.asarray(value)
        dtype = _DT_STRING if value.dtype == object else {np.float32: _DT_FLOAT, np.int32: _DT_INT32}[value.dtype.type]
        return self.node(name, "Const", dtype=_Type(dtype), value=value)

    def checked(self, name: str, x: str) -> str:
        """CheckNumerics + control-dependency Identity in front of a layer, as the real graph does."""
        check = self.node(f"{name}/CheckNumerics", "CheckNumerics", [x], T=_Type(_DT_FLOAT), message=name)
        return self.node(f"{name}/control_dependency", "Identity", [x, f"^{check}"], T=_Type(_DT_FLOAT))

    def conv(self, name: str, x: tuple[str, int], out: int, k=(3, 3), stride=1, padding="SAME") -> tuple[str, int]:
        src, cin = x
        cout = self.ch(out)
        kh, kw = (k, k) if isinstance(k, int) else k
        w = self.rng.standard_normal((kh, kw, cin, cout), dtype=np.float32) * np.float32(np.sqrt(2 / (kh * kw * cin)))
        y = self.node(f"{name}/Conv2D", "Conv2D", [src, self.const(f"{name}/conv2d_params", w)], T=_Type(_DT_FLOAT),
                      strides=[1, stride, stride, 1], padding=padding, use_cudnn_on_gpu=True)
        bn = [self.const(f"{name}/batchnorm/{p}", v.astype(np.float32)) for p, v in (
            ("beta", self.rng.normal(0.1, 0.1, cout)), ("gamma", self.rng.uniform(0.7, 1.3, cout)),
            ("moving_mean", self.rng.normal(0, 0.2, cout)), ("moving_variance", self.rng.uniform(0.5, 1.5, cout)))]
        self.layers += 1
        y = self.node(f"{name}/batchnorm", "BatchNormWithGlobalNormalization", [y, bn[2], bn[3], bn[0], bn[1]],
                      T=_Type(_DT_FLOAT), variance_epsilon=0.001,
                      scale_after_normalization=self.layers % self.bn_scale_every != 0)
        return self.node(name, "Relu", [self.checked(name, y)], T=_Type(_DT_FLOAT)), cout

    def pool(self, name: str, x: tuple[str, int], op: str, k=3, stride=1, padding="SAME") -> tuple[str, int]:
        y = self.node(name, op, [self.checked(name, x[0])], T=_Type(_DT_FLOAT), ksize=[1, k, k, 1],
                      strides=[1, stride, stride, 1], padding=padding)
        return y, x[1]

    def concat(self, name: str, xs: list[tuple[str, int]]) -> tuple[str, int]:
        dim = self.const(f"{name}/concat_dim", np.int32(3))
        return self.node(name, "Concat", [dim, *(x[0] for x in xs)], T=_Type(_DT_FLOAT), N=len(xs)), \
            sum(x[1] for x in xs)


def _block_35(w: _Writer, s: str, x, pool_out: int):
    a = w.conv(f"{s}/conv", x, 64, 1)
    b = w.conv(f"{s}/tower/conv_1", w.conv(f"{s}/tower/conv", x, 48, 1), 64, 5)
    c = w.conv(f"{s}/tower_1/conv", x, 64, 1)
    c = w.conv(f"{s}/tower_1/conv_2", w.conv(f"{s}/tower_1/conv_1", c, 96, 3), 96, 3)
    d = w.conv(f"{s}/tower_2/conv", w.pool(f"{s}/tower_2/pool", x, "AvgPool"), pool_out, 1)
    return w.concat(f"{s}/join", [a, b, c, d])


def _block_17(w: _Writer, s: str, x, mid: int):
    a = w.conv(f"{s}/conv", x, 192, 1)
    b = w.conv(f"{s}/tower/conv", x, mid, 1)
    b = w.conv(f"{s}/tower/conv_2", w.conv(f"{s}/tower/conv_1", b, mid, (1, 7)), 192, (7, 1))
    c = w.conv(f"{s}/tower_1/conv", x, mid, 1)
    for i, (out, k) in enumerate(((mid, (7, 1)), (mid, (1, 7)), (mid, (7, 1)), (192, (1, 7))), start=1):
        c = w.conv(f"{s}/tower_1/conv_{i}", c, out, k)
    d = w.conv(f"{s}/tower_2/conv", w.pool(f"{s}/tower_2/pool", x, "AvgPool"), 192, 1)
    return w.concat(f"{s}/join", [a, b, c, d])


def _block_8(w: _Writer, s: str, x, pool_op: str):
    a = w.conv(f"{s}/conv", x, 320, 1)
    b = w.conv(f"{s}/tower/conv", x, 384, 1)
    b = w.concat(f"{s}/tower/mixed", [w.conv(f"{s}/tower/mixed/conv", b, 384, (1, 3)),
                                      w.conv(f"{s}/tower/mixed/conv_1", b, 384, (3, 1))])
    c = w.conv(f"{s}/tower_1/conv_1", w.conv(f"{s}/tower_1/conv", x, 448, 1), 384, 3)
    c = w.concat(f"{s}/tower_1/mixed", [w.conv(f"{s}/tower_1/mixed/conv", c, 384, (1, 3)),
                                        w.conv(f"{s}/tower_1/mixed/conv_1", c, 384, (3, 1))])
    d = w.conv(f"{s}/tower_2/conv", w.pool(f"{s}/tower_2/pool", x, pool_op), 192, 1)
    return w.concat(f"{s}/join", [a, b, c, d])


def standin_graph_def(width: float = 1.0, seed: int = 0, num_classes: int = 1008, bn_scale_every: int = 5,
                      resize: int = 299):
    """The stand-in as a GraphDef message (see the module docstring). ``resize`` other than 299 (at least 75)
    shrinks every feature map, e.g. 139: mixed_6 7x7 (a 343-d sFID feature instead of 2023) and pool_3 3x3, for
    end-to-end tests whose time would otherwise go into the 2023 x 2023 matrix square root."""
    if resize < 75:
        raise ValueError(f"resize={resize}: Inception-v3 needs at least 75x75")
    final = resize  # the last feature map's side: VALID 3x3 layers, stride 2 or 1 (8 at 299)
    for stride in (2, 1, 2, 1, 2, 2, 2):  # conv, conv_1, pool, conv_4, pool_1, mixed_3, mixed_8
        final = (final - 3) // stride + 1
    w = _Writer(width, seed, bn_scale_every)
    x = w.node("DecodeJpeg", "DecodeJpeg", [w.const("DecodeJpeg/contents", np.array(b"", dtype=object))],
               channels=3, ratio=1, fancy_upscaling=True, try_recover_truncated=False, acceptable_fraction=1.0)
    x = w.node("Cast", "Cast", [x], SrcT=_Type(_DT_UINT8), DstT=_Type(_DT_FLOAT))
    x = w.node("ExpandDims", "ExpandDims", [x, w.const("ExpandDims/dim", np.int32(0))],
               T=_Type(_DT_FLOAT), Tdim=_Type(_DT_INT32))
    size = w.const("ResizeBilinear/size", np.array([resize, resize], np.int32))
    x = w.node("ResizeBilinear", "ResizeBilinear", [x, size], T=_Type(_DT_FLOAT), align_corners=False)
    x = w.node("Sub", "Sub", [x, w.const("Sub/y", np.float32(128))], T=_Type(_DT_FLOAT))
    x = (w.node("Mul", "Mul", [x, w.const("Mul/y", np.float32(1 / 128))], T=_Type(_DT_FLOAT)), 3)
    x = w.conv("conv", x, 32, 3, stride=2, padding="VALID")
    x = w.conv("conv_2", w.conv("conv_1", x, 32, 3, padding="VALID"), 64, 3)
    x = w.pool("pool", x, "MaxPool", 3, 2, "VALID")
    x = w.conv("conv_4", w.conv("conv_3", x, 80, 1, padding="VALID"), 192, 3, padding="VALID")
    x = w.pool("pool_1", x, "MaxPool", 3, 2, "VALID")
    for s, pool_out in (("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)):
        x = _block_35(w, s, x, pool_out)
    t = w.conv("mixed_3/tower/conv", x, 64, 1)
    t = w.conv("mixed_3/tower/conv_2", w.conv("mixed_3/tower/conv_1", t, 96, 3), 96, 3, stride=2, padding="VALID")
    x = w.concat("mixed_3/join", [w.conv("mixed_3/conv", x, 384, 3, stride=2, padding="VALID"), t,
                                  w.pool("mixed_3/pool", x, "MaxPool", 3, 2, "VALID")])
    for s, mid in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
        x = _block_17(w, s, x, mid)
    a = w.conv("mixed_8/tower/conv_1", w.conv("mixed_8/tower/conv", x, 192, 1), 320, 3, stride=2, padding="VALID")
    b = w.conv("mixed_8/tower_1/conv", x, 192, 1)
    for i, (k, stride, pad) in enumerate((((1, 7), 1, "SAME"), ((7, 1), 1, "SAME"), (3, 2, "VALID")), start=1):
        b = w.conv(f"mixed_8/tower_1/conv_{i}", b, 192, k, stride, pad)
    x = w.concat("mixed_8/join", [a, b, w.pool("mixed_8/pool", x, "MaxPool", 3, 2, "VALID")])
    x = _block_8(w, "mixed_9", x, "AvgPool")
    x = _block_8(w, "mixed_10", x, "MaxPool")  # the 2015 graph max-pools in this block's pool branch
    pool, dim = w.pool("pool_3", x, "AvgPool", final, 1, "VALID")  # 8x8 at 299
    flat = w.node("pool_3/_reshape", "Reshape", [pool, w.const("pool_3/_reshape/shape", np.array([1, dim], np.int32))],
                  T=_Type(_DT_FLOAT), Tshape=_Type(_DT_INT32))
    weights = w.rng.standard_normal((dim, num_classes), dtype=np.float32) * np.float32(1 / np.sqrt(dim))
    logits = w.node("softmax/logits/MatMul", "MatMul", [flat, w.const("softmax/weights", weights)],
                    T=_Type(_DT_FLOAT), transpose_a=False, transpose_b=False)
    logits = w.node("softmax/logits", "BiasAdd",
                    [logits, w.const("softmax/biases", w.rng.normal(0, 0.1, num_classes).astype(np.float32))],
                    T=_Type(_DT_FLOAT))
    w.node("softmax", "Softmax", [logits], T=_Type(_DT_FLOAT))
    return w.graph


def write_standin_graph(path: str | os.PathLike, width: float = 1.0, seed: int = 0, **kwargs) -> Path:
    """standin_graph_def(width, seed, **kwargs) serialised to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(standin_graph_def(width, seed, **kwargs).SerializeToString())
    return path
