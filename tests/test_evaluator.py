"""evaluations/: metric arithmetic against independent computations, npz streaming, one-line input errors, and the
TensorFlow plumbing end to end on a tiny stand-in for the Inception graph (the real one cannot be downloaded here)."""
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy import special

from evaluations import metrics
from evaluations.inception import GRAPH_FILENAME, GRAPH_URL, find_inception_graph
from evaluations.errors import EvaluatorInputError
from evaluations.npz_stream import iter_batches, validate_images
from helpers import LABELS, NUM_CLASSES, POOL_DIM, parse_numbers, photo_crops, run_cli, write_fake_inception

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("private_cache")


# ---------------------------------------------------------------- FID

def test_fid_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = metrics.frechet_distance(metrics.FIDStatistics(mu1, np.diag(v1)), metrics.FIDStatistics(mu2, np.diag(v2)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_full_covariances_against_eigenvalues():
    # Tr sqrt(S1 S2) = sum of the square roots of the (real, non-negative) eigenvalues of S1 S2.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = metrics.frechet_distance(metrics.FIDStatistics(mu1, s1), metrics.FIDStatistics(mu2, s2))
    assert got == pytest.approx(expected, rel=1e-8)
    same = metrics.FIDStatistics(mu1, s1)
    assert metrics.frechet_distance(same, same) == pytest.approx(0, abs=1e-9)


def test_statistics_and_singular_covariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    stats = metrics.compute_statistics(x)
    assert stats.mu.dtype == np.float32  # ADM keeps the float32 mean
    np.testing.assert_allclose(stats.sigma, (x - x.mean(0)).T.astype(np.float64) @ (x - x.mean(0)) / 49, rtol=1e-5)
    # Fewer samples than dimensions: rank-deficient covariances must still give a finite, ~zero self-distance.
    few = metrics.compute_statistics(rng.normal(size=(3, 8)))
    assert np.isfinite(metrics.frechet_distance(few, few))
    assert abs(metrics.frechet_distance(few, few)) < 1e-3


# ---------------------------------------------------------------- Inception Score

def test_inception_score_constructed():
    # Confident and uniformly spread: IS -> number of classes C. Exact one-hot rows would give 0 * log 0 = nan (as
    # in ADM), so every row puts e on the other classes: KL = (1-(C-1)e) log(C (1-(C-1)e)) + (C-1)e log(C e).
    def near_one_hot(c, e=1e-6):
        probs = (np.eye(c) * (1 - c * e) + e).astype(np.float32)
        return probs, np.exp((1 - (c - 1) * e) * np.log(c * (1 - (c - 1) * e)) + (c - 1) * e * np.log(c * e))

    probs, expected = near_one_hot(10)
    assert metrics.inception_score(probs) == pytest.approx(expected, rel=1e-5)
    assert metrics.inception_score(probs) == pytest.approx(10, rel=1e-3)
    same = np.tile(special.softmax(np.arange(10.0)), (7, 1)).astype(np.float32)  # no information: IS = 1
    assert metrics.inception_score(same) == pytest.approx(1, rel=1e-5)
    # Splits of split_size rows are scored separately and averaged: (~4 + 1) / 2.
    probs4, expected4 = near_one_hot(4)
    split = np.concatenate([probs4, np.full((4, 4), 0.25, np.float32)])
    assert metrics.inception_score(split, split_size=4) == pytest.approx((expected4 + 1) / 2, rel=1e-5)


def test_inception_score_random_against_kl():
    rng = np.random.default_rng(3)
    p = special.softmax(rng.normal(size=(30, 7)) * 2, axis=1)
    kl = special.rel_entr(p, p.mean(0, keepdims=True)).sum(1)
    assert metrics.inception_score(p.astype(np.float32)) == pytest.approx(np.exp(kl.mean()), rel=1e-5)


def test_softmax_probabilities_use_weights_without_bias():
    rng = np.random.default_rng(4)
    pool, w = rng.normal(size=(11, 6)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    probs = metrics.softmax_probabilities(pool, w, batch_size=4)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, special.softmax(pool.astype(np.float64) @ w, axis=1), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- precision / recall

def line(xs):
    return np.stack([np.asarray(xs, np.float32), np.zeros(len(xs), np.float32)], axis=1)


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(20, 8)).astype(np.float32)
    assert metrics.precision_recall(a, a.copy()) == (1.0, 1.0)
    # ~1000 apart: the float16 norms overflow, so this also runs the float32 fallback.
    far = (a + 1000).astype(np.float32)
    assert metrics.precision_recall(a, far) == (0.0, 0.0)


def test_precision_recall_subset_by_hand():
    # Reference: 0..7 on a line. Squared 3-NN radii (the point itself is neighbour 0): 9 at the ends, 4 inside.
    ref, sample = line(range(8)), line([0, 1, 2, 3])
    est = metrics.ManifoldEstimator()
    np.testing.assert_array_equal(est.manifold_radii(ref)[:, 0], [9, 4, 4, 4, 4, 4, 4, 9])
    # Samples are reference points: precision 1. Sample radii are 9, 4, 4, 9, so point 3 covers 4, 5 and 6
    # (6 exactly on the boundary: ADM uses <=) but not 7: recall 7/8.
    assert metrics.precision_recall(ref, sample) == (1.0, 0.875)


def test_precision_recall_independent_of_block_sizes():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(23, 5)).astype(np.float32)
    sample = (rng.normal(size=(17, 5)) * 1.3 + 0.4).astype(np.float32)
    small = metrics.ManifoldEstimator(row_batch_size=4, col_batch_size=7)
    big = metrics.ManifoldEstimator()
    np.testing.assert_array_equal(small.manifold_radii(ref), big.manifold_radii(ref))
    p, r = metrics.precision_recall(ref, sample, small)
    assert (p, r) == metrics.precision_recall(ref, sample, big)
    assert 0 < p < 1 and 0 < r < 1


def test_pairwise_distances_float16_and_fallback():
    rng = np.random.default_rng(7)
    u, v = rng.random((9, 64), dtype=np.float32), rng.random((6, 64), dtype=np.float32)
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    d = metrics.numpy_pairwise_distances(u, v)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, exact, rtol=5e-3, atol=0.1)  # float16 precision
    big = u * 300  # squared norms above float16's 65504: recomputed in float32
    exact_big = ((big[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    np.testing.assert_allclose(metrics.numpy_pairwise_distances(big, v), exact_big, rtol=1e-4)


def test_tensorflow_distances_match_numpy():
    pytest.importorskip("tensorflow")
    from evaluations.inception_tf import TFPairwiseDistances
    rng = np.random.default_rng(8)
    u, v = rng.random((9, 64), dtype=np.float32), rng.random((6, 64), dtype=np.float32)
    tfd = TFPairwiseDistances()
    try:
        np.testing.assert_allclose(tfd(u, v), metrics.numpy_pairwise_distances(u, v), rtol=5e-3, atol=0.1)
        np.testing.assert_allclose(tfd(u * 300, v), metrics.numpy_pairwise_distances(u * 300, v), rtol=1e-4)
        est = metrics.ManifoldEstimator(distance_fn=tfd)
        assert metrics.precision_recall(line(range(8)), line([0, 1, 2, 3]), est) == (1.0, 0.875)
    finally:
        tfd.close()


# ---------------------------------------------------------------- streaming

@pytest.mark.parametrize("compressed", [False, True])
def test_streaming_matches_np_load(tmp_path, compressed):
    arr = np.random.default_rng(9).integers(0, 256, (10, 5, 4, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr, labels=np.arange(10))
    for bs in (1, 3, 4, 10, 64):
        batches = list(iter_batches(str(path), bs))
        assert [len(b) for b in batches] == [min(bs, 10 - i) for i in range(0, 10, bs)]
        np.testing.assert_array_equal(np.concatenate(batches), np.load(path)["arr_0"])
    info = validate_images(str(path))
    assert (info.num_images, info.image_size) == (10, (5, 4))


def test_streaming_fortran_order_falls_back(tmp_path):
    arr = np.asfortranarray(np.random.default_rng(10).integers(0, 256, (7, 3, 2, 3), dtype=np.uint8))
    np.savez(tmp_path / "f.npz", arr)
    np.testing.assert_array_equal(np.concatenate(list(iter_batches(str(tmp_path / "f.npz"), 3))), arr)


def test_truncated_array_is_rejected(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.zeros((6, 4, 4, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue()[:-10])
    with pytest.raises(EvaluatorInputError, match="truncated"):
        validate_images(str(tmp_path / "t.npz"))


# ---------------------------------------------------------------- photographs and CLI helpers

@pytest.fixture(scope="module")
def npz_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    files = {"ref": photo_crops()[:40], "sample": photo_crops(offset=37)[4:40], "small": photo_crops(48)[:12]}
    for name, arr in files.items():
        np.savez(d / f"{name}.npz", arr)
    np.savez(d / "no_arr0.npz", images=files["ref"])
    np.savez(d / "float.npz", files["ref"].astype(np.float32))
    np.savez(d / "gray.npz", files["ref"][..., 0])
    np.savez(d / "chw.npz", files["ref"].transpose(0, 3, 1, 2))
    return d


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("ref,sample,needles", [
    ("missing.npz", "sample", ["missing.npz", "not found"]),
    ("ref", "no_arr0", ["no_arr0.npz", "arr_0"]),
    ("ref", "float", ["float.npz", "float32", "uint8"]),
    ("gray", "sample", ["gray.npz", "N x H x W x 3"]),
    ("ref", "chw", ["chw.npz", "N x H x W x 3"]),
    ("ref", "small", ["small.npz", "48x48", "64x64", "--allow-size-mismatch"]),
])
def test_input_errors_are_one_line(npz_files, tmp_path, ref, sample, needles):
    proc = run_cli(npz_files / f"{ref}.npz" if ref != "missing.npz" else tmp_path / ref, npz_files / f"{sample}.npz",
                   cwd=tmp_path)
    assert_one_line_error(proc, *needles)


def test_missing_graph_message(npz_files, tmp_path):
    proc = run_cli(npz_files / "ref.npz", npz_files / "sample.npz", cwd=tmp_path)
    assert_one_line_error(proc, GRAPH_FILENAME, GRAPH_URL, "--inception-graph", str(tmp_path / "cache" / "fqgan"))
    proc = run_cli(npz_files / "ref.npz", npz_files / "sample.npz", "--inception-graph", tmp_path / "nope.pb",
                   cwd=tmp_path)
    assert_one_line_error(proc, "nope.pb", GRAPH_URL)


def test_graph_search_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("INCEPTION_GRAPH", raising=False)
    paths = {k: tmp_path / k / GRAPH_FILENAME for k in ("flag", "env", "xdg/fqgan")}
    for p in [*paths.values(), tmp_path / GRAPH_FILENAME]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    monkeypatch.setenv("INCEPTION_GRAPH", str(paths["env"]))
    assert find_inception_graph(paths["flag"]) == paths["flag"]
    assert find_inception_graph() == paths["env"]
    monkeypatch.delenv("INCEPTION_GRAPH")
    assert find_inception_graph().resolve() == (tmp_path / GRAPH_FILENAME).resolve()
    (tmp_path / GRAPH_FILENAME).unlink()
    assert find_inception_graph() == paths["xdg/fqgan"]


# ---------------------------------------------------------------- TensorFlow plumbing with a stand-in graph

@pytest.fixture(scope="module")
def fake_graph(tmp_path_factory):
    return write_fake_inception(tmp_path_factory.mktemp("graph") / GRAPH_FILENAME)


def test_cli_end_to_end(npz_files, fake_graph, tmp_path):
    proc = run_cli(npz_files / "ref.npz", npz_files / "sample.npz", "--inception-graph", fake_graph,
                   "--batch-size", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = parse_numbers(proc.stdout)
    assert list(printed) == list(LABELS)
    assert printed["Inception Score"] >= 1 and printed["FID"] > 0 and printed["sFID"] > 0
    assert 0 <= printed["Precision"] <= 1 and 0 <= printed["Recall"] <= 1
    written = (npz_files / "sample.txt").read_text()
    assert written.splitlines() == [ln for ln in proc.stdout.splitlines() if ln.partition(": ")[0] in LABELS]


@pytest.mark.parametrize("backend", ["tf", "torch"])
def test_identical_batches_and_batch_size(npz_files, fake_graph, backend):
    from evaluations.evaluator import evaluate
    from evaluations.inception import open_backend
    res = evaluate(str(npz_files / "ref.npz"), str(npz_files / "ref.npz"), fake_graph, backend=backend)
    assert abs(res.fid) < 1e-6 and abs(res.sfid) < 1e-6
    assert (res.precision, res.recall) == (1.0, 1.0)
    with open_backend(backend, fake_graph) as net:
        pool, spatial = net.activations(iter_batches(str(npz_files / "ref.npz"), 64))
        pool_b, spatial_b = net.activations(iter_batches(str(npz_files / "ref.npz"), 7))
        assert pool.shape == (40, POOL_DIM) and spatial.shape == (40, 2 * 2 * 7)
        assert net.softmax_weights.shape == (POOL_DIM, NUM_CLASSES)
        np.testing.assert_allclose(pool, pool_b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(spatial, spatial_b, rtol=1e-5, atol=1e-6)
        # The in-graph resize accepts any image size (what --allow-size-mismatch relies on).
        small, _ = net.activations([photo_crops(48)[:3]])
        assert small.shape == (3, POOL_DIM)
    res_mm = evaluate(str(npz_files / "ref.npz"), str(npz_files / "small.npz"), fake_graph, allow_size_mismatch=True,
                      backend=backend)
    assert np.isfinite(res_mm.fid)


def test_stored_statistics_are_used(npz_files, fake_graph, tmp_path):
    from evaluations.evaluator import evaluate
    from evaluations.inception_tf import TFInception
    images = np.load(npz_files / "ref.npz")["arr_0"]
    with TFInception(fake_graph) as net:
        pool, spatial = net.activations([images])
    s, s_sp = metrics.compute_statistics(pool), metrics.compute_statistics(spatial)
    shift = np.zeros(POOL_DIM)
    shift[3] = 3.0
    np.savez(tmp_path / "stats.npz", images, mu=s.mu + shift, sigma=s.sigma, mu_s=s_sp.mu, sigma_s=s_sp.sigma)
    res = evaluate(str(tmp_path / "stats.npz"), str(npz_files / "ref.npz"), fake_graph)
    assert res.fid == pytest.approx(9.0, abs=1e-4)  # only the mean moved, by 3: FID = 3^2
    assert abs(res.sfid) < 1e-6
    np.savez(tmp_path / "bad.npz", images, mu=s.mu[:4], sigma=s.sigma, mu_s=s_sp.mu, sigma_s=s_sp.sigma)
    with pytest.raises(EvaluatorInputError, match="bad.npz"):
        evaluate(str(tmp_path / "bad.npz"), str(npz_files / "ref.npz"), fake_graph)


@pytest.mark.parametrize("backend", ["tf", "torch"])
def test_wrong_graph_is_reported(npz_files, tmp_path, backend):
    from evaluations.evaluator import evaluate
    no_spatial = write_fake_inception(tmp_path / "nospatial.pb", with_spatial=False)
    with pytest.raises(EvaluatorInputError, match="mixed_6/conv"):
        evaluate(str(npz_files / "ref.npz"), str(npz_files / "sample.npz"), no_spatial, backend=backend)
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"<html><body>403 Forbidden</body></html>")
    with pytest.raises(EvaluatorInputError, match="junk.pb: not a TensorFlow GraphDef"):
        evaluate(str(npz_files / "ref.npz"), str(npz_files / "sample.npz"), junk, backend=backend)
