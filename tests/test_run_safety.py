"""Runs that never lose work (issue 19): one run per folder, requeue-safe resumes, every image read as it is,
stops that always stop, full disks, and counts checked at the edge."""
import io
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FAR_TINY, TINY, extract_killed_after_one_batch, interrupt, metrics, torchrun_cmd

ROOT = Path(__file__).resolve().parents[1]
FAR_TRAIN = "autoregressive/train/train_c2i_dual.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def run(cmd, cwd, preexec_fn=None, timeout=300, env=None):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env or ENV,
                          timeout=timeout, preexec_fn=preexec_fn)


def far_base(path: Path) -> Path:
    from autoregressive.models import FAR, far_config, save_far

    torch.manual_seed(1)
    save_far(path, FAR(far_config("FAR-T", 2, vocab_size=64, block_size=64, num_classes=3)))
    return path


# ---------------------------------------------------------------------------------------------- 1 + 2 under torchrun
def test_busy_folder_is_refused_and_a_requeued_run_resumes_its_own_checkpoints(setup, tmp_path):
    """A job resubmitted while the first still runs stops at once, naming the holder; once the first is stopped,
    the same command line (with --gpt-ckpt BASE) continues from the run's own checkpoint, not from BASE."""
    base = far_base(tmp_path / "base.pt")
    common = [FAR_TRAIN, "--code-path", setup / "codes", *FAR_TINY, "--global-batch-size", "4", "--epochs", "100000",
              "--ckpt-every", "100000", "--gpt-ckpt", base, "--results-dir", tmp_path / "results", "--exp-name", "rq"]
    exp = tmp_path / "results" / "FAR-T-rq"
    first = subprocess.Popen([str(c) for c in torchrun_cmd(*common)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    deadline = time.time() + 240
    while not metrics(exp / "metrics.jsonl") and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    started = time.time()
    second = run(torchrun_cmd(*common), tmp_path)
    assert second.returncode != 0 and time.time() - started < 120
    busy = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert busy and f"run folder {exp} is in use by pid " in busy[0] and " since " in busy[0], second.stderr[-2000:]
    holder = int(busy[0].split("in use by pid ")[1].split()[0])
    assert first.poll() is None and holder != first.pid  # rank 0 of the first run, still alive
    os.kill(holder, 0)

    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    stopped = metrics(exp / "metrics.jsonl")[-1]["step"]
    assert f"Stopped by SIGTERM after step {stopped}" in out, err[-3000:]
    assert [m["step"] for m in metrics(exp / "metrics.jsonl")] == list(range(1, stopped + 1))  # one writer

    requeued = run(torchrun_cmd(*common, "--max-steps", stopped + 2), tmp_path)  # the lock died with the run
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert (f"has checkpoints of its own: resuming from {exp / 'checkpoints' / f'{stopped:07d}.pt'} "
            f"(--gpt-ckpt {base} only seeds a fresh run)") in requeued.stdout
    assert "Changed since the checkpoint: --max-steps 0 -> " in requeued.stdout
    assert [m["step"] for m in metrics(exp / "metrics.jsonl")] == list(range(1, stopped + 3))


def test_requeued_tokenizer_finetune_keeps_its_progress(data, tmp_path):
    common = [sys.executable, ROOT / "tokenizer/vq_train_dual.py", "--data-path", data, *TINY,
              "--global-batch-size", "2", "--ckpt-every", "1000", "--disc-start", "100"]
    r = run(common + ["--exp-name", "base", "--max-steps", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    base = tmp_path / "results_tokenizer_image" / "VQ-16-base" / "checkpoints" / "0000001.pt"
    finetune = common + ["--exp-name", "ft", "--finetune", "--vq-ckpt", base]
    r = run(finetune + ["--max-steps", "2"], tmp_path)
    assert r.returncode == 0 and "finetune: step counter reset" in r.stdout, r.stderr[-3000:]
    r = run(finetune + ["--max-steps", "3"], tmp_path)  # the requeue: the same command line, a longer budget
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "0000002.pt (--vq-ckpt" in r.stdout and "step counter reset" not in r.stdout
    assert [m["step"] for m in metrics(tmp_path / "results_tokenizer_image" / "VQ-16-ft" / "metrics.jsonl")] \
        == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- 2 + 5, one process
def test_corrupt_checkpoint_stale_temporaries_changed_flags_and_umask(setup, tmp_path):
    common = [sys.executable, ROOT / FAR_TRAIN, "--code-path", setup / "codes", *FAR_TINY, "--global-batch-size", "4",
              "--ckpt-every", "2", "--exp-name", "c"]
    umask = lambda m: (lambda: os.umask(m))  # noqa: E731
    r = run(common + ["--max-steps", "4"], tmp_path, preexec_fn=umask(0o027))
    assert r.returncode == 0, r.stderr[-3000:]
    rel = Path("results") / "FAR-T-c" / "checkpoints"  # as the run names it (--results-dir is relative)
    ckpts = tmp_path / rel
    assert (ckpts / "0000004.pt").stat().st_mode & 0o777 == 0o640  # the umask, not mkstemp's 0600
    (ckpts / "0000004.pt").write_bytes(b"PK\x03\x04 truncated by a crash")
    (ckpts / ".0000006.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    r = run(common + ["--max-steps", "6", "--lr", "2e-4"], tmp_path, preexec_fn=umask(0o022))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert f"Removed {rel / '.0000006.pt.k1ll3d.tmp'}, left by an interrupted save" in log
    assert f"{rel / '0000004.pt'}: not a readable torch checkpoint" in log and "trying the checkpoint before" in log
    assert f"resuming from {rel / '0000002.pt'}" in log
    assert "Changed since the checkpoint: --lr 0.0001 -> 0.0002, --max-steps 4 -> 6" in log
    assert (ckpts / "0000006.pt").stat().st_mode & 0o777 == 0o644
    assert not list(ckpts.glob(".*"))

    r = run(common + ["--max-steps", "8", "--global-batch-size", "2", "--image-size", "32"], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert last_line(r.stderr) == (
        f"error: {rel / '0000006.pt'} was trained with --global-batch-size 4; resuming it with "
        f"--global-batch-size 2 would change the data stream or the model: use the original values or a new "
        f"--exp-name")


# ---------------------------------------------------------------------------------------------- 3 images
def png(img: Image.Image, **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    buf.seek(0)
    return Image.open(buf)


def test_every_mode_becomes_its_true_8bit_rgb():
    from utils.images import UnreadableImage, to_rgb

    ramp16 = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0 .. 65535
    sixteen = png(Image.fromarray(ramp16))
    assert sixteen.mode == "I;16" and np.asarray(sixteen.convert("RGB"))[0, 1, 0] == 255  # PIL's: almost white
    got = np.asarray(to_rgb(sixteen))
    assert got.shape == (4, 4, 3) and got.dtype == np.uint8
    assert got[..., 0].ravel().tolist() == [round(int(v) * 255 / 65535) for v in ramp16.ravel()]
    assert np.asarray(to_rgb(Image.fromarray(ramp16.astype(np.int32), "I")))[3, 3, 0] == 255

    # palette with a transparent entry: transparent pixels become the white background, not the hidden colour
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal = png(pal, transparency=1)
    assert np.asarray(pal.convert("RGB"))[0, 1].tolist() == [0, 0, 255]
    assert np.asarray(to_rgb(pal)).tolist() == [[[255, 0, 0], [255, 255, 255]]]

    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8), "RGBA")
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30], [127, 127, 127]]]
    la = Image.fromarray(np.array([[[0, 0], [200, 255]]], np.uint8), "LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255], [200, 200, 200]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 0]]]
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(one))[0, :, 0].tolist() == [0, 255]
    with pytest.raises(UnreadableImage, match="mode F"):
        to_rgb(Image.new("F", (1, 1)))


def test_image_list_is_what_a_user_sees(tmp_path):
    from utils.data import ImageFolderSafe, eval_transform, find_images

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c / "sub").mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / c / "x.png")
    Image.new("RGB", (8, 8)).save(root / "a" / "sub" / "y.png")
    (root / "a" / ".hidden.png").write_bytes(b"")
    (root / "a" / "._x.png").write_bytes(b"")  # macOS resource fork
    (root / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".cache" / "z.png")
    (root / "a" / "sub" / "loop").symlink_to(root / "a")  # loops back
    (root / "a" / "up").symlink_to(root)  # would list b's images as a's
    (root / "a" / "to_b").symlink_to(root / "b")
    (root / "b" / "again.png").symlink_to(root / "b" / "x.png")  # the same file twice
    with pytest.warns(UserWarning) as notes:
        samples, classes = find_images(root)
    assert classes == ["a", "b"]
    assert [(os.path.relpath(p, root), c) for p, c in samples] == [("a/sub/y.png", 0), ("a/x.png", 0),
                                                                 ("b/again.png", 1)]
    assert sum("already listed" in str(n.message) for n in notes) == 3

    # a 16-bit grey image reaches the model as the grey it is (the shared reader behind every entry point)
    (root / "b" / "again.png").unlink()
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(root / "b" / "x.png")  # 32896 / 257 = 128
    x, label = ImageFolderSafe(root, eval_transform(8), 8)._load(2)
    assert label == 1 and torch.allclose(x, torch.full_like(x, 128 / 127.5 - 1), atol=1e-6)


