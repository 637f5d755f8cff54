"""Reading checkpoints safely: pickle payloads refused by every entry point, released-layout files still load,
safetensors and hf:// names, the stored config round trip, which weights extraction and sampling read, and the
inputs that used to fail deep inside a library (upper-case image extensions, architecture flags)."""
import argparse
import json
import os
import random
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.models import FAR, FARConfig, load_far, save_far
from demo.photos import build_photo_folder
from tiny import tiny_tokenizer_config
from tokenizer.models import (FactorizedTokenizer, TokenizerConfig, load_tokenizer, released_state_dict,
                              save_tokenizer)
from utils.checkpoint import (UNSAFE_LOAD_ENV, CheckpointError, HubFile, is_safetensors, load_file,
                              weight_preference)
from utils.data import find_images

ROOT = Path(__file__).resolve().parents[1]
TINY_FAR = dict(dim=64, n_layer=1, n_head=4, ar_n_layer=1, vocab_size=64, block_size=64, num_classes=2,
                num_factors=2)


class Payload:
    """What an attacker puts in a checkpoint: unpickling it runs a shell command (here: create a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tokenizer(seed=0, **kw):
    torch.manual_seed(seed)
    return FactorizedTokenizer(tiny_tokenizer_config(2, **kw)).eval()


def _far(seed=0):
    torch.manual_seed(seed)
    return FAR(FARConfig(**TINY_FAR)).eval()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _no_opt_in(monkeypatch):
    # --unsafe-load sets the variable for the rest of its process: keep it from leaking between tests
    monkeypatch.setenv(UNSAFE_LOAD_ENV, "0")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images, a tokenizer and a FAR whose "model" and "ema" weights differ, and a code store."""
    root = tmp_path_factory.mktemp("loading")
    data = build_photo_folder(root / "data", per_class=2, size=40, classes=["cat", "rocket"])
    save_tokenizer(root / "tok.pt", _tokenizer(0), ema=_tokenizer(1))
    save_far(root / "far.pt", _far(0), ema=_far(1))
    from autoregressive.train.extract_codes import main as extract
    extract(["--vq-ckpt", str(root / "tok.pt"), "--data-path", str(data), "--code-path", str(root / "codes"),
             "--image-size", "32", "--num-workers", "0"], num_factors=2)
    return root


# ------------------------------------------------------------------------------------------------------------
# 1. pickle payloads
# ------------------------------------------------------------------------------------------------------------
def _entry_points(evil: Path, root: Path, tmp: Path):
    """Every command that reads a checkpoint, called as its command line would be, with ``evil`` as the file."""
    from autoregressive.sample.sample_c2i import main as sample
    from autoregressive.train.extract_codes import main as extract
    from autoregressive.train.train_c2i import main as train_far
    from tokenizer.reconstruct import main as reconstruct
    from tokenizer.reconstruct_image import main as reconstruct_image
    from tokenizer.train import main as train_tokenizer
    from autoregressive.convert import main as convert

    data, ckpt = str(root / "data"), str(evil)
    image = str(next((root / "data" / "cat").iterdir()))
    tiny_tok = ["--image-size", "32", "--ch", "32", "--ch-mult", "1,2,2", "--num-res-blocks", "1", "--z-channels",
                "32", "--adapter-layers", "1", "--head-layers", "1", "--codebook-size", "64",
                "--codebook-embed-dim", "4", "--perceptual-weight", "0", "--num-workers", "0"]
    far_args = ["--gpt-model", "FAR-T", "--vocab-size", "64", "--image-size", "32", "--downsample-size", "4",
                "--num-classes", "2", "--num-workers", "0", "--global-batch-size", "2"]
    return {
        "reconstruct_image.py --vq-ckpt": lambda: reconstruct_image(
            ["--vq-ckpt", ckpt, "--image", image, "--out", str(tmp / "r.png"), "--image-size", "32"]),
        "reconstruction_vq_ddp_dual.py --vq-ckpt": lambda: reconstruct(
            ["--vq-ckpt", ckpt, "--data-path", data, "--sample-dir", str(tmp)], num_factors=2),
        "extract_codes_c2i_dual_code.py --vq-ckpt": lambda: extract(
            ["--vq-ckpt", ckpt, "--data-path", data, "--code-path", str(tmp / "c")], num_factors=2),
        "sample_c2i_ddp_dual_code.py --vq-ckpt": lambda: sample(
            ["--vq-ckpt", ckpt, "--gpt-ckpt", str(root / "far.pt")], num_factors=2),
        "sample_c2i_ddp_dual_code.py --gpt-ckpt": lambda: sample(
            ["--vq-ckpt", str(root / "tok.pt"), "--gpt-ckpt", ckpt, "--downsample-size", "4", "--image-size",
             "32"], num_factors=2),
        "vq_train_dual.py --vq-ckpt": lambda: train_tokenizer(
            ["--data-path", data, *tiny_tok, "--exp-name", "x", "--results-dir", str(tmp), "--vq-ckpt", ckpt]),
        "train_c2i_dual.py --gpt-ckpt": lambda: train_far(
            ["--code-path", str(root / "codes"), *far_args, "--exp-name", "x", "--results-dir", str(tmp),
             "--gpt-ckpt", ckpt], num_factors=2),
        "python -m autoregressive.convert": lambda: convert([ckpt, str(tmp / "out.safetensors")]),
    }


