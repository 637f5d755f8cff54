"""The third round of faults a cluster user meets (issue 28): nothing hangs on a non-finite statistic, nothing
finished is overwritten, nothing is read wrong. Each class with the instance that was seen and another one; the
sampler's scoring cases are in test_fid_inprocess.py (they share its stand-in Inception graph)."""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FAR_TINY, TINY, extract_killed_after_one_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Entry points run in-process here, with one thread as torchrun's workers have (on a busy CPU, a second
    thread spinning in every op makes a tiny model's step ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def far_file(path: Path, block_size: int = 64) -> Path:
    """A FAR smaller than FAR-T (one layer of width 64): what the sampler needs to run in a second."""
    from autoregressive.models import FAR, far_config, save_far

    torch.manual_seed(1)
    save_far(path, FAR(far_config("FAR-T", 2, vocab_size=64, block_size=block_size, num_classes=3, dim=64,
                                  n_layer=1, n_head=4, ar_n_layer=1)))
    return path


def exit_line(e: pytest.ExceptionInfo) -> str:
    return str(e.value.code)


# ---------------------------------------------------------------------------------------------- 1 non-finite statistics
def ref_with_stats(path: Path, key: str, bad: float) -> Path:
    rng = np.random.default_rng(0)
    stats = {"mu": rng.normal(size=16), "sigma": np.eye(16), "mu_s": rng.normal(size=28), "sigma_s": np.eye(28)}
    stats[key].flat[3] = bad
    np.savez(path, np.zeros((4, 8, 8, 3), np.uint8), **stats)
    return path


@pytest.mark.parametrize("key,bad", [("sigma", np.nan), ("mu", np.nan), ("sigma_s", np.inf)])
def test_non_finite_stored_statistics_are_one_line_before_any_feature(key, bad, tmp_path, capsys):
    """The instance: one nan in a reference's stored sigma hung in sqrtm, one in mu printed FID: nan with exit 0."""
    from evaluations.evaluator import main

    ref = ref_with_stats(tmp_path / "ref.npz", key, bad)
    np.savez(tmp_path / "sample.npz", np.zeros((4, 8, 8, 3), np.uint8))
    started = time.time()
    assert main([str(ref), str(tmp_path / "sample.npz"), "--inception-graph", str(tmp_path / "none.pb")]) == 1
    assert time.time() - started < 10
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {ref}: stored '{key}' holds 1 non-finite value (nan or inf): no FID can be computed from it "
        f"(remove mu/sigma/mu_s/sigma_s to have them computed from the images)")


def test_metrics_never_pass_a_non_finite_value_to_a_matrix_function(tmp_path, capsys):
    from evaluations import metrics, scoring

    good = metrics.FIDStatistics(np.zeros(4), np.eye(4))
    with pytest.raises(metrics.FIDError, match=r"^the reference covariance holds 1 non-finite value"):
        metrics.frechet_distance(good, metrics.FIDStatistics(np.zeros(4), np.diag([1, 1, np.inf, 1])))
    features = np.ones((8, 4), np.float32)
    features[2, 1] = np.nan
    with pytest.raises(metrics.FIDError, match=r"^the sample batch's pool_3 features holds 1 non-finite value"):
        scoring.statistics("", None, features, np.ones((8, 2), np.float32))

    class Net:  # a stand-in backend: what reference_statistics asks of one
        name, batch_size = "stub", 4
        calls = 0

        def activations(self, batches, total, desc):
            Net.calls += 1
            rng = np.random.default_rng(0)
            return rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)

    from evaluations.npz_stream import validate_images

    np.savez(tmp_path / "ref.npz", np.zeros((8, 4, 4, 3), np.uint8))
    info = validate_images(str(tmp_path / "ref.npz"))
    cache = tmp_path / "cache"
    entry = scoring.reference_cache_path(info.path, Net(), "g" * 16, cache)
    cache.mkdir()
    np.savez(entry, format=scoring.REF_CACHE_FORMAT, mu=np.full(4, np.nan), sigma=np.eye(4), mu_s=np.zeros(2),
             sigma_s=np.eye(2), pool=np.zeros((8, 4), np.float32))
    stats = scoring.reference_statistics(info, Net(), "g" * 16, cache)  # a poisoned cache entry is made again
    assert Net.calls == 1 and np.isfinite(stats.pool.mu).all()
    assert "unreadable reference cache entry (FIDError), computing it again" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 2 overwrites