# ---------------------------------------------------------------------------------------------- 4 stops
def test_ctrl_c_checkpoints_and_prints_the_resume_command(data, tmp_path):
    cmd = [sys.executable, ROOT / "tokenizer/vq_train_dual.py", "--data-path", data, *TINY, "--global-batch-size", "2",
           "--ckpt-every", "1000", "--exp-name", "i", "--num-workers", "1"]
    exp = tmp_path / "results_tokenizer_image" / "VQ-16-i"
    code, out, err = interrupt(cmd, exp / "metrics.jsonl", signal.SIGINT, tmp_path, after_steps=1)
    assert code == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    stopped = metrics(exp / "metrics.jsonl")[-1]["step"]
    assert f"Stopped by SIGINT after step {stopped}; resume with:" in out
    assert (exp / "checkpoints" / f"{stopped:07d}.pt").is_file()


@pytest.fixture
def stuck_data(tmp_path):
    """A data folder whose second image is a FIFO nobody writes to: reading it blocks forever."""
    root = tmp_path / "stuck"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / "a" / "0.png")
    os.mkfifo(root / "a" / "1.png")
    return root


def start_stuck(stuck_data, tmp_path, *extra):
    cmd = [sys.executable, ROOT / "tokenizer/vq_train_dual.py", "--data-path", stuck_data, *TINY,
           "--global-batch-size", "2", "--exp-name", "s", *extra]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=ENV)
    log = tmp_path / "results_tokenizer_image" / "VQ-16-s" / "log.txt"
    deadline = time.time() + 120
    while not (log.is_file() and "Training for" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # now blocked opening the FIFO
    return proc


def test_stop_during_a_stuck_read_ends_in_bounded_time(stuck_data, tmp_path):
    proc = start_stuck(stuck_data, tmp_path, "--stop-timeout", "2")
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and time.time() - sent < 15
    assert "Traceback" not in err
    assert last_line(err).startswith("error: stop asked by SIGTERM, but the step in progress did not end within 2 s "
                                     "(--stop-timeout; a stuck data read?): exiting without a checkpoint; resume with:")


def test_second_signal_exits_at_once(stuck_data, tmp_path):
    proc = start_stuck(stuck_data, tmp_path)  # default --stop-timeout: 300 s
    proc.send_signal(signal.SIGINT)
    time.sleep(2.5)  # past the echo window (a launcher's SIGTERM right after Ctrl-C is the same stop)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and time.time() - sent < 10
    assert last_line(err) == "error: second stop signal (SIGINT): exiting at once without a checkpoint"


# ---------------------------------------------------------------------------------------------- 5 disks
def file_size_limit(nbytes: int):
    """A file-size limit stands for a full disk (reliable in CI, no mount needed): writes past it fail with
    EFBIG, as they would with ENOSPC, instead of the default SIGXFSZ kill."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last(setup, tmp_path):
    common = [sys.executable, ROOT / FAR_TRAIN, "--code-path", setup / "codes", *FAR_TINY, "--global-batch-size", "4",
              "--ckpt-every", "2", "--max-steps", "4", "--exp-name", "full"]
    r = run(common, tmp_path, preexec_fn=file_size_limit(1 << 20))  # FAR-T checkpoints are ~3 MB
    assert r.returncode != 0 and "Traceback" not in r.stderr and "unexpected pos" not in r.stderr
    ckpts = Path("results") / "FAR-T-full" / "checkpoints"
    line = last_line(r.stderr)
    assert line.startswith(f"error: {ckpts / '0000002.pt'}: no room for ") and " bytes (" in line, r.stderr[-2000:]
    assert line.endswith("the run stops at step 2")
    assert not list((tmp_path / ckpts).iterdir())  # no partial file, no temporary


def test_full_disk_for_the_npz_is_one_line_not_sigbus(tmp_path):
    script = ("import numpy as np; from utils.npz import ShardedNpzWriter\n"
              f"ShardedNpzWriter({str(tmp_path / 's.npz')!r}, {{'arr_0': ((64, 256, 256, 3), np.uint8)}}, {{}})\n")
    r = run([sys.executable, "-c", script], ROOT, preexec_fn=file_size_limit(1 << 20),
            env=dict(ENV, PYTHONPATH=str(ROOT)))
    assert r.returncode != 0 and "Traceback" in r.stderr  # a library error; sample_c2i turns it into one line
    # the npz in its final layout: 12,582,912 bytes of images, 128 of .npy header, 240 of zip records
    assert f"NoSpace: {tmp_path / 's.npz.parts' / 'npz.partial'}: no room for 12,583,280 bytes" in r.stderr


def test_sampling_with_a_full_disk_and_a_busy_output(setup, tmp_path):
    from autoregressive.sample.sample_c2i import main as sample
    from utils.runfiles import FolderLock

    far_base(tmp_path / "far.pt")
    args = ["--vq-ckpt", str(setup / "dual.pt"), "--gpt-ckpt", str(tmp_path / "far.pt"), "--gpt-model", "FAR-T",
            "--image-size", "32", "--image-size-eval", "32", "--downsample-size", "4", "--num-classes", "3",
            "--num-fid-samples", "4", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path), "--name", "s"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.runfiles import FolderLock; "
                               f"l = FolderLock({str(tmp_path)!r}, 'x', '.s.npz.lock'); print('ok', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env=dict(ENV, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(SystemExit) as e:
            sample(args, 2)
        assert str(e.value.code).startswith(f"error: sample output {tmp_path / 's.npz'} is in use by pid {holder.pid} ")
    finally:
        holder.kill()
        holder.wait()
    FolderLock(tmp_path, "x", ".s.npz.lock").release()  # free again once the holder died
    out = np.load(sample(args, 2))
    assert out["arr_0"].shape == (4, 32, 32, 3)


# ---------------------------------------------------------------------------------------------- 2 content keys
def test_extraction_progress_is_keyed_by_the_checkpoint_content(setup, tmp_path, monkeypatch):
    from autoregressive.data import code_store
    from autoregressive.train import extract_codes
    from tiny import tiny_tokenizer_config
    from tokenizer.models import FactorizedTokenizer, save_tokenizer

    ckpt = tmp_path / "tok.pt"
    ckpt.write_bytes((setup / "dual.pt").read_bytes())
    args = ["--vq-ckpt", str(ckpt), "--data-path", str(setup / "data"), "--image-size", "32", "--num-workers", "0",
            "--batch-size", "4", "--code-path", str(tmp_path / "codes")]
    extract_killed_after_one_batch(args, monkeypatch)
    partial = np.load(tmp_path / "codes" / ".codes_00000.npy.tmp", mmap_mode="r+")
    partial[0] = 63  # marks the finished image
    partial.flush()
    del partial

    torch.manual_seed(5)  # another tokenizer, written at the same path
    save_tokenizer(ckpt, FactorizedTokenizer(tiny_tokenizer_config(2)))
    extract_codes.main(args)
    codes, _ = code_store.CodeDataset(tmp_path / "codes").__getitems__([0])
    assert not (codes == 63).all()  # started afresh: no code of the old tokenizer kept


# ---------------------------------------------------------------------------------------------- 6 counts at the edge
FAR_ARGS = ["--code-path", "codes", *FAR_TINY, "--exp-name", "x"]
SAMPLE_ARGS = ["--vq-ckpt", "v.pt", "--gpt-ckpt", "g.pt"]


@pytest.mark.parametrize("entry,flags,message", [
    ("far", ["--ckpt-every", "0"], "argument --ckpt-every: 0 must be >= 1"),
    ("far", ["--log-every", "0"], "argument --log-every: 0 must be >= 1"),
    ("far", ["--global-batch-size", "0"], "argument --global-batch-size: 0 must be >= 1"),
    ("far", ["--max-steps", "-3"], "argument --max-steps: -3 must be >= 0"),
    ("far", ["--lr", "nan"], "argument --lr: nan is not a finite number"),
    ("far", ["--gradient-accumulation-steps", "0"], "argument --gradient-accumulation-steps: 0 must be >= 1"),
    ("tok", ["--epochs", "0"], "argument --epochs: 0 must be >= 1"),
    ("tok", ["--ema-decay", "1.5"], "argument --ema-decay: 1.5 must be in [0, 1]"),
    ("sample", ["--num-fid-samples", "0"], "argument --num-fid-samples: 0 must be >= 1"),
    ("sample", ["--cfg-scale", "nan"], "argument --cfg-scale: nan is not a finite number"),
    ("sample", ["--temperature", "inf"], "argument --temperature: inf is not a finite number"),
    ("sample", ["--top-p", "1.5"], "argument --top-p: 1.5 must be in (0, 1]"),
    ("sample", ["--per-proc-batch-size", "-1"], "argument --per-proc-batch-size: -1 must be >= 1"),
    ("extract", ["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    ("extract", ["--num-images", "-1"], "argument --num-images: -1 must be >= 0"),
])
def test_counts_and_ranges_are_refused_before_any_work(entry, flags, message, capsys, tmp_path, monkeypatch):
    from autoregressive.sample.sample_c2i import main as sample
    from autoregressive.train.extract_codes import main as extract
    from autoregressive.train.train_c2i import main as train_far
    from tokenizer.train import main as train_tokenizer

    monkeypatch.chdir(tmp_path)
    call = {"far": lambda: train_far(FAR_ARGS + flags),
            "tok": lambda: train_tokenizer(["--data-path", "d", "--exp-name", "x"] + flags),
            "sample": lambda: sample(SAMPLE_ARGS + flags),
            "extract": lambda: extract(["--data-path", "d", "--code-path", "c", "--vq-ckpt", "v"] + flags)}[entry]
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2 and last_line(capsys.readouterr().err).endswith(message)
    assert not list(tmp_path.iterdir())  # nothing was created


@pytest.mark.parametrize("env,extra,status,message", [
    ({"NPROC_PER_NODE": "0"}, [], 2, "error: NPROC_PER_NODE=0: expected a whole number >= 1"),
    ({"NNODES": "two"}, [], 2, "error: NNODES=two: expected a whole number >= 1"),
    ({"NNODES": "2", "NODE_RANK": "2"}, [], 2, "error: NODE_RANK=2: must be below NNODES=2"),
    ({}, ["--gradient-accumulation-steps", "0"], 2, "argument --gradient-accumulation-steps: 0 must be >= 1"),
    # 256 images over 3 processes: no whole split; said before torchrun starts, not by every rank after it
    ({"NPROC_PER_NODE": "3"}, [], 1, "error: --global-batch-size 256 is not divisible by 3 processes x 2 "
                                     "accumulation steps (give --gradient-accumulation-steps, or a number of "
                                     "processes that divides it)"),
])
def test_launch_scripts_check_their_counts(env, extra, status, message, tmp_path):
    r = run(["bash", ROOT / "train_fqgan_dual.sh", *extra], tmp_path, env={**ENV, "NPROC_PER_NODE": "1", **env})
    assert r.returncode == status and last_line(r.stderr).endswith(message), r.stderr[-2000:]
    assert "torch.distributed.run" not in r.stderr and not list(tmp_path.iterdir())


def test_evaluator_warns_for_tiny_batches_and_survives_a_read_only_folder(tmp_path):
    from helpers import photo_crops, write_fake_inception
    from evaluations.evaluator import main

    graph = write_fake_inception(tmp_path / "graph.pb")
    ro = tmp_path / "ro"
    ro.mkdir()
    np.savez(tmp_path / "ref.npz", photo_crops()[:40])
    np.savez(ro / "sample.npz", photo_crops(offset=37)[4:40])
    (ro / "sample.txt").mkdir()  # cannot be written, even by root (for whom a read-only folder is writable)
    r = run([sys.executable, ROOT / "evaluations/evaluator.py", tmp_path / "ref.npz", ro / "sample.npz",
             "--inception-graph", graph, "--backend", "torch", "--batch-size", "16"], tmp_path,
            env=dict(ENV, XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "FID: " in r.stdout and "Recall: " in r.stdout
    assert "warning: the sample batch" in r.stderr and "has 36 images, fewer than the 2048" in r.stderr
    assert f"warning: could not write {ro / 'sample.txt'}" in r.stderr
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "ref.npz"), str(ro / "sample.npz"), "--batch-size", "0"])
    assert e.value.code == 2
