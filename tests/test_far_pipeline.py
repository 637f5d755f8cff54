"""The generator pipeline end to end with 2 CPU processes: code extraction, training (DDP and FSDP), exact
resume, and FID-ready sampling; plus the errors for inputs that do not fit."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.data.code_store import CodeDataset
from autoregressive.sample.sample_c2i import main as sample_main
from demo.photos import build_photo_folder
from helpers import FAR_TINY, torchrun
from utils.checkpoint import load_file

ROOT = Path(__file__).resolve().parents[1]


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_extracted_code_store(setup):
    ds = CodeDataset(setup / "codes", expect_factors=2, vocab_size=64)
    assert len(ds) == 12 and ds.info.num_augs == 10 and ds.info.num_classes == 3
    assert ds.info.factor_names == ["vis", "sem"] and ds.info.grid == [8, 8]
    codes, labels = ds.__getitems__(list(range(12)))
    assert codes.shape == (12, 64, 2) and sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert codes.min() >= 0 and codes.max() < 64


def test_train_resume_and_sample(setup):
    root = setup
    common = ["autoregressive/train/train_c2i_dual.py", "--code-path", root / "codes", *FAR_TINY,
              "--global-batch-size", "4", "--ckpt-every", "2", "--max-steps", "4", "--ema"]
    r = torchrun(*common, "--exp-name", "full", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    exp = root / "results" / "FAR-T-full"
    full = metrics(exp / "metrics.jsonl")
    assert [m["step"] for m in full] == [1, 2, 3, 4] and {"loss_vis", "loss_sem", "grad_norm"} <= set(full[0])
    assert full[0]["loss"] == pytest.approx(np.log(64), rel=1e-3)  # zero-initialised output layers
    ckpt = load_file(exp / "checkpoints" / "0000004.pt")  # weights only: args, optimizer, numpy RNG state allowed
    assert {"model", "ema", "optimizer", "steps", "args"} <= set(ckpt) and "tok_embeddings_2.weight" in ckpt["model"]

    r = torchrun(*common, "--exp-name", "resumed", "--gpt-ckpt", exp / "checkpoints" / "0000002.pt", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = metrics(root / "results" / "FAR-T-resumed" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):  # dropout and label dropout included: RNG state restored per rank
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]

    sample_args = ["--vq-ckpt", root / "dual.pt", "--gpt-ckpt", exp / "checkpoints" / "0000004.pt",
                   "--gpt-model", "FAR-T", "--image-size", 32, "--image-size-eval", 32, "--downsample-size", 4,
                   "--num-classes", 3, "--cfg-scale", 2.0, "--num-fid-samples", 7, "--class-balanced",
                   "--top-k", 16, "--sample-dir", root / "samples"]
    r = torchrun("autoregressive/sample/sample_c2i_ddp_dual_code.py", *sample_args, "--per-proc-batch-size", 2,
                 cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    name = "FAR-T-0000004-size-32-size-32-VQ-4-topk-16-topp-1.0-temperature-1.0-cfg-2.0-seed-0"
    out = np.load(root / "samples" / f"{name}.npz")
    assert out["arr_0"].shape == (7, 32, 32, 3) and out["arr_0"].dtype == np.uint8
    assert sorted(out["arr_1"].tolist()) == [0, 0, 0, 1, 1, 2, 2]
    assert (root / "samples" / f"{name}.png").is_file()
    # one process with another batch size writes the same images: image i samples from stream (seed, i)
    # (single-threaded like the torchrun workers: the thread count changes float rounding on a CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = sample_main([*map(str, sample_args), "--per-proc-batch-size", "3", "--name", "one-process"], 2)
    finally:
        torch.set_num_threads(threads)
    single = np.load(one)
    assert np.array_equal(single["arr_1"], out["arr_1"]) and np.array_equal(single["arr_0"], out["arr_0"])


def test_fsdp_matches_ddp_at_the_first_step(setup):
    root = setup
    common = ["autoregressive/train/train_c2i_dual.py", "--code-path", root / "codes", *FAR_TINY,
              "--global-batch-size", "4", "--max-steps", "2", "--dropout-p", "0", "--token-dropout-p", "0"]
    runs = {}
    for name, extra in [("ddp", []), ("fsdp", ["--fsdp"])]:
        r = torchrun(*common, *extra, "--exp-name", name, cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = metrics(root / "results" / f"FAR-T-{name}" / "metrics.jsonl")
    for a, b in zip(runs["ddp"], runs["fsdp"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    sd = load_file(root / "results" / "FAR-T-fsdp" / "checkpoints" / "0000002.pt")["model"]
    assert sd["norm.weight"].shape == (256,)  # full tensors, not shards


def _fails(script, *args, cwd):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.stderr.strip().splitlines()[-1]


def test_inputs_that_do_not_fit(setup):
    root = setup
    msg = _fails("autoregressive/train/train_c2i_triple.py", "--code-path", root / "codes", *FAR_TINY,
                 "--exp-name", "x", cwd=root)
    assert "holds 2-factor codes (vis, sem), but 3 factors were expected" in msg
    msg = _fails("autoregressive/train/train_c2i_dual.py", "--code-path", root / "codes", *FAR_TINY[:2],
                 "--vocab-size", "32", *FAR_TINY[4:], "--exp-name", "x", cwd=root)
    assert "64-entry codebook, larger than --vocab-size 32" in msg
    msg = _fails("autoregressive/train/extract_codes_c2i_dual_code.py", "--vq-ckpt", root / "triple.pt",
                 "--data-path", root / "data", "--code-path", root / "x", "--image-size", "32", cwd=root)
    assert "holds a triple" in msg and "2 factors were expected" in msg
    msg = _fails("autoregressive/sample/sample_c2i_ddp_dual_code.py", "--vq-ckpt", root / "dual.pt",
                 "--gpt-ckpt", root / "dual.pt", "--image-size", "32", "--downsample-size", "4", cwd=root)
    assert "not FAR weights" in msg


def test_extraction_skips_unreadable_images(setup, tmp_path):
    data = build_photo_folder(tmp_path / "data", per_class=2, size=40, classes=["cat", "rocket"])
    (data / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    r = subprocess.run([sys.executable, str(ROOT / "autoregressive/train/extract_codes_c2i_dual_code.py"),
                        "--vq-ckpt", str(setup / "dual.pt"), "--data-path", str(data), "--code-path",
                        str(tmp_path / "codes"), "--image-size", "32", "--ten-crop", "--num-workers", "0"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Skipped 1 unreadable images" in r.stdout
    ds = CodeDataset(tmp_path / "codes")
    assert ds.info.extra["skipped"] == 1 and len(ds) == 4  # the broken file is left out
    assert (ds.__getitems__(list(range(4)))[1] >= 0).all()