def test_convert_never_writes_over_its_input_or_a_finished_file(tmp_path, capsys):
    from autoregressive.convert import main as convert

    ckpt = far_file(tmp_path / "far.pt")
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:  # the instance: X.pt X.pt replaced a training checkpoint
        convert([str(ckpt), str(ckpt)])
    assert exit_line(e) == (f"error: output {ckpt}: the converter writes a weights-only safetensors file; name it "
                            f"far.safetensors (a .pt name would hide what it holds)")
    out = convert([str(ckpt), str(tmp_path / "far.safetensors")])
    with pytest.raises(SystemExit) as e:
        convert([str(out), str(out)])
    assert exit_line(e) == f"error: output {out} is the input file: the converter never writes over its input; " \
                           f"choose another output name"
    with pytest.raises(SystemExit) as e:
        convert([str(ckpt), str(out)])
    assert exit_line(e) == f"error: output {out} exists; pass --overwrite to replace it"
    assert convert([str(ckpt), str(out), "--overwrite"]) == out and ckpt.read_bytes() == before


def test_a_weights_only_file_is_never_resumed_from(tmp_path, caplog):
    import logging

    from autoregressive.train.train_c2i import parse_config
    from utils.checkpoint import atomic_save
    from utils.resume import resume_run

    cfg = parse_config(["--code-path", "c", "--exp-name", "e"], 2)
    log = logging.getLogger("test-resume")
    weights = {"model": {"w": torch.zeros(2)}}
    ckpts = tmp_path / "checkpoints"
    atomic_save({**weights, "optimizer": {}, "steps": 2}, ckpts / "0000002.pt")
    atomic_save(weights, ckpts / "0000004.pt")  # e.g. what `convert 0000004.pt 0000004.pt` left
    with caplog.at_level(logging.INFO, "test-resume"):
        resume = resume_run(cfg, ckpts, tmp_path, None, "--gpt-ckpt", log)
    assert resume.path == str(ckpts / "0000002.pt") and resume.exact
    assert f"{ckpts / '0000004.pt'} is not a resumable checkpoint of this run" in caplog.text
    # named on the command line of a fresh run, it seeds the weights at step 0 (and the log says so)
    seed = resume_run(cfg, tmp_path / "fresh", tmp_path, str(ckpts / "0000004.pt"), "--gpt-ckpt", log)
    assert seed.found and not seed.exact and seed.position(10, {}, log)[0].step == 0
    with caplog.at_level(logging.INFO, "test-resume"):
        seed.announce(seed.position(10, {}, log)[0], log)
    assert "a weights-only file, not a training checkpoint: its weights only, step 0" in caplog.text


def extract_args(setup, code_path: Path, *extra) -> list:
    return [str(a) for a in ("--vq-ckpt", setup / "dual.pt", "--codebook-size", 64, "--data-path", setup / "data",
                             "--code-path", code_path, "--image-size", 32, "--ten-crop", "--crop-range", 1.1,
                             "--num-workers", 0, "--batch-size", 4, *extra)]


