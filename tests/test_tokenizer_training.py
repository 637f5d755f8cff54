"""Tokenizer training end to end: 2-process torchrun on CPU, exact resume, bad files, missing weights."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from demo.photos import build_photo_folder
from helpers import TINY, free_port, interrupt, torchrun, torchrun_cmd
from tokenizer.models import load_tokenizer
from utils.checkpoint import load_file
from utils.shards import convert

ROOT = Path(__file__).resolve().parents[1]


def metrics(exp_dir):
    return [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "clip"
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8)
    transformers.CLIPVisionModel(cfg).save_pretrained(path)
    return path


def test_two_process_training_and_exact_resume_on_shards(data, tiny_clip, tmp_path, private_cache):
    common = ["tokenizer/vq_train_dual.py", "--data-path", data, *TINY, "--global-batch-size", "4",
              "--disc-start", "3", "--ckpt-every", "2", "--epochs", "2", "--ema", "--image-every", "2",
              "--with_clip_supervision", "--teacher-sem", tiny_clip, "--teacher-image-size", "32"]
    r = torchrun(*common, "--exp-name", "full", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = tmp_path / "results_tokenizer_image" / "VQ-16-full"
    full = metrics(exp)
    assert [m["step"] for m in full] == [1, 2, 3, 4]
    for key in ["rec_loss", "codebook_loss_vis", "commit_loss_sem", "entropy_loss_vis", "codebook_usage_sem",
                "disentangle_loss", "semantic_loss_sem", "generator_adv_loss", "grad_norm", "lr"]:
        assert key in full[0], key
    assert full[0]["disc_factor"] == 0 and full[2]["disc_factor"] == 1 and "logits_real" in full[2]
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["0000002.pt", "0000004.pt"]
    assert (exp / "images" / "0000002.png").is_file() and any((exp / "tensorboard").iterdir())
    ckpt = load_file(exp / "checkpoints" / "0000004.pt")  # weights only: args, optimizers, numpy RNG state allowed
    assert {"model", "ema", "optimizer", "discriminator", "optimizer_disc", "steps", "args"} <= set(ckpt)
    assert ckpt["steps"] == 4 and len(ckpt["resume"]["rng"]) == 2
    assert "encoder.semantic_head.0.ln_pre.weight" in ckpt["model"] and "feat_pred_head.ln_post.bias" in ckpt["ema"]
    assert load_tokenizer(exp / "checkpoints" / "0000004.pt").config.factors[1].head_width == 32

    # The same data as tar shards (3 shards: a rank's batches cross them), stopped by SIGTERM through torchrun
    # (a longer run: the signal must find it training) and continued by --auto-resume: the losses of every step
    # equal the folder's uninterrupted run, before the stop and after it.
    shards = tmp_path / "shards"
    convert(data, shards, prefix="train", max_count=3, log=lambda *a: None)
    sharded = [*common[:2], f"{shards}/train-{{000000..000002}}.tar", *common[3:], "--exp-name", "sharded"]
    sharded_exp = tmp_path / "results_tokenizer_image" / "VQ-16-sharded"
    code, out, err = interrupt(torchrun_cmd(*sharded, "--epochs", "40"), sharded_exp / "metrics.jsonl",
                               signal.SIGTERM, tmp_path, after_steps=1)
    stopped = metrics(sharded_exp)[-1]["step"]
    assert f"Stopped by SIGTERM after step {stopped}; resume with:" in out and stopped < 4, err[-3000:]
    r = torchrun(*sharded, "--auto-resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Dataset: 8 images in 2 classes" in (sharded_exp / "log.txt").read_text()
    resumed = metrics(sharded_exp)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for k in ("loss", "rec_loss", "semantic_loss_sem", "disc_loss", "grad_norm"):  # disc_loss from step 3
            assert a.get(k) == b.get(k), (a["step"], k, a.get(k), b.get(k))


def test_discriminator_step_runs_its_ddp_module_once_per_micro_batch(data, tmp_path):
    """DDP broadcasts buffers (BatchNorm's running statistics) in place at every forward. Two forwards before a
    backward, real then fake, make PyTorch < 2.14 fail at the backward (seen with 2.11 under torchrun), so the
    step runs both batches in one call of its module (``RealAndFake``), once per micro-batch."""
    from tokenizer import train as tokenizer_train

    cfg = tokenizer_train.parse_config(
        ["--data-path", str(data), *TINY, "--global-batch-size", "4", "--gradient-accumulation-steps", "2",
         "--disc-start", "1", "--exp-name", "d", "--results-dir", str(tmp_path), "--no-local-save"], "dual")
    t = tokenizer_train.build(cfg)
    calls = []
    t.train_disc.register_forward_pre_hook(lambda module, inputs: calls.append(len(inputs)))
    logs, _, _ = tokenizer_train.train_step(t, torch.rand(4, 3, 32, 32) * 2 - 1, step=1)
    assert calls == [2, 2] and float(logs["disc_factor"]) == 1.0


def test_resume_mid_epoch_single_process(data, tmp_path):
    common = [sys.executable, str(ROOT / "tokenizer/vq_train_triple.py"), "--data-path", str(data), *TINY,
              "--global-batch-size", "2", "--disc-start", "2", "--ckpt-every", "3", "--max-steps", "5",
              "--dropout-p", "0.1"]
    r = subprocess.run(common + ["--exp-name", "a"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    exp = tmp_path / "results_tokenizer_image" / "VQ-16-a"
    full = metrics(exp)
    assert [m["step"] for m in full] == [1, 2, 3, 4, 5] and "codebook_loss_sem_high" in full[0]
    r = subprocess.run(common + ["--exp-name", "a", "--auto-resume"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "nothing" not in r.stderr  # already finished: resumes at 5 and stops
    ckpt = exp / "checkpoints" / "0000003.pt"
    r = subprocess.run(common + ["--exp-name", "b", "--vq-ckpt", str(ckpt)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3, epoch 0, batch 3" in r.stdout  # mid-epoch (4 steps per epoch)
    resumed = metrics(tmp_path / "results_tokenizer_image" / "VQ-16-b")
    for a, b in zip(full[3:], resumed):
        assert a["step"] == b["step"] and a["loss"] == b["loss"] and a["disc_loss"] == b["disc_loss"]


def test_corrupt_image_is_skipped_and_counted(data, tmp_path):
    bad = tmp_path / "data"
    build_photo_folder(bad, per_class=2, size=40, classes=["cat"])
    (bad / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = subprocess.run([sys.executable, str(ROOT / "tokenizer/vq_train_dual.py"), "--data-path", str(bad), *TINY,
                        "--global-batch-size", "3", "--max-steps", "2", "--exp-name", "bad"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(tmp_path / "results_tokenizer_image" / "VQ-16-bad")
    assert m[-1]["bad_images"] >= 1 and "skipped" in r.stdout


def _run_fail(args, tmp_path, **env):
    r = subprocess.run([sys.executable, str(ROOT / "tokenizer/vq_train_dual.py"), *args],
                       capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, **env))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "results_tokenizer_image" / "VQ-16-x" / "checkpoints").exists()
    return r.stderr.strip().splitlines()[-1]


def test_missing_teacher_and_vgg_messages(data, tmp_path):
    base = ["--data-path", str(data), *TINY, "--global-batch-size", "2", "--max-steps", "1", "--exp-name", "x"]
    msg = _run_fail(base + ["--with_clip_supervision"], tmp_path, HF_HUB_OFFLINE="1",
                    HF_HOME=str(tmp_path / "hf"))
    assert "openai/clip-vit-large-patch14" in msg and "--teacher-sem" in msg
    args = [a for a in base if a != "0" or base[base.index(a) - 1] != "--perceptual-weight"]
    args[args.index("--perceptual-weight") + 1] = "1"
    msg = _run_fail(args, tmp_path, TORCH_HOME=str(tmp_path / "torch"))
    assert "vgg16-397923af.pth" in msg and "--perceptual-weight 0" in msg
    msg = _run_fail(["--data-path", str(tmp_path / "none"), *TINY, "--exp-name", "x"], tmp_path)
    assert "no such folder" in msg


def test_launch_script_with_environment_overrides(data, tmp_path):
    """train_fqgan_triple.sh: torchrun settings and the data path from the environment, extra flags win."""

    env = dict(os.environ, NPROC_PER_NODE="2", DATA_PATH=str(data), MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", EXP_NAME="script")
    r = subprocess.run(["bash", str(ROOT / "train_fqgan_triple.sh"), *TINY, "--global-batch-size", "4",
                        "--max-steps", "1", "--no-clip-supervision"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--nproc_per_node=2" in r.stderr and "vq_train_triple.py" in r.stderr
    # the split the script prints before torchrun is the one the run logs (the same code computes both)
    split = "batch: 4 images per step = 2 processes x 1 accumulation steps x 2 images per forward pass"
    assert r.stderr.splitlines()[0].startswith(split) and split in r.stdout
    m = metrics(tmp_path / "results_tokenizer_image" / "VQ-16-script")
    assert m[0]["step"] == 1 and "codebook_loss_sem_high" in m[0]
