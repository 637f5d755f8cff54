"""val_ddp.py and reconstruction_vq_ddp_{dual,triple}.py end to end, with 2 CPU processes under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo.photos import build_photo_folder
from helpers import torchrun  # (also imported from here by test_generate_cuda.py)
from tiny import tiny_tokenizer_config
from tokenizer.models import FactorizedTokenizer, load_tokenizer, save_tokenizer
from tokenizer.reconstruct import image_metrics
from utils.data import center_crop_arr, find_images, to_model_range
from utils.images import to_uint8

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    # 7 images over 3 classes: an odd count, so the two ranks get different numbers of images
    root = build_photo_folder(tmp_path_factory.mktemp("val"), per_class=3, size=40, classes=["cat", "coffee", "rocket"])
    os.remove(root / "rocket" / "0002.png")
    os.remove(root / "coffee" / "0001.png")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_tokenizer(d / "dual.pt", FactorizedTokenizer(tiny_tokenizer_config(2)))
    save_tokenizer(d / "triple.pt", FactorizedTokenizer(tiny_tokenizer_config(3)))
    return d


def test_readme_commands_with_two_processes(photos, checkpoints, tmp_path, private_cache):
    # The reference batch of tar shards of the photos (3, 3 and 1 images: the ranks' rows cross shards), then
    # the dual reconstructions of the same shards and the triple ones of the folder: row i is image i in both.
    from tokenizer import val_ddp
    from utils.shards import convert

    convert(photos, tmp_path / "shards", prefix="val", max_count=3, log=lambda *a: None)
    sharded = tmp_path / "shards" / "val-{000000..000002}.tar"
    r = torchrun("tokenizer/val_ddp.py", "--data-path", sharded, "--image-size", 32, "--per-proc-batch-size", 2,
                 "--num-workers", 0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ref = np.load(tmp_path / "reconstructions" / "val_imagenet.npz")["arr_0"]
    samples, _ = find_images(photos)
    assert ref.shape == (7, 32, 32, 3) and ref.dtype == np.uint8
    for i, (path, _) in enumerate(samples):  # dataset order, each image once
        assert np.array_equal(ref[i], np.asarray(center_crop_arr(Image.open(path).convert("RGB"), 32)))
    folder_ref = val_ddp.main(["--data-path", str(photos), "--image-size", "32", "--num-workers", "0",
                               "--sample-dir", str(tmp_path / "of_folder")])
    assert np.array_equal(np.load(folder_ref)["arr_0"], ref)  # the folder's reference batch, row for row

    for name, script, data in [("dual", "tokenizer/reconstruction_vq_ddp_dual.py", sharded),
                               ("triple", "tokenizer/reconstruction_vq_ddp_triple.py", photos)]:
        r = torchrun(script, "--data-path", data, "--image-size", 32, "--vq-ckpt", checkpoints / f"{name}.pt",
                     "--codebook-size", 64, "--codebook-embed-dim", 4, "--per-proc-batch-size", 3,
                     "--with_clip_supervision", "--folder-name", f"T_{name}", "--num-workers", 0, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "PSNR:" in r.stdout and "SSIM:" in r.stdout
        rec = np.load(tmp_path / "reconstructions" / f"T_{name}.npz")["arr_0"]
        assert rec.shape == ref.shape and rec.dtype == np.uint8
        # row i is the reconstruction of reference row i
        model = load_tokenizer(checkpoints / f"{name}.pt")
        with torch.no_grad():
            x = to_model_range(Image.fromarray(ref[5]))[None]
            expect = to_uint8(model.decode_indices(model.encode_indices(x)))[0].numpy()
        assert np.abs(rec[5].astype(int) - expect.astype(int)).max() <= 1
        res = json.loads((tmp_path / "reconstructions" / f"T_{name}.json").read_text())
        psnr, ssim, _ = image_metrics(rec, ref.astype(np.float32) / 255.0)
        assert res["num_images"] == 7
        assert res["psnr"] == pytest.approx(np.mean(psnr), abs=1e-3)
        assert res["ssim"] == pytest.approx(np.mean(ssim), abs=1e-3)
        assert [f["name"] for f in res["factors"]] == model.factor_names
        assert all(0 < f["usage"] <= 1 and f["perplexity"] >= 1 for f in res["factors"])
        txt = (tmp_path / "reconstructions" / f"T_{name}_results.txt").read_text()
        assert txt.startswith("PSNR: ") and ", SSIM: " in txt


def test_psnr_ssim_follow_the_original_definitions():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    gt = rng.random((2, 16, 16, 3), dtype=np.float32)
    rec = np.clip(gt * 255 + rng.normal(0, 8, gt.shape), 0, 255).astype(np.uint8)
    psnr, ssim, ssim_true = image_metrics(rec, gt)
    mse = np.mean((rec[0] / 255.0 - gt[0]) ** 2)
    assert psnr[0] == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
    assert ssim[0] == pytest.approx(structural_similarity(rec[0] / np.float32(255), gt[0], data_range=2.0,
                                                          channel_axis=-1), rel=1e-6)
    assert ssim[0] > ssim_true[0]  # the data_range=2 quirk reads higher


def test_wrong_factor_count_and_flag_mismatch(photos, checkpoints, tmp_path):
    script = [sys.executable, str(ROOT / "tokenizer/reconstruction_vq_ddp_dual.py"), "--data-path", str(photos),
              "--image-size", "32", "--num-workers", "0"]
    r = subprocess.run(script + ["--vq-ckpt", str(checkpoints / "triple.pt")], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "holds a triple" in r.stderr and "but 2 factors were expected" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(script + ["--vq-ckpt", str(checkpoints / "dual.pt"), "--codebook-size", "16384"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "--codebook-size 16384 does not match" in r.stderr
    r = subprocess.run(script[:3] + [str(tmp_path / "nowhere"), "--vq-ckpt", str(checkpoints / "dual.pt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "no such folder" in r.stderr and "Traceback" not in r.stderr