def test_a_finished_code_store_is_reported_kept_and_replaced_only_when_asked(setup, tmp_path, monkeypatch, capsys):
    from autoregressive.data import code_store
    from autoregressive.data.code_store import CodeDataset
    from autoregressive.train.extract_codes import main as extract
    from tiny import tiny_tokenizer_config
    from tokenizer.models import FactorizedTokenizer, save_tokenizer

    store = tmp_path / "codes"
    shutil.copytree(setup / "codes", store)  # written by 2 processes; the codes do not depend on that
    manifest = (store / "manifest.json").read_text()
    extract(extract_args(setup, store))
    assert "is a finished code store of these images with this tokenizer (12 images x 10 views): nothing to do" \
        in capsys.readouterr().out
    assert (store / "manifest.json").read_text() == manifest and not (store / ".lock").exists()

    torch.manual_seed(7)
    save_tokenizer(tmp_path / "other.pt", FactorizedTokenizer(tiny_tokenizer_config(2)))
    other = extract_args(setup, store, "--num-images", 4)  # (4 images: one batch)
    other[other.index("--vq-ckpt") + 1] = str(tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        extract(other)
    assert exit_line(e) == (f"error: --code-path {store} holds a finished code store made with other settings (they "
                            f"differ in: images, num_images, vq_ckpt); pass --overwrite to replace it, or choose "
                            f"another --code-path")

    # the instance: an interrupted re-extraction deleted manifest.json at its start; the store stays usable now
    extract_killed_after_one_batch(other + ["--overwrite"], monkeypatch)
    assert (store / "manifest.json").read_text() == manifest and len(CodeDataset(store)) == 12
    extract(other + ["--overwrite"])  # resumes the replacement and finishes it
    info = code_store.read_manifest(store)
    assert info.extra["vq_ckpt_sha256"] != json.loads(manifest)["extra"]["vq_ckpt_sha256"]
    assert sorted(p.name for p in store.glob("*.npy")) == ["codes_00000.npy", "labels_00000.npy"]  # no stale shard


# ---------------------------------------------------------------------------------------------- 3 + 8 FAR resumes
def test_far_resume_checks_its_code_store_trims_its_logs_and_says_the_world_size_changed(setup, tmp_path,
                                                                                        monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from autoregressive.train.train_c2i import main as train_far
    from helpers import metrics

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "codes"
    shutil.copytree(setup / "codes", store)
    common = ["--code-path", str(store), *FAR_TINY, "--global-batch-size", "4", "--ckpt-every", "2",
              "--exp-name", "r", "--no-compile"]
    exp = tmp_path / "results" / "FAR-T-r"
    train_far(common + ["--max-steps", "3"])
    (exp / "checkpoints" / "0000003.pt").unlink()  # killed -9 after logging step 3, before its checkpoint
    with open(exp / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and half a line
    train_far(common + ["--max-steps", "4"])
    assert [m["step"] for m in metrics(exp / "metrics.jsonl")] == [1, 2, 3, 4]
    assert "metrics.jsonl: dropped 2 lines past step 2, where this run continues" in (exp / "log.txt").read_text()
    events = EventAccumulator(str(exp / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]

    # the instance: a store re-extracted with another tokenizer under the same path
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "extra": {**manifest["extra"],
                                                                          "vq_ckpt_sha256": "0123456789abcdef"}}))
    with pytest.raises(SystemExit) as e:
        train_far(common + ["--max-steps", "5"])
    last = Path("results") / "FAR-T-r" / "checkpoints" / "0000004.pt"  # (as the run names it: --results-dir)
    assert exit_line(e) == (f"error: --code-path {store} is not the code store {last} "
                            f"was trained on (tokenizer_sha256 {manifest['extra']['vq_ckpt_sha256']} -> "
                            f"0123456789abcdef): resume with the original codes, or train with a new --exp-name")


def test_code_store_identity_and_the_world_size_of_a_resume(caplog):
    import logging

    from autoregressive.train.train_c2i import check_code_store
    from utils.data import ResumableSampler
    from utils.resume import restore_position
    from utils.rng import gather_rng_states

    trained = {"tokenizer_sha256": "a", "grid": [8, 8], "factors": ["vis", "sem"], "images": 12, "views": 10}
    check_code_store(trained, dict(trained), "c.pt", "codes")
    check_code_store(None, dict(trained), "c.pt", "codes")  # a checkpoint from before the record
    with pytest.raises(ValueError, match=r"not the code store c\.pt was trained on \(images 12 -> 8\)"):
        check_code_store(trained, {**trained, "images": 8}, "c.pt", "codes")
    # what the world-size line promises: every global step reads the same images whatever the process count
    def steps(world, per_rank):
        ranks = [list(ResumableSampler(26, per_rank, r, world, seed=3)) for r in range(world)]
        return [sorted(sum((rank[i * per_rank:(i + 1) * per_rank] for rank in ranks), [])) for i in range(3)]
    assert steps(1, 8) == steps(2, 4) == steps(4, 2)
    state = {"epoch": 0, "batch_in_epoch": 2, "rng": gather_rng_states() * 2, "world_size": 2}
    with caplog.at_level(logging.INFO, "test-world"):  # resumed by 1 process; before, nothing was said
        pos, _ = restore_position({"steps": 2, "resume": state}, 3, {}, logging.getLogger("test-world"))
    assert (pos.step, pos.batch) == (2, 2) and ("the checkpoint was written by 2 processes and this run has 1: the "
                                                "data order continues exactly") in caplog.text


# ---------------------------------------------------------------------------------------------- 4 sizes
def test_the_checkpoints_decide_the_sampling_grid(setup, tmp_path, monkeypatch, capsys):
    from autoregressive.sample.sample_c2i import main as sample

    far = far_file(tmp_path / "far.pt", block_size=64)  # trained on 8x8 tokens
    args = ["--vq-ckpt", str(setup / "dual.pt"), "--gpt-ckpt", str(far), "--gpt-model", "FAR-T", "--num-classes",
            "3", "--num-fid-samples", "1", "--per-proc-batch-size", "1", "--sample-dir", str(tmp_path),
            "--image-size-eval", "32", "--grid-samples", "0"]
    for size in (64, 28):  # the instance: 16x16 and 7x7 silently overrode the trained grid
        with pytest.raises(SystemExit) as e:
            sample(args + ["--image-size", str(size)], 2)
        assert exit_line(e) == (f"error: --image-size {size} does not fit {far}, trained on 8x8 tokens, which "
                                f"{setup / 'dual.pt'} (4x downsampling) decodes to 32x32 images: leave --image-size "
                                f"out, or give 32")
    with pytest.raises(SystemExit) as e:
        sample(args + ["--downsample-size", "8"], 2)
    assert exit_line(e) == f"error: --downsample-size 8 does not match {setup / 'dual.pt'} (4)"
    npz = sample(args, 2)  # no size flag: the checkpoints' 32x32
    assert "-size-32-size-32-" in npz.name and np.load(npz)["arr_0"].shape == (1, 32, 32, 3)
    assert not list(tmp_path.glob(".*.lock"))


@pytest.mark.parametrize("entry", ["reconstruct", "extract", "reconstruct_image"])
def test_an_image_size_the_downsampling_does_not_divide_is_one_line(entry, setup, tmp_path, monkeypatch):
    from autoregressive.train.extract_codes import main as extract
    from tokenizer.reconstruct import main as reconstruct
    from tokenizer.reconstruct_image import main as reconstruct_image

    monkeypatch.chdir(tmp_path)
    tok, data = str(setup / "dual.pt"), str(setup / "data")
    image = str(next((setup / "data" / "cat").iterdir()))
    call = {"reconstruct": lambda: reconstruct(["--vq-ckpt", tok, "--data-path", data, "--image-size", "34"], 2),
            "extract": lambda: extract(["--vq-ckpt", tok, "--data-path", data, "--code-path", "c",
                                        "--image-size", "34"], 2),
            "reconstruct_image": lambda: reconstruct_image(["--vq-ckpt", tok, "--image", image, "--image-size", "34"])}
    with pytest.raises(SystemExit) as e:
        call[entry]()
    assert exit_line(e) == f"error: --image-size 34 is not a multiple of {tok}'s downsampling 4: use 32 or 36"
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- 5 EXIF orientation
def rotated_jpeg(path: Path, orientation: int) -> Path:
    """A 24x48 photo shown with its top half red and its bottom half blue, stored turned as a camera leaves it,
    with the EXIF orientation that turns it back."""
    shown = np.zeros((24, 48, 3), np.uint8)
    shown[:12] = (255, 0, 0)
    shown[12:] = (0, 0, 255)
    undo = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}[orientation]
    img = Image.fromarray(np.ascontiguousarray(undo(shown)))
    exif = img.getexif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, exif=exif, quality=95)
    return path


