"""The evaluator's torch backend against TensorFlow: each op type of the Inception graph on its own, then a stand-in
with the real graph's layout (benchmarks/standin.py: its node names, op types, BatchNormWithGlobalNormalization in
a producer-8 GraphDef, random weights), features and the five numbers; the CLI in a process where `import
tensorflow` fails; the conversion cache, one-line errors, backend choice, the benchmark script."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations import graphdef, metrics
from evaluations.inception import GRAPH_FILENAME, choose_backend
from evaluations.inception_torch import (TorchBackendConfig, TorchInception, _squared_distances, exact_float32,
                                         load_converted)
from evaluations.errors import EvaluatorInputError
from evaluations.npz_stream import prefetch
from evaluations.torch_graph import TorchGraph
from benchmarks.standin import write_standin_graph
from helpers import LABELS, parse_numbers, photo_crops, run_cli

try:  # the comparisons need TensorFlow; the rest (CUDA check included) runs on machines without it
    import tensorflow.compat.v1 as tf
except ImportError:
    tf = None
needs_tf = pytest.mark.skipif(tf is None, reason="needs TensorFlow")
pytestmark = pytest.mark.usefixtures("private_cache")
WIDTH = 0.125  # stand-in channels / 8: every node of the real graph, ~1/64 of its compute



def tf_run(graph_def_bytes, input_name, outputs, x):
    gd = tf.GraphDef()
    gd.ParseFromString(graph_def_bytes)
    with tf.Graph().as_default():
        inp = tf.placeholder(tf.float32, [None] * x.ndim)
        tensors = tf.import_graph_def(gd, input_map={input_name: inp}, return_elements=outputs)
        with tf.Session() as sess:
            return sess.run(tensors, {inp: x})


def torch_run(graph_def_bytes, input_name, outputs, x, simplify=True):
    from tensorboard.compat.proto import graph_pb2
    gd = graph_pb2.GraphDef()
    gd.ParseFromString(graph_def_bytes)
    program = graphdef.extract_program(gd, input_name, outputs)
    graph = TorchGraph(graphdef.simplify(program) if simplify else program)
    with torch.inference_mode():
        out = graph(torch.from_numpy(x))
    return [out[graphdef.tensor_ref(o)].numpy() for o in outputs]


def assert_close(got, want, rel=1e-5):
    """Within `rel` of the largest magnitude: float32 rounding in a different summation order, nothing more."""
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1e-6)
    assert float(np.abs(got - want).max()) <= rel * scale, (np.abs(got - want).max(), scale)


# ---------------------------------------------------------------- single ops against TensorFlow

def _op_graph(build, shape):
    g = tf.Graph()
    with g.as_default():
        x = tf.placeholder(tf.float32, [None, *shape[1:]], name="x")
        build(x, np.random.default_rng(1))
    return g.as_graph_def().SerializeToString()


def _conv(padding, stride, k=(3, 3), dilation=1):
    def build(x, rng):
        w = tf.constant(rng.normal(0, 0.3, (*k, int(x.shape[-1]), 5)), tf.float32)
        tf.nn.conv2d(x, w, [1, stride, stride, 1], padding, dilations=[1, dilation, dilation, 1], name="y")
    return build


def _pool(op, k, stride, padding):
    return lambda x, rng: getattr(tf.nn, op)(x, [1, k, k, 1], [1, stride, stride, 1], padding, name="y")


OP_CASES = {
    # ResizeBilinear, TF1 semantics: ADM's 256 -> 299, a downscale, odd and non-square sizes, both other modes.
    "resize_256_to_299": ((2, 256, 256, 3), lambda x, r: tf.image.resize_bilinear(x, [299, 299], name="y")),
    "resize_64x48_to_299": ((2, 64, 48, 3), lambda x, r: tf.image.resize_bilinear(x, [299, 299], name="y")),
    "resize_320_to_299": ((1, 320, 301, 3), lambda x, r: tf.image.resize_bilinear(x, [299, 299], name="y")),
    "resize_align_corners": ((2, 17, 23, 3), lambda x, r: tf.image.resize_bilinear(x, [40, 31], True, name="y")),
    "resize_half_pixel": ((2, 17, 23, 3), lambda x, r: tf.raw_ops.ResizeBilinear(
        images=x, size=[40, 31], half_pixel_centers=True, name="y")),
    # Conv2D: SAME with an odd total padding (TF puts the extra row/column last), VALID, 1x7, dilation.
    "conv_same_stride2_even": ((2, 16, 16, 3), _conv("SAME", 2)),
    "conv_same_stride2_odd": ((2, 15, 15, 3), _conv("SAME", 2)),
    "conv_valid_stride2": ((2, 15, 16, 3), _conv("VALID", 2)),
    "conv_same_1x7": ((2, 9, 9, 4), _conv("SAME", 1, (1, 7))),
    "conv_same_dilated": ((2, 12, 12, 3), _conv("SAME", 1, dilation=2)),
    # Pools: SAME average divides by the real pixels only; SAME max ignores the padding.
    "avgpool_same_3x3": ((2, 9, 9, 4), _pool("avg_pool", 3, 1, "SAME")),
    "avgpool_same_stride2_asym": ((2, 10, 10, 4), _pool("avg_pool", 3, 2, "SAME")),
    "avgpool_valid_8x8": ((2, 8, 8, 4), _pool("avg_pool", 8, 1, "VALID")),
    "maxpool_same_stride2_asym": ((2, 10, 10, 4), _pool("max_pool", 3, 2, "SAME")),
    "maxpool_valid": ((2, 11, 11, 4), _pool("max_pool", 3, 2, "VALID")),
    # Elementwise with constants of every rank, concat on the channel axis (ConcatV2; Concat is in the stand-in).
    "sub_mul_add_broadcast": ((2, 5, 6, 3), lambda x, r: tf.add(
        tf.multiply(tf.subtract(x, 128.0), tf.constant(r.normal(size=3), tf.float32)),
        tf.constant(r.normal(size=(5, 6, 3)), tf.float32), name="y")),
    "concat_relu_channels": ((2, 5, 6, 3), lambda x, r: tf.nn.relu(tf.concat([x - 100.0, x * 2.0, x], -1), name="y")),
    # TF1's Add (tf.add now writes AddV2) and RealDiv (x / y), as older exports hold them
    "add_v1_realdiv": ((2, 5, 6, 3), lambda x, r: tf.raw_ops.RealDiv(
        x=tf.raw_ops.Add(x=x, y=tf.constant(r.normal(size=3), tf.float32)),
        y=tf.constant(r.uniform(1, 2, size=(6, 3)), tf.float32), name="y")),
    # The head: Reshape of a 4-D tensor (NHWC order), MatMul, BiasAdd, Softmax.
    "reshape_matmul_softmax": ((2, 2, 3, 4), lambda x, r: tf.nn.softmax(tf.nn.bias_add(
        tf.matmul(tf.reshape(x, [-1, 24]), tf.constant(r.normal(size=(24, 7)), tf.float32)),
        tf.constant(r.normal(size=7), tf.float32)), name="y")),
}


@needs_tf
@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_tensorflow(case):
    shape, build = OP_CASES[case]
    x = (np.random.default_rng(2).random(shape, dtype=np.float32) * 255).astype(np.float32)
    graph = _op_graph(build, shape)
    (want,) = tf_run(graph, "x:0", ["y:0"], x)
    (got,) = torch_run(graph, "x:0", ["y:0"], x)
    if case.startswith("resize"):
        # TF's CPU kernel and ours do the same float32 operations in the same order.
        np.testing.assert_array_equal(got, want)
    else:
        assert_close(got, want)


@needs_tf
def test_unsupported_op_is_named_in_one_line():
    graph = _op_graph(lambda x, r: tf.math.erf(x, name="y"), (1, 4))
    with pytest.raises(graphdef.GraphFormatError) as err:
        torch_run(graph, "x:0", ["y:0"], np.zeros((1, 4), np.float32))
    assert "\n" not in str(err.value) and "op Erf (node 'y')" in str(err.value)


@needs_tf
def test_constants_decode_like_tensorflow():
    """tensor_content, scalars in float_val, a short value list (TF repeats the last value), ints, halves."""
    values = {"raw": np.arange(12, dtype=np.float32).reshape(3, 4), "scalar": np.float32(0.0078125),
              "filled": np.full((2, 3), 7, np.int32), "half": np.array([1.5, -2.25], np.float16),
              "int64": np.array([2 ** 40, -3], np.int64)}
    g = tf.Graph()
    with g.as_default():
        for name, v in values.items():
            tf.constant(v, name=name)
    gd = g.as_graph_def()
    nodes = {n.name: n for n in gd.node}
    from tensorboard.compat.proto import tensor_pb2
    for name, v in values.items():
        proto = tensor_pb2.TensorProto.FromString(nodes[name].attr["value"].tensor.SerializeToString())
        got = graphdef.tensor_to_numpy(proto)
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got, tf.make_ndarray(nodes[name].attr["value"].tensor))


# ---------------------------------------------------------------- the stand-in graph

@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin_graph(tmp_path_factory.mktemp("standin") / GRAPH_FILENAME, width=WIDTH)


@needs_tf
def test_every_op_of_the_torch_backend_is_compared_with_tensorflow(standin):
    """What the single-op cases and the stand-in are for: between them, the comparisons with TensorFlow above and
    below run every op the torch backend implements (an op added to torch_graph.OPS without one fails here), and
    the stand-in holds the ops only the real graph has (BatchNormWithGlobalNormalization, which TensorFlow refuses
    beyond GraphDef producer 8; the old Concat; CheckNumerics)."""
    from tensorboard.compat.proto import graph_pb2
    from evaluations.torch_graph import OPS

    real_only = {n.op for n in graphdef.read_graph_def(standin).node}
    assert {"BatchNormWithGlobalNormalization", "Concat", "CheckNumerics"} <= real_only
    assert graphdef.read_graph_def(standin).versions.producer < 9
    covered = set(real_only)
    for shape, build in OP_CASES.values():
        gd = graph_pb2.GraphDef()
        gd.ParseFromString(_op_graph(build, shape))
        covered |= {n.op for n in gd.node}
    assert set(OPS) <= covered, sorted(set(OPS) - covered)


@needs_tf
@pytest.mark.parametrize("size", [256, 299, 64])
def test_standin_features_match_tensorflow(standin, size):
    from evaluations.inception_tf import TFInception
    images = np.random.default_rng(size).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    torch_net = TorchInception(standin, TorchBackendConfig(device="cpu"))
    with TFInception(standin) as tf_net:
        want = tf_net.features(images)
        np.testing.assert_array_equal(torch_net.softmax_weights, tf_net.softmax_weights)
    got = torch_net.features(images)
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        assert_close(g, w, rel=1e-5)


@needs_tf
def test_standin_softmax_head_matches_tensorflow(standin):
    """The ops ADM does not feed through (Reshape to [1, 2048], MatMul, BiasAdd, Softmax) on the real layout, with
    the batchnorms left unfolded this time."""
    x = np.random.default_rng(3).integers(0, 256, (1, 256, 256, 3)).astype(np.float32)
    data = Path(standin).read_bytes()
    outputs = ["softmax:0", "mixed/join:0"]
    for got, want in zip(torch_run(data, "ExpandDims:0", outputs, x, simplify=False),
                         tf_run(data, "ExpandDims:0", outputs, x)):
        assert_close(got, want)


@pytest.fixture(scope="module")
def small_standin(tmp_path_factory):
    """The same nodes at 139x139 (343-d sFID features): end to end, the 2023-d matrix square roots of the full-size
    stand-in would take minutes on a small CPU."""
    return write_standin_graph(tmp_path_factory.mktemp("small") / GRAPH_FILENAME, width=WIDTH, resize=139)


@pytest.fixture(scope="module")
def photo_npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    np.savez(d / "ref.npz", photo_crops(80)[:40])
    np.savez(d / "sample.npz", photo_crops(80, offset=37)[4:40])
    return d


@needs_tf
def test_cli_without_tensorflow_prints_adm_numbers(small_standin, photo_npz, tmp_path):
    """The issue's acceptance test: with `import tensorflow` failing, --backend torch prints the numbers of the
    TensorFlow path (ADM's evaluator, reproduced) on the same graph, to 1e-4 relative.

    Precision/recall hang on float16 distances compared with float16 radii. TensorFlow's float16 matmul accumulates
    in float32 on every device, but its *CPU* reduce_sum (the squared norms) partly accumulates in float16 (Eigen
    packets), so TF on a CPU can differ from TF on a GPU by a float16 ulp, enough to move a borderline sample. The
    torch backend rounds once after float32 accumulation, like the GPU; so its precision/recall are checked against
    ADM's arithmetic with that accumulation, on TensorFlow's own features."""
    from evaluations.evaluator import evaluate
    from evaluations.inception_tf import TFInception
    ref, sample = photo_npz / "ref.npz", photo_npz / "sample.npz"
    want = evaluate(str(ref), str(sample), small_standin, backend="tf")
    with TFInception(small_standin) as net:
        tf_ref, tf_sample = (net.activations([np.load(p)["arr_0"]])[0] for p in (ref, sample))
    want_pr = metrics.precision_recall(tf_ref, tf_sample)  # ManifoldEstimator's default: numpy float16 emulation

    blocker = tmp_path / "block"
    (blocker / "tensorflow").mkdir(parents=True)
    (blocker / "tensorflow" / "__init__.py").write_text("raise ImportError('TensorFlow is blocked in this test')\n")
    proc = run_cli(ref, sample, "--inception-graph", small_standin, "--backend", "torch", cwd=tmp_path,
                   env_extra={"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr
    assert "Inception backend: torch" in proc.stdout
    got = parse_numbers(proc.stdout)
    assert list(got) == list(LABELS)
    for label, value in zip(LABELS, (*want[:3], *want_pr)):
        assert got[label] == pytest.approx(value, rel=1e-4, abs=1e-12), label
    assert got["FID"] > 0.01 and got["sFID"] > 1  # different image sets: a comparison of non-trivial numbers
    # TensorFlow's CPU distances: at most one borderline sample of 36/40 either way.
    assert abs(got["Precision"] - want.precision) <= 1 / 36 + 1e-9 and abs(got["Recall"] - want.recall) <= 1 / 40 + 1e-9


# ---------------------------------------------------------------- backend plumbing

def test_conversion_is_cached_by_sha256(standin, tmp_path, capsys):
    program, softmax, source = load_converted(standin, tmp_path)
    assert source.startswith("converted, cached")
    assert {n.op for n in program.nodes} == {"ResizeBilinear", "Sub", "Mul", "Conv2D", "Relu", "MaxPool", "AvgPool",
                                             "Concat"}  # batchnorms folded, CheckNumerics/Identity gone
    again, softmax2, source2 = load_converted(standin, tmp_path)
    assert source2.startswith("cache ")
    assert again.to_json() == program.to_json()
    assert all(np.array_equal(again.consts[k], v) for k, v in program.consts.items())
    np.testing.assert_array_equal(softmax2, softmax)
    entry = next(tmp_path.glob("*.safetensors"))
    entry.write_bytes(b"not safetensors")  # a damaged entry is converted again and replaced
    assert load_converted(standin, tmp_path)[2].startswith("converted")
    assert "unreadable cache entry" in capsys.readouterr().err
    other = write_standin_graph(tmp_path / "other.pb", width=WIDTH, seed=1)  # another file: another entry
    assert load_converted(other, tmp_path)[2].startswith("converted")
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_unwritable_cache_only_warns(standin, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder should be
    program, _, source = load_converted(standin, blocked / "sub")
    assert source == "converted (not cached)" and program.nodes
    assert "cannot cache" in capsys.readouterr().err


def test_choose_backend(monkeypatch):
    assert choose_backend("torch")[0] == "torch" and choose_backend("tf")[0] == "tf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto")[0] == ("torch" if tf is None else "tf")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # now `import tensorflow` fails
    name, why = choose_backend("auto")
    assert name == "torch" and "TensorFlow cannot be imported" in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto") == ("torch", "a GPU is present")


def test_tf_backend_without_tensorflow_is_one_line(standin, monkeypatch):
    from evaluations.inception import open_backend
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(EvaluatorInputError, match="--backend tf needs TensorFlow.*--backend torch") as err:
        open_backend("tf", standin)
    assert "\n" not in str(err.value)


def test_device_errors(standin):
    with pytest.raises(EvaluatorInputError, match="--device nonsense"):
        TorchInception(standin, TorchBackendConfig(device="nonsense"))
    if not torch.cuda.is_available():
        with pytest.raises(EvaluatorInputError, match="CUDA is not available"):
            TorchInception(standin, TorchBackendConfig(device="cuda"))


def test_exact_float32_switches_tf32_off_and_restores():
    b = torch.backends
    read = (lambda: (b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.benchmark)) \
        if hasattr(b.cuda.matmul, "fp32_precision") else \
        (lambda: (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark))
    before = read()
    with exact_float32(torch.device("cuda")):  # only flips flags, so it runs without a GPU too
        inside = read()
    assert read() == before
    assert inside[:2] in (("ieee", "ieee"), (False, False)) and inside[2] is True
    with exact_float32(torch.device("cpu")):
        assert read() == before


def norm_ulps(u, v, count=3):
    return count * float(np.spacing(np.float16(max(np.square(u).sum(1).max(), np.square(v).sum(1).max()))))


def test_torch_distances_match_numpy_emulation():
    rng = np.random.default_rng(8)
    u, v = rng.random((9, 64), dtype=np.float32) * 4, rng.random((6, 64), dtype=np.float32) * 4
    want = metrics._squared_distances(u, v, np.float16)
    got = _squared_distances(torch.from_numpy(u).half(), torch.from_numpy(v).half()).numpy()
    assert got.dtype == np.float16
    # Same roundings; only the float32 accumulation order of the norms and the matmul may differ, which can flip a
    # float16 rounding: at most an ulp of the largest norm per term.
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=norm_ulps(u, v))


def test_prefetch_keeps_order_and_raises_in_order():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise EvaluatorInputError("broken batch")
    got = []
    with pytest.raises(EvaluatorInputError, match="broken batch"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1, 2]
    early = prefetch(iter(range(1000)), depth=2)
    assert next(early) == 0
    early.close()  # the reader thread stops instead of blocking on a full queue


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_match_cpu(standin):
    images = np.random.default_rng(4).integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)
    cpu = TorchInception(standin, TorchBackendConfig(device="cpu")).features(images)
    for channels_last in (False, True):
        gpu = TorchInception(standin, TorchBackendConfig(device="cuda", batch_size=8, channels_last=channels_last))
        for g, c in zip(gpu.features(images), cpu):
            assert_close(g, c, rel=2e-5)
        u = np.random.default_rng(5).random((300, 256), dtype=np.float32)
        np.testing.assert_allclose(gpu.pairwise_distances(u, u[:100]), metrics.numpy_pairwise_distances(u, u[:100]),
                                   rtol=0, atol=norm_ulps(u, u))
        big = u * 300  # float16 overflow: the block is redone in float32
        np.testing.assert_allclose(gpu.pairwise_distances(big, u), metrics.numpy_pairwise_distances(big, u), rtol=1e-5)


def test_benchmark_script_prints_one_line_per_backend(capsys, tmp_path, monkeypatch):
    from benchmarks import evaluator as bench
    monkeypatch.chdir(tmp_path)  # no real graph to find: the benchmark builds its stand-in
    monkeypatch.delenv("INCEPTION_GRAPH", raising=False)
    results = bench.main(["--device", "cpu", "--width", str(WIDTH), "--images", "4", "--batch-size", "2",
                          "--image-size", "64"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [ln["backend"] for ln in lines] == ["torch", "tf"] and lines == [
        {"benchmark": "evaluator", "graph": f"stand-in, width {WIDTH}", "image_size": 64, "batch_size": 2, **r}
        for r in results]
    for ln in lines if tf is not None else lines[:1]:
        assert ln["images"] == 4 and ln["images_per_s"] > 0 and ln["minutes_per_60k"] > 0
    if tf is None:
        assert lines[1]["skipped"].startswith("TensorFlow cannot be imported")