def test_payload_is_refused_everywhere_and_never_runs(files, tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    # a real tokenizer checkpoint, with the payload where the original keeps its argparse Namespace
    torch.save({"model": released_state_dict(_tokenizer()), "steps": 1, "args": Payload(marker)}, evil)
    expected = f"{evil}: refused: it holds posix.system, which is not weights"

    for name, run in _entry_points(evil, files, tmp_path).items():
        with pytest.raises(SystemExit) as e:
            run()
        msg = str(e.value.code)
        assert msg == f"error: {msg[7:]}" and "\n" not in msg and expected in msg, (name, msg)
        assert "--unsafe-load" in msg and UNSAFE_LOAD_ENV in msg, name
    for load in (load_file, load_tokenizer, load_far):
        with pytest.raises(CheckpointError, match=expected):
            load(evil)
    assert not marker.exists()
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("*.pt"))

    # the explicit opt-in (for files the user trusts) reads it, and so proves the payload is live
    monkeypatch.setenv(UNSAFE_LOAD_ENV, "1")
    assert load_file(evil)["steps"] == 1 and marker.exists()
    marker.unlink()
    monkeypatch.setenv(UNSAFE_LOAD_ENV, "0")
    argparse_flag = argparse.ArgumentParser()
    from utils.checkpoint import add_unsafe_load_argument
    add_unsafe_load_argument(argparse_flag)
    assert argparse_flag.parse_args(["--unsafe-load"]).unsafe_load and load_tokenizer(evil) is not None
    assert marker.exists()