def upright_red_over_blue(x: torch.Tensor) -> bool:
    """(3, H, W) in [-1, 1]: the top row red, the bottom row blue, at both corners."""
    top, bottom = x[:, 0, [0, -1]], x[:, -1, [0, -1]]
    return bool((top[0] > 0.5).all() and (top[2] < -0.5).all() and (bottom[0] < -0.5).all()
                and (bottom[2] > 0.5).all())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_every_reader_applies_the_exif_orientation(orientation, tmp_path):
    from autoregressive.train.extract_codes import views_transform
    from utils.data import ImageFolderSafe, center_crop_arr, eval_transform, to_model_range, train_transform
    from utils.images import open_rgb

    photo = rotated_jpeg(tmp_path / "data" / "a" / "photo.jpg", orientation)
    assert not upright_red_over_blue(to_model_range(Image.open(photo).convert("RGB")))  # as stored: turned
    readers = {  # each as its entry point builds it
        "training": ImageFolderSafe(tmp_path / "data", train_transform(16), 16, fallback=True),
        "reference batch, reconstruction, factor report": ImageFolderSafe(tmp_path / "data", eval_transform(16), 16),
        "extraction": ImageFolderSafe(tmp_path / "data", views_transform(16, True, 1.1), 16),
    }
    for name, dataset in readers.items():
        x = dataset[0][0]
        views = x if x.dim() == 4 else x[None]
        assert all(upright_red_over_blue(v) for v in views), name
    assert upright_red_over_blue(to_model_range(center_crop_arr(open_rgb(photo), 16)))  # reconstruct_image.py


