"""--fid-ref: the sampler's and the reconstruction's in-process scores equal `evaluator.py --backend torch` on the npz
of the same run (1 and 2 processes); the reference statistics cache; a guidance sweep compiling once; a killed run
resuming with its features; one-line errors. Tiny FAR/tokenizer at 16x16 and a narrow stand-in Inception graph."""
import importlib
import json

import numpy as np
import pytest
import torch

from autoregressive.models import FAR, far_config, save_far
from autoregressive.sample.pipeline import ImageDecoder
from autoregressive.sample.sample_c2i import main as sample_main
from demo.photos import build_photo_folder
from evaluations import metrics
from evaluations.evaluator import evaluate
from evaluations.inception import GRAPH_FILENAME, file_sha256
from evaluations.inception_torch import TorchBackendConfig, TorchInception
from evaluations.npz_stream import validate_images
from evaluations.scoring import reference_statistics
from benchmarks.standin import write_standin_graph
from helpers import photo_crops, torchrun
from tiny import tiny_tokenizer_config
from tokenizer.models import FactorizedTokenizer, save_tokenizer

generate_module = importlib.import_module("autoregressive.models.generate")  # the package exports the function
FIELDS = ("inception_score", "fid", "sfid", "precision", "recall")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # inherited by torchrun's processes


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Tokenizer, FAR (4x4 codes, 16x16 images), stand-in graph and a reference batch of decoded random codes (so
    samples and references overlap: precision and recall are not 0)."""
    d = tmp_path_factory.mktemp("fid")
    torch.manual_seed(0)
    tok = FactorizedTokenizer(tiny_tokenizer_config(2))
    save_tokenizer(d / "dual.pt", tok)
    save_far(d / "far.pt", FAR(far_config("FAR-T", 2, vocab_size=64, block_size=16, num_classes=3)))
    write_standin_graph(d / GRAPH_FILENAME, width=0.125, resize=139)
    codes = torch.randint(0, 64, (12, 16, 2), generator=torch.Generator().manual_seed(1))
    np.savez(d / "ref.npz", ImageDecoder(tok, 4, 16, 12)(codes).numpy())
    return d


def sampler_args(fx, out, *extra):
    return [str(a) for a in ("--vq-ckpt", fx / "dual.pt", "--gpt-ckpt", fx / "far.pt", "--gpt-model", "FAR-T",
                             "--image-size", 16, "--image-size-eval", 16, "--downsample-size", 4,
                             "--num-classes", 3, "--num-fid-samples", 7, "--top-k", 16, "--per-proc-batch-size", 4,
                             "--fid-ref", fx / "ref.npz", "--inception-graph", fx / GRAPH_FILENAME,
                             "--sample-dir", out, *extra)]


def one_thread_main(argv):
    threads = torch.get_num_threads()  # as torchrun's workers: the thread count changes float rounding on a CPU
    torch.set_num_threads(1)
    try:
        return sample_main(argv, 2)
    finally:
        torch.set_num_threads(threads)


def scores(folder):
    return [json.loads(line) for line in (folder / "fid.jsonl").read_text().splitlines()]


def assert_same(line: dict, want):
    """Float32 rounding: the sampler runs Inception on its own batches, the evaluator on batches of 64."""
    for k in ("inception_score", "fid", "sfid"):
        assert line[k] == pytest.approx(getattr(want, k), rel=1e-5, abs=1e-6), k
    assert (line["precision"], line["recall"]) == (want.precision, want.recall)


@pytest.fixture(scope="module")
def single(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    npz = one_thread_main(sampler_args(fx, out, "--cfg-scale", "2.0"))
    return npz, scores(out)


def test_one_process_equals_the_evaluator(fx, single, capsys):
    npz, (line,) = single
    assert line["cfg_scale"] == 2.0 and line["num_samples"] == 7 and line["backend"] == "torch"
    assert 0 < line["precision"] <= 1 and 0 < line["recall"] <= 1
    want = evaluate(str(fx / "ref.npz"), str(npz), fx / GRAPH_FILENAME, backend="torch", device="cpu")
    assert_same(line, want)
    assert npz.with_suffix(".txt").read_text().splitlines()[1].startswith("FID: ")


def test_two_processes_equal_the_evaluator_and_reuse_the_reference(fx, tmp_path, capsys):
    r = torchrun("autoregressive/sample/sample_c2i_ddp_dual_code.py", *sampler_args(fx, tmp_path, "--cfg-scale", 2.0),
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Inception backend: torch" in r.stdout and "computing reference batch activations" in r.stdout
    (line,) = scores(tmp_path)
    npz = tmp_path / f"{line['name']}.npz"
    # the evaluator reads the reference statistics the sampler cached (same file, same graph)
    want = evaluate(str(fx / "ref.npz"), str(npz), fx / GRAPH_FILENAME, backend="torch", device="cpu")
    assert "using the cached reference statistics" in capsys.readouterr().out
    assert_same(line, want)


def test_reference_cache_is_used_then_invalidated(fx, tmp_path, capsys):
    net = TorchInception(fx / GRAPH_FILENAME, TorchBackendConfig(device="cpu"))
    calls = []
    real = net.activations
    net.activations = lambda *a, **k: calls.append(1) or real(*a, **k)
    sha = file_sha256(fx / GRAPH_FILENAME)
    ref = tmp_path / "ref.npz"
    np.savez(ref, photo_crops(16)[:8])
    first = reference_statistics(validate_images(str(ref)), net, sha)
    second = reference_statistics(validate_images(str(ref)), net, sha)
    assert len(calls) == 1 and "using the cached reference statistics" in capsys.readouterr().out
    assert np.array_equal(first.features, second.features) and np.array_equal(first.pool.sigma, second.pool.sigma)
    np.savez(ref, photo_crops(16, offset=5)[:8])  # the same path, other images: a new entry
    third = reference_statistics(validate_images(str(ref)), net, sha)
    assert len(calls) == 2 and not np.array_equal(third.features, first.features)
    pool, _ = real(iter([photo_crops(16, offset=5)[:8]]))
    np.testing.assert_array_equal(third.pool.mu, metrics.compute_statistics(pool).mu)
    assert len(list((tmp_path / "xdg" / "fqgan").glob("inception-ref-*.npz"))) == 2


def test_sweep_compiles_once_and_equals_single_runs(fx, single, tmp_path, monkeypatch):
    # The position step compiled by dynamo as in production, lowered by the eager backend (seconds, not minutes):
    # what is counted is how often dynamo compiles, which a guidance scale baked into the graph would repeat.
    step = torch.compile(generate_module.next_position, fullgraph=True, dynamic=False, backend="eager")
    monkeypatch.setitem(generate_module._compiled, "next", step)
    counters = torch._dynamo.utils.counters

    def compiles(argv):
        torch._dynamo.reset()
        counters.clear()
        result = one_thread_main(argv)
        return result, counters["stats"]["unique_graphs"]

    compiled = ["--compile", "--no-compile-decoder"]
    outs, swept = compiles(sampler_args(fx, tmp_path / "sweep", "--cfg-scales", "2.0,1.5", *compiled))
    one, alone = compiles(sampler_args(fx, tmp_path / "one", "--cfg-scale", "1.5", *compiled))
    assert alone >= 1 and swept == alone
    lines = scores(tmp_path / "sweep")
    assert [line["cfg_scale"] for line in lines] == [2.0, 1.5]
    single_npz, (single_line,) = single
    expected = [(single_npz, single_line), (one, scores(tmp_path / "one")[0])]
    for out, line, (ref_npz, ref_line) in zip(outs, lines, expected):
        assert np.array_equal(np.load(out)["arr_0"], np.load(ref_npz)["arr_0"])
        assert [line[k] for k in FIELDS] == [ref_line[k] for k in FIELDS]


def test_killed_run_resumes_with_its_features(fx, single, tmp_path, monkeypatch, capsys):
    from utils import npz

    real_mark, marked = npz.ShardedNpzWriter.mark_done, []

    def dies_after_one_batch(self, count):
        if marked:
            raise RuntimeError("killed")
        marked.append(count)
        real_mark(self, count)

    argv = sampler_args(fx, tmp_path, "--cfg-scale", "2.0", "--no-save-npz")
    monkeypatch.setattr(npz.ShardedNpzWriter, "mark_done", dies_after_one_batch)
    with pytest.raises(RuntimeError):
        one_thread_main(argv)
    monkeypatch.setattr(npz.ShardedNpzWriter, "mark_done", real_mark)
    parts = next(tmp_path.glob("*.npz.parts"))
    assert sorted(p.name for p in parts.glob("*.npy")) == ["inception_pool.npy", "inception_spatial.npy"]  # no images
    capsys.readouterr()
    assert one_thread_main(argv) is None  # no npz
    assert "resuming after 4 of its 7 images" in capsys.readouterr().out
    assert not parts.exists() and not list(tmp_path.glob("*.npz")) and list(tmp_path.glob("*.png"))
    (line,) = scores(tmp_path)
    assert [line[k] for k in FIELDS] == [single[1][0][k] for k in FIELDS]


def test_one_line_errors(fx, tmp_path):
    argv = sampler_args(fx, tmp_path, "--no-save-npz")
    del argv[argv.index("--fid-ref"):argv.index("--fid-ref") + 2]
    with pytest.raises(SystemExit) as e:
        sample_main(argv, 2)
    assert str(e.value.code) == "error: --no-save-npz keeps nothing but the grid without --fid-ref"
    with pytest.raises(SystemExit) as e:
        sample_main(sampler_args(fx, tmp_path, "--cfg-scales", "1.5,x"), 2)
    assert "--cfg-scales 1.5,x: expected comma-separated numbers" in str(e.value.code)
    np.savez(tmp_path / "big.npz", photo_crops(32)[:8])
    argv = sampler_args(fx, tmp_path)
    argv[argv.index("--fid-ref") + 1] = str(tmp_path / "big.npz")
    with pytest.raises(SystemExit) as e:
        sample_main(argv, 2)
    assert str(e.value.code).endswith("big.npz: reference images are 32x32 but the images made here are 16x16")


def test_reconstruction_scores_rfid_with_two_processes(fx, tmp_path):
    photos = build_photo_folder(tmp_path / "val", per_class=3, size=40, classes=["cat", "coffee", "rocket"])
    np.savez(tmp_path / "ref.npz", photo_crops(32)[:9])
    r = torchrun("tokenizer/reconstruction_vq_ddp_dual.py", "--data-path", photos, "--image-size", 32,
                 "--vq-ckpt", fx / "dual.pt", "--per-proc-batch-size", 2, "--num-workers", 0, "--folder-name", "T",
                 "--fid-ref", tmp_path / "ref.npz", "--inception-graph", fx / GRAPH_FILENAME, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "reconstructions" / "T.json").read_text())
    want = evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "reconstructions" / "T.npz"), fx / GRAPH_FILENAME,
                    backend="torch", device="cpu")
    assert_same(res, want)
    assert scores(tmp_path / "reconstructions")[0]["name"] == "T" and "PSNR:" in r.stdout


def test_non_finite_reference_statistics_stop_before_any_image(fx, tmp_path):
    """The instance (issue 28): one nan in the reference's stored sigma hung the sampler after every image was made,
    and each rerun resumed into the same hang."""
    stats = {"mu": np.zeros(4), "sigma": np.eye(4), "mu_s": np.zeros(4), "sigma_s": np.eye(4)}  # (read before sizes)
    stats["sigma"][0, 1] = np.nan
    np.savez(tmp_path / "nan.npz", np.load(fx / "ref.npz")["arr_0"], **stats)
    argv = sampler_args(fx, tmp_path / "out", "--cfg-scale", "2.0")
    argv[argv.index("--fid-ref") + 1] = str(tmp_path / "nan.npz")
    with pytest.raises(SystemExit) as e:
        sample_main(argv, 2)
    assert str(e.value.code) == (f"error: {tmp_path / 'nan.npz'}: stored 'sigma' holds 1 non-finite value (nan or "
                                 f"inf): no FID can be computed from it (remove mu/sigma/mu_s/sigma_s to have them "
                                 f"computed from the images)")
    assert not (tmp_path / "out").exists()  # before any image


def test_a_failed_score_keeps_the_finished_npz(fx, single, tmp_path, monkeypatch):
    from evaluations import inprocess

    def fails(*a, **k):
        raise metrics.FIDError("FID: the matrix square root of the covariance product failed (stand-in)")

    monkeypatch.setattr(inprocess, "score", fails)
    argv = sampler_args(fx, tmp_path, "--cfg-scale", "2.0")
    with pytest.raises(SystemExit) as e:
        one_thread_main(argv)
    npz = tmp_path / single[0].name
    assert str(e.value.code) == (f"error: FID: the matrix square root of the covariance product failed (stand-in) "
                                 f"(the 7 samples are kept in {npz}: score them with evaluations/evaluator.py)")
    assert np.array_equal(np.load(npz)["arr_0"], np.load(single[0])["arr_0"])  # finished, whole
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.glob(".*.lock"))
    with pytest.raises(SystemExit) as e:  # and never written over without being asked
        one_thread_main(argv)
    assert str(e.value.code) == (f"error: {npz} exists (a finished batch): pass --overwrite to write it again, or "
                                 f"choose another output name")