def test_released_layout_files_saved_as_the_original_saves_them_load(tmp_path):
    """The original's training scripts save model, optimizer(s), discriminator, steps and the argparse
    Namespace; ours add the config and an exact-resume entry with every RNG state (numpy's holds an array)."""
    model = _tokenizer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    model.train()(torch.rand(1, 3, 32, 32) * 2 - 1).recon.mean().backward()
    opt.step()
    disc = torch.nn.Conv2d(3, 4, 3)
    args = argparse.Namespace(vq_model="VQ-16", vq_ckpt=None, codebook_size=64, lr=1e-4, ema=True,
                              data_path="/data/imagenet/train", mixed_precision="bf16", gpu=0, distributed=True)
    sd = OrderedDict(released_state_dict(model))
    torch.save({"model": sd, "optimizer": opt.state_dict(), "discriminator": disc.state_dict(),
                "optimizer_disc": torch.optim.Adam(disc.parameters()).state_dict(), "steps": 5000, "args": args,
                "ema": sd}, tmp_path / "original.pt")
    loaded = load_tokenizer(tmp_path / "original.pt")
    assert _same(released_state_dict(loaded), sd) and not loaded.loaded_from.config_stored
    ckpt = load_file(tmp_path / "original.pt")
    assert ckpt["args"] == args and ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)

    from utils.rng import rng_state
    random.seed(3), np.random.seed(3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    resume = {"epoch": 1, "batch_in_epoch": 2, "rng": [rng_state()], "scaler": scaler.state_dict()}
    save_tokenizer(tmp_path / "ours.pt", model, optimizer=opt.state_dict(), args=args, resume=resume)
    back = load_file(tmp_path / "ours.pt")["resume"]
    assert back["rng"][0]["python"] == resume["rng"][0]["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["rng"][0]["numpy"], resume["rng"][0]["numpy"]))
    assert back["scaler"] == resume["scaler"]

    far_args = argparse.Namespace(gpt_model="FAR-T", gpt_ckpt=None, vocab_size=64, ema=False)
    far = _far()
    torch.save({"model": far.state_dict(), "optimizer": torch.optim.AdamW(far.parameters()).state_dict(),
                "steps": 10, "args": far_args}, tmp_path / "far_original.pt")
    assert _same(load_far(tmp_path / "far_original.pt", block_size=64).state_dict(), far.state_dict())


# ------------------------------------------------------------------------------------------------------------
# 2. safetensors, convert, hf:// names
# ------------------------------------------------------------------------------------------------------------
def test_safetensors_files_and_convert(files, tmp_path):
    from autoregressive.convert import main as convert

    model = _tokenizer(0, adapter_heads=4)  # a field no weight shape tells: only the stored config knows it
    save_tokenizer(tmp_path / "tok.safetensors", model)
    assert is_safetensors(tmp_path / "tok.safetensors")
    loaded = load_tokenizer(tmp_path / "tok.safetensors")
    assert loaded.config == model.config and _same(loaded.state_dict(), model.state_dict())
    assert str(loaded.loaded_from) == f"{tmp_path / 'tok.safetensors'} ('model' weights, its stored config)"

    # a released-style file (weights only, no config) -> safetensors with the inferred config
    torch.save({"model": released_state_dict(model), "ema": released_state_dict(_tokenizer(1, adapter_heads=4))},
               tmp_path / "released.pt")
    convert([str(tmp_path / "released.pt"), str(tmp_path / "released.safetensors")])
    back = load_tokenizer(tmp_path / "released.safetensors")
    assert back.loaded_from.weights == "model" and back.loaded_from.config_stored
    assert _same(back.state_dict(), model.state_dict())
    convert([str(tmp_path / "released.pt"), str(tmp_path / "ema.safetensors"), "--ema"])
    assert load_tokenizer(tmp_path / "ema.safetensors").loaded_from.weights == "ema"
    with pytest.raises(CheckpointError, match=r"no weights under any of \['model'\]"):
        load_tokenizer(tmp_path / "ema.safetensors", prefer=("model",))

    # FAR: the stored config carries what weights cannot tell (heads, positions)
    convert([str(files / "far.pt"), str(tmp_path / "far.safetensors")])
    far = load_far(tmp_path / "far.safetensors")
    assert far.config == FARConfig(**TINY_FAR) and _same(far.state_dict(), _far(0).state_dict())

    # a training checkpoint written as weights only: its "model" weights and config, nothing else
    from safetensors import safe_open
    from tokenizer.models import tokenizer_checkpoint
    from utils.checkpoint import write_checkpoint

    train_ckpt = tokenizer_checkpoint(model, _tokenizer(1, adapter_heads=4), optimizer={"state": {}}, steps=3,
                                      args=argparse.Namespace(lr=1.0))
    write_checkpoint(train_ckpt, tmp_path / "0000003.safetensors")
    with safe_open(tmp_path / "0000003.safetensors", "pt") as f:
        assert set(f.keys()) == set(train_ckpt["model"]) and f.metadata()["weights"] == "model"
        assert TokenizerConfig(**json.loads(f.metadata()["config"])) == model.config

    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "tok.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        load_tokenizer(tmp_path / "cut.safetensors")


def test_hub_names():
    assert HubFile.parse("hf://ZechenBai/FQGAN/fqgan_dual_ds16.pt") == \
        HubFile("ZechenBai/FQGAN", "fqgan_dual_ds16.pt")
    f = HubFile.parse("hf://owner/repo@v1.0/sub/dir/far.safetensors")
    assert (f.repo_id, f.revision, f.filename) == ("owner/repo", "v1.0", "sub/dir/far.safetensors")
    assert f.url == "https://huggingface.co/owner/repo/resolve/v1.0/sub/dir/far.safetensors"
    with pytest.raises(CheckpointError, match="expected hf://owner/repo"):
        load_file("hf://just-a-name.pt")


def test_hub_names_from_a_prefilled_cache_offline(files, tmp_path):
    """hf:// names on the command line and in Python, with HF_HUB_OFFLINE=1 and a cache filled beforehand."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--ZechenBai--FQGAN"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "tiny.pt").write_bytes((files / "tok.pt").read_bytes())
    image = next((files / "data" / "cat").iterdir())
    script = f"""
import sys
from tokenizer.reconstruct_image import main
from tokenizer.models import load_tokenizer
main(["--vq-ckpt", "hf://ZechenBai/FQGAN/tiny.pt", "--image", {str(image)!r}, "--out", {str(tmp_path / 'r.png')!r},
      "--image-size", "32"])
try:
    load_tokenizer("hf://ZechenBai/FQGAN/fqgan_dual_ds16.pt")
except Exception as e:
    print("ERROR", type(e).__name__, e)
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Tokenizer: hf://ZechenBai/FQGAN/tiny.pt ('ema' weights, its stored config)" in r.stdout
    assert (tmp_path / "r.png").is_file()
    err = r.stdout.strip().splitlines()[-1]
    assert err.startswith("ERROR CheckpointError hf://ZechenBai/FQGAN/fqgan_dual_ds16.pt: not in the Hugging Face "
                          f"cache ({tmp_path / 'hf' / 'hub'}) and the Hub cannot be reached (HF_HUB_OFFLINE is set)")
    assert "https://huggingface.co/ZechenBai/FQGAN/resolve/main/fqgan_dual_ds16.pt" in err


# ------------------------------------------------------------------------------------------------------------
# 3. the stored config
# ------------------------------------------------------------------------------------------------------------
def test_stored_config_is_built_and_checked(tmp_path):
    model = _tokenizer(0, adapter_heads=4, head_heads=2)
    save_tokenizer(tmp_path / "t.pt", model)
    loaded = load_tokenizer(tmp_path / "t.pt")
    assert loaded.config == model.config and loaded.loaded_from.config_stored  # entropy, heads, teachers too

    def tampered(name, **changes):
        ckpt = torch.load(tmp_path / "t.pt", weights_only=True)
        ckpt["config"].update(changes)
        torch.save(ckpt, tmp_path / name)
        with pytest.raises(CheckpointError) as e:
            load_tokenizer(tmp_path / name)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = tampered("size.pt", codebook_size=32)
    assert msg.startswith(f"{tmp_path / 'size.pt'}: does not fit a dual") and "quantize_vis.embedding.weight " \
        "(64, 4) in file vs (32, 4) in model" in msg and msg.endswith("built from the config stored in the file)")
    msg = tampered("new.pt", flux_capacitor=1)
    assert "not FQGAN tokenizer weights: its stored config has fields TokenizerConfig does not know " \
           "(flux_capacitor)" in msg
    msg = tampered("bad.pt", ch=16)
    assert "its stored config does not describe a model that can be built (TokenizerConfig: ch 16" in msg
    with pytest.raises(CheckpointError, match="not FAR weights: its stored config has fields FARConfig does not"):
        load_far(tmp_path / "t.pt")


# ------------------------------------------------------------------------------------------------------------
# 6. which weights extraction and sampling read
# ------------------------------------------------------------------------------------------------------------
def test_extraction_and_sampling_read_model_weights_unless_ema(files, tmp_path, capsys):
    from autoregressive.sample.sample_c2i import main as sample
    from autoregressive.train.extract_codes import main as extract

    manifest = json.loads((files / "codes" / "manifest.json").read_text())
    assert manifest["extra"]["vq_weights"] == "model"
    extract(["--vq-ckpt", str(files / "tok.pt"), "--data-path", str(files / "data"), "--code-path",
             str(tmp_path / "codes"), "--image-size", "32", "--num-workers", "0", "--ema"], num_factors=2)
    assert f"from {files / 'tok.pt'} ('ema' weights" in capsys.readouterr().out
    common = ["--vq-ckpt", str(files / "tok.pt"), "--gpt-ckpt", str(files / "far.pt"), "--image-size", "32",
              "--image-size-eval", "32", "--downsample-size", "4", "--num-classes", "2", "--num-fid-samples", "1",
              "--per-proc-batch-size", "1", "--grid-samples", "0"]
    for flags, far_w, tok_w in [([], "model", "model"), (["--ema", "--vq-ema"], "ema", "ema")]:
        sample(common + flags + ["--sample-dir", str(tmp_path / far_w)], num_factors=2)  # (the name omits --ema)
        out = capsys.readouterr().out
        assert f"from {files / 'far.pt'} ('{far_w}' weights" in out and f"from {files / 'tok.pt'} ('{tok_w}'" in out
    assert weight_preference(False)[0] == "model" and weight_preference(True) == ("ema",)


# ------------------------------------------------------------------------------------------------------------
# 7. upper-case extensions, architecture flags
# ------------------------------------------------------------------------------------------------------------
def test_upper_case_extensions_are_images(tmp_path):
    for name in ["a.JPG", "b.PNG", "c.Jpeg", "d.jpeg", "e.JPEG", "notes.TXT"]:
        (tmp_path / "cls" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "cls" / name).write_bytes(b"")
    samples, _ = find_images(tmp_path)
    assert [Path(p).name for p, _ in samples] == ["a.JPG", "b.PNG", "c.Jpeg", "d.jpeg", "e.JPEG"]


@pytest.mark.parametrize("flags,message", [
    (["--ch", "16"], "error: TokenizerConfig: ch 16 must be a positive multiple of 32"),
    (["--ch-mult", "1,0,2"], "error: TokenizerConfig: ch_mult (1, 0, 2) must be one or more positive integers"),
    (["--ch-mult", "1,x"], "error: --ch-mult '1,x': expected comma-separated integers"),
    # counts refused by the flag's own type, before the config is built (argparse's exit status 2)
    (["--z-channels", "0"], "argument --z-channels: 0 must be >= 1"),
    (["--codebook-embed-dim", "0"], "argument --codebook-embed-dim: 0 must be >= 1"),
    (["--num-res-blocks", "0"], "argument --num-res-blocks: 0 must be >= 1"),
    (["--adapter-layers", "-1"], "argument --adapter-layers: -1 must be >= 0"),
])
def test_architecture_flags_that_cannot_build_fail_in_one_line(files, tmp_path, flags, message, capsys):
    from tokenizer.train import main as train_tokenizer

    with pytest.raises(SystemExit) as e:
        train_tokenizer(["--data-path", str(files / "data"), "--image-size", "32", "--perceptual-weight", "0",
                         "--exp-name", "x", "--results-dir", str(tmp_path), *flags])
    if message.startswith("argument"):
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    else:
        assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code)
    assert not any(tmp_path.rglob("*.pt"))