def test_the_reference_batch_is_written_upright(tmp_path):
    from tokenizer.val_ddp import main as val_ddp
    from utils.data import to_model_range

    rotated_jpeg(tmp_path / "data" / "a" / "photo.jpg", 6)
    out = val_ddp(["--data-path", str(tmp_path / "data"), "--image-size", "16", "--sample-dir", str(tmp_path),
                   "--num-workers", "0"])
    image = np.load(out)["arr_0"][0]
    assert upright_red_over_blue(to_model_range(Image.fromarray(image)))
    with pytest.raises(SystemExit) as e:  # a finished batch is not written over unless asked
        val_ddp(["--data-path", str(tmp_path / "data"), "--image-size", "16", "--sample-dir", str(tmp_path)])
    assert exit_line(e) == (f"error: {out} exists (a finished batch): pass --overwrite to write it again, or choose "
                            f"another output name")


# ---------------------------------------------------------------------------------------------- 6 progress records
def test_sampler_progress_records_that_do_not_fit_restart_their_shard(tmp_path, capsys):
    from utils.npz import ShardedNpzWriter

    arrays = {"arr_0": ((6, 2), np.uint8)}
    out = tmp_path / "s.npz"
    w = ShardedNpzWriter(out, arrays, {"seed": 0}, rows=6)
    w.write("arr_0", slice(0, 2), np.ones((2, 2), np.uint8))
    w.mark_done(2)
    del w
    assert ShardedNpzWriter(out, arrays, {"seed": 0}, rows=6).done == 2
    progress = out.with_name("s.npz.parts") / "done_00000.json"
    for record in ('{"done": 9}', '{"done": -1}', '{"done": "2"}', '{"do'):  # larger than the shard, negative ...
        progress.write_text(record)
        assert ShardedNpzWriter(out, arrays, {"seed": 0}, rows=6).done == 0
        assert "does not fit this rank's 6 rows: they are written again" in capsys.readouterr().err
    key = out.with_name("s.npz.parts") / "key.json"
    key.write_text(key.read_text()[:10])  # cut short: every rerun crashed on it
    w = ShardedNpzWriter(out, arrays, {"seed": 0}, rows=6)
    assert w.done == 0 and "key.json is unreadable or describes other settings" in capsys.readouterr().err
    w.write("arr_0", slice(0, 6), np.full((6, 2), 3, np.uint8))
    w.mark_done(6)
    assert w.close() == out and np.load(out)["arr_0"].min() == 3
    assert not list(tmp_path.glob("**/*.tmp"))


def test_extraction_progress_that_does_not_fit_restarts_the_shard(tmp_path, capsys):
    from autoregressive.data.code_store import CodeStoreWriter

    def writer():
        return CodeStoreWriter(tmp_path, 4, 1, ["vis"], (2, 2), 16, {"k": 1})

    w = writer()
    w.write(np.ones((2, 1, 1, 4), np.int64), np.zeros(2), {"skipped": 0})
    assert writer().filled == 2
    progress = tmp_path / ".progress_00000.json"
    record = json.loads(progress.read_text())
    progress.write_text(json.dumps({**record, "filled": 7}))  # more than the rank's 4 items
    assert writer().filled == 0 and "does not fit rank 0's 4 items: they are encoded again" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 7 edges
def unreadable_folder(root: Path, n: int = 3) -> Path:
    for i in range(n):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{i}.jpg").write_bytes(b"not an image")
    return root


def test_a_folder_of_unreadable_images_stops_training_and_extraction_in_one_line(setup, tmp_path, monkeypatch):
    from autoregressive.train.extract_codes import main as extract
    from tokenizer.train import main as train_tokenizer

    monkeypatch.chdir(tmp_path)
    data = unreadable_folder(tmp_path / "bad")
    with pytest.raises(SystemExit) as e:  # read in a loader worker: torch adds the worker's traceback
        train_tokenizer(["--data-path", str(data), *TINY, "--global-batch-size", "2", "--exp-name", "u",
                         "--num-workers", "1"])
    line = exit_line(e)
    assert line.startswith(f"error: 100 unreadable images in a row from {data / 'a'}/") and "\n" not in line
    assert f"(the last: cannot identify image file '{data / 'a'}/" in line
    assert line.endswith("'); is --data-path the folder of images it should be?")
    with pytest.raises(SystemExit) as e:
        extract(["--vq-ckpt", str(setup / "dual.pt"), "--data-path", str(data), "--code-path", "codes",
                 "--image-size", "32", "--num-workers", "0"])
    assert exit_line(e) == f"error: none of the 3 images under --data-path {data} could be read; no code store was " \
                           f"written"
    assert not (tmp_path / "codes" / "manifest.json").exists() and not (tmp_path / "codes" / ".lock").exists()


SAMPLE = ["--vq-ckpt", "v.pt", "--gpt-ckpt", "g.pt"]


@pytest.mark.parametrize("flags,status,message", [
    (["--cfg-scale", "0"], 2, "argument --cfg-scale: 0.0 must be > 0"),
    (["--cfg-scale", "2", "-1"], 2, "argument --cfg-scale: -1.0 must be > 0"),
    (["--cfg-scales", "1.5,0"], 1, "error: --cfg-scales 1.5,0: every scale must be a finite number > 0"),
    (["--top-p", "0"], 2, "argument --top-p: 0.0 must be in (0, 1]"),
    (["--global-seed", "-1"], 2, "argument --global-seed: -1 must be in [0, 2^63)"),
    (["--global-seed", str(2 ** 63)], 2, f"argument --global-seed: {2 ** 63} must be in [0, 2^63)"),
    (["--top-k", "0", "0", "0"], 1, "error: --top-k 0 0 0: give one value, or one per factor (2)"),
    (["--temperature", "1", "1", "1"], 1, "error: --temperature 1.0 1.0 1.0: give one value, or one per factor (2)"),
])
def test_sampler_values_are_refused_before_any_work(flags, status, message, tmp_path, monkeypatch, capsys):
    from autoregressive.sample.sample_c2i import main as sample

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample(SAMPLE + flags, 2)
    got = capsys.readouterr().err.strip().splitlines()[-1] if status == 2 else exit_line(e)
    assert (e.value.code == 2) == (status == 2) and got.endswith(message)
    assert not list(tmp_path.iterdir())  # no .parts, no lock


def test_a_training_seed_of_any_allowed_size_runs():
    from utils.data import ResumableSampler
    from utils.rng import seed_everything

    seed_everything((2 ** 63 - 1) * 8 + 7)  # --global-seed * world + rank
    assert len(list(ResumableSampler(8, 2, seed=2 ** 63 - 1))) == 8


def test_layouts_and_names_that_are_not_what_they_seem(tmp_path):
    from evaluations.errors import EvaluatorInputError
    from evaluations.npz_stream import validate_images
    from utils.checkpoint import CheckpointError, HubFile
    from utils.data import find_images

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8)).save(flat / name)
    (flat / "x.jpg").mkdir()  # the instance: taken as the only class, the flat images left out
    with pytest.raises(FileNotFoundError) as e:
        find_images(flat)
    assert str(e.value) == (f"--data-path {flat}: holds both image files (a.jpg, b.jpg ...) and folders (x.jpg/): "
                            f"use <root>/<class>/<image>, or a flat folder of images only")
    with pytest.raises(FileNotFoundError, match=r": is a file, not a folder$"):
        find_images(flat / "a.jpg")
    with pytest.raises(EvaluatorInputError) as e:
        validate_images(str(flat / "x.jpg"))
    assert str(e.value) == f"{flat / 'x.jpg'}: is a folder, not an .npz file"
    for name, why in (("hf://owner/repo@/file.pt", "an empty revision after '@'"),
                      ("hf://owner/@v1/file.pt", "no repository name before '@'")):
        with pytest.raises(CheckpointError) as e:
            HubFile.parse(name)
        assert str(e.value).startswith(f"{name}: {why}; expected hf://owner/repo[@revision]/file")
    assert HubFile.parse("hf://owner/repo@v1/file.pt").revision == "v1"


def test_manifest_shards_stay_inside_the_store(tmp_path):
    from autoregressive.data.code_store import CodeDataset, CodeStoreError, CodeStoreWriter

    w = CodeStoreWriter(tmp_path / "s", 2, 1, ["vis"], (2, 2), 16)
    w.write(np.ones((2, 1, 1, 4), np.int64), np.zeros(2))
    w.close()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for name in ("../outside.npy", str(tmp_path / "elsewhere.npy"), ".."):
        shards = [{**manifest["shards"][0], "codes": name}]
        (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "shards": shards}))
        with pytest.raises(CodeStoreError) as e:
            CodeDataset(tmp_path / "s")
        assert f"shard codes file {name!r} is not a file name inside the store" in str(e.value)
    assert os.path.exists(tmp_path / "s" / "codes_00000.npy")
