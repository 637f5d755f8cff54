"""LlamaGen's released family through this project's code: its single-codebook tokenizers (``vq_ds16_c2i.pt``,
``vq_ds8_c2i.pt``) are the one-factor tokenizer without adapter, its GPT generators FAR with one factor, no factor
head and no aggregation layer. The numbers LlamaGen's own code computes (tests/data/golden_llamagen.npz, from the
deterministic weights of reference_weights.py in LlamaGen's key layout) are reproduced through the public loaders,
and the files we write list exactly LlamaGen's keys. Tolerances are the reference README's."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from autoregressive.models import FAR, far_config, generate, infer_far_config, load_far, save_far
from autoregressive.models.checkpoint import far_from_checkpoint
from reference_weights import coffee, golden, reference_keys, reference_state_dict
from tokenizer.models import (FactorizedTokenizer, describe_tokenizer, infer_tokenizer_config, load_tokenizer,
                              released_state_dict, save_tokenizer)
from tokenizer.models.checkpoint import tokenizer_from_checkpoint
from utils.checkpoint import CheckpointError

GOLDEN = golden("golden_llamagen")


@pytest.fixture
def one_thread():
    """Decode-sized work runs single-threaded (see test_far_model.one_thread); the tokenizers' convolutions
    keep every thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def key_list(name: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(e["key"], tuple(e["shape"])) for e in reference_keys(f"llamagen_{name}")]


# ------------------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------------------
VQ = {"vq16": "VQ-16", "vq8": "VQ-8"}
_TOKENIZERS: dict = {}


def llamagen_tokenizer(name: str) -> FactorizedTokenizer:
    """A LlamaGen tokenizer file's content ({"model": weights}) through the public loader: config inferred."""
    if name not in _TOKENIZERS:
        ckpt = {"model": reference_state_dict(f"llamagen_{name}")}
        _TOKENIZERS[name] = tokenizer_from_checkpoint(ckpt, f"{name}.pt")
    return _TOKENIZERS[name]


@pytest.fixture(scope="module", autouse=True)
def free_tokenizers():
    yield
    _TOKENIZERS.clear()


@pytest.mark.parametrize("name,size", [("vq16", 256), ("vq16", 384), ("vq8", 256)])
def test_tokenizer_golden(name, size):
    """Codes and reconstructions of LlamaGen's code; VQ-16 also at 384 px (24x24 codes: the tokenizer is fully
    convolutional)."""
    tok = llamagen_tokenizer(name)
    case = name if size == 256 else f"{name}_{size}"
    grid = size // tok.config.downsample
    indices = tok.encode_indices(coffee(size))
    assert indices.shape == (1, 1, grid, grid)
    ref = GOLDEN[f"{case}/indices"]
    assert (indices.flatten().numpy() == ref).mean() >= 0.99  # identical but for true near-ties
    with torch.no_grad():
        recon = tok.decode_indices(torch.from_numpy(ref).long().reshape(indices.shape))
    assert np.abs(recon[0].numpy() - GOLDEN[f"{case}/recon"].astype(np.float32)).max() < 2e-3


@pytest.mark.parametrize("name", sorted(VQ))
def test_tokenizer_config_inferred_and_layout_written(name):
    """VQ-16 / VQ-8, the codebook and one factor without adapter or head are read from the keys; the model
    writes exactly LlamaGen's key list, in its order."""
    tok = llamagen_tokenizer(name)
    cfg = tok.config
    assert (cfg.num_factors, cfg.with_adapters, cfg.head_factors) == (1, False, [])
    assert (f"VQ-{cfg.downsample}", cfg.codebook_size, cfg.codebook_embed_dim) == (VQ[name], 16384, 8)
    assert describe_tokenizer(cfg) == (f"a single-codebook {VQ[name]} tokenizer (LlamaGen's VQModel; "
                                       f"codebook 16384 x 8)")
    assert str(tok.loaded_from) == f"{name}.pt ('model' weights, config inferred from the weights)"
    with torch.device("meta"):
        fresh = FactorizedTokenizer("single", vq_model=VQ[name])
    assert fresh.config == cfg
    assert [(k, tuple(v.shape)) for k, v in released_state_dict(fresh).items()] == key_list(name)


def test_single_tokenizer_file_round_trip(tmp_path):
    """A tiny single-codebook tokenizer written as LlamaGen writes it (no config) and as we do (with one)
    loads back through load_tokenizer with the same weights; a wrong file is one error listing its keys."""
    from tiny import tiny_tokenizer_config

    torch.manual_seed(0)
    cfg = tiny_tokenizer_config(1, with_adapters=False, base_image_size=256)
    model = FactorizedTokenizer(cfg).eval()
    sd = released_state_dict(model)
    assert "quantize.embedding.weight" in sd and not any("adapter" in k or "_vis" in k for k in sd)
    torch.save({"model": sd}, tmp_path / "theirs.pt")
    save_tokenizer(tmp_path / "ours.pt", model)
    for file in ("theirs.pt", "ours.pt"):
        loaded = load_tokenizer(tmp_path / file)
        assert describe_tokenizer(loaded.config) == describe_tokenizer(cfg) == \
            "a single-codebook 4x tokenizer (LlamaGen's VQModel; codebook 64 x 4)"
        for (k, a), b in zip(sd.items(), released_state_dict(loaded).values()):
            assert torch.equal(a, b), k
    assert load_tokenizer(tmp_path / "ours.pt").config == cfg  # the config it stored
    assert infer_tokenizer_config(sd).ch_mult == cfg.ch_mult
    sd.pop("quantize.codebook_used")
    with pytest.raises(CheckpointError, match=r"does not fit a single-codebook 4x tokenizer .*missing keys: "
                                              r"quantize.codebook_used"):
        tokenizer_from_checkpoint({"model": sd}, "broken.pt")


# ------------------------------------------------------------------------------------------------------------
# generators
# ------------------------------------------------------------------------------------------------------------
GPT_CODES = {"gpt_small": "vq16", "gpt_small_hd100": "vq16_384"}  # the golden codes each was run on
GPT_SIZES = {"GPT_B": "GPT-B", "GPT_L": "GPT-L", "GPT_XL": "GPT-XL", "GPT_XXL": "GPT-XXL", "GPT_3B": "GPT-3B"}


def llamagen_gpt(name: str) -> FAR:
    """The small golden GPTs as LlamaGen files, through the public loader: gpt_small a DDP training file whose
    args give the grid (and the 64-dimensional-head rule its 4 heads), gpt_small_hd100 a bare FSDP state dict
    whose 2 heads of 100 and 24x24 grid come from the caller."""
    sd = reference_state_dict(f"llamagen_{name}")
    if name == "gpt_small":
        args = argparse.Namespace(gpt_model="GPT-custom", image_size=256, downsample_size=16)
        return far_from_checkpoint({"model": sd, "steps": 1, "args": args}, f"{name}.pt")
    return far_from_checkpoint(sd, f"{name}.pt", n_head=2, block_size=24 * 24)


@pytest.fixture(scope="module", params=sorted(GPT_CODES))
def gpt(request):
    name = request.param
    model = llamagen_gpt(name)
    cfg = json.loads(str(GOLDEN[f"{name}/config"]))
    assert (model.config.dim, model.config.n_layer, model.config.n_head, model.config.grid_size) == \
        (cfg["dim"], cfg["n_layer"], cfg["n_head"], cfg["grid"])
    return name, model


def test_gpt_golden_teacher_forced(gpt):
    name, model = gpt
    codes = torch.from_numpy(GOLDEN[f"{GPT_CODES[name]}/indices"].astype(np.int64))[None, :, None]  # (1, T, 1)
    with torch.no_grad():
        logits = model(codes, torch.tensor([207])).logits[0][0]
    ref = torch.from_numpy(GOLDEN[f"{name}/tf_logits"])
    got = logits[torch.from_numpy(GOLDEN[f"{name}/tf_positions"]).long()]
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("scale", [2.0, 1.0])
@pytest.mark.usefixtures("one_thread")
def test_gpt_golden_generation(gpt, scale):
    """Top-1 tokens guided at 2.0, and at 1.0 (LlamaGen guides only above 1: the conditional rows alone)."""
    name, model = gpt
    codes = generate(model, [207], cfg_scale=scale, top_k=1)
    ref = GOLDEN[f"{name}/cfg{int(scale)}_top1_tokens"]
    assert codes.shape == (1, len(ref), 1) and np.array_equal(codes[0, :, 0].numpy(), ref)


def test_gpt_loaded_from_says_where_heads_and_grid_came_from():
    small, hd100 = (str(llamagen_gpt(n).loaded_from) for n in ("gpt_small", "gpt_small_hd100"))
    assert small == ("gpt_small.pt ('model' weights, config inferred from the weights; 4 heads from 64-dimensional "
                     "heads assumed, 16x16 tokens from its args (image_size 256, downsample_size 16))")
    assert hd100 == ("gpt_small_hd100.pt (a bare state dict, config inferred from the weights; 2 heads from the "
                     "caller (2 heads), 24x24 tokens from the caller)")


@pytest.mark.parametrize("name", sorted(GPT_SIZES))
def test_gpt_layouts_and_configs_from_key_lists(name):
    """Every released GPT's key list gives its size on the meta device (GPT-3B: 32 heads of 100, from the
    size table), and the model writes exactly that key list, in its order."""
    keys = key_list(name)
    cfg = infer_far_config({k: torch.empty(shape, device="meta") for k, shape in keys})
    assert cfg == far_config(GPT_SIZES[name], "single") and cfg.is_gpt
    if name == "GPT_3B":
        assert (cfg.n_head, cfg.head_dim) == (32, 100)
    with torch.device("meta"):
        model = FAR(cfg)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == keys


def tiny_gpt(**kw) -> FAR:
    torch.manual_seed(0)
    cfg = dict(dim=64, n_layer=2, n_head=2, vocab_size=40, block_size=16, num_classes=10)
    model = FAR(far_config("GPT-B", 1, **{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():  # well-spread distributions; the init would zero the outputs
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return model


def test_gpt_files_load_strictly(tmp_path):
    """DDP files ("model", "ema") and bare FSDP state dicts load; entries that are not weights (LlamaGen's KV
    caches, rotary table) are dropped by name; any other missing or extra key is one error listing them."""
    model = tiny_gpt()
    sd = model.state_dict()
    assert list(sd)[:2] == ["cls_embedding.embedding_table.weight", "tok_embeddings.weight"]
    assert "output.weight" in sd and not any(k.startswith(("aggregation_layer", "ar_head")) for k in sd)
    runtime = {"freqs_cis": torch.zeros(17, 16, 2), "layers.0.attention.kv_cache.k_cache": torch.zeros(1),
               "layers.0.attention.kv_cache.v_cache": torch.zeros(1)}
    torch.save({"model": {**sd, **runtime}, "ema": sd, "optimizer": {}, "steps": 3}, tmp_path / "ddp.pt")
    torch.save({**sd, **runtime}, tmp_path / "fsdp.pt")
    for file, prefer in (("ddp.pt", ("ema",)), ("ddp.pt", None), ("fsdp.pt", None)):
        loaded = load_far(tmp_path / file, gpt_model="GPT-B", n_head=2, block_size=16,
                          **({"prefer": prefer} if prefer else {}))
        assert loaded.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sd.values()))
    broken = {**sd, "layers.0.attention.bias": torch.zeros(1)}
    del broken["norm.weight"]
    with pytest.raises(CheckpointError, match=r"^bad.pt: does not fit a LlamaGen GPT generator \(dim 64, 2 layers, "
                                              r"2 heads of 32.*missing keys: norm.weight; unexpected keys: "
                                              r"layers.0.attention.bias$"):
        far_from_checkpoint(broken, "bad.pt", n_head=2)
    with pytest.raises(CheckpointError, match=r"trained on 16x16 tokens \(its args \(image_size 256, "
                                              r"downsample_size 16\)\), but 24x24 were asked for"):
        far_from_checkpoint({"model": sd, "args": argparse.Namespace(image_size=256, downsample_size=16)},
                            "ddp.pt", n_head=2, block_size=24 * 24)
    with pytest.raises(ValueError, match="GPT-B is LlamaGen's single-codebook generator: it predicts 1 factor"):
        far_config("GPT-B", "dual")


def test_gpt_file_written_here_has_llamagen_keys(tmp_path):
    model = tiny_gpt()
    save_far(tmp_path / "gpt.pt", model)
    ckpt = torch.load(tmp_path / "gpt.pt", weights_only=True)
    assert list(ckpt["model"]) == list(model.state_dict())  # what LlamaGen's sampler reads: checkpoint["model"]
    assert load_far(tmp_path / "gpt.pt").config == model.config  # the stored config: heads and grid included
    with pytest.raises(CheckpointError, match=r"gpt.pt: its stored config has block_size 16, but 256 was asked for"):
        load_far(tmp_path / "gpt.pt", block_size=256)


# ------------------------------------------------------------------------------------------------------------
# training: the same trainers, LlamaGen's recipe
# ------------------------------------------------------------------------------------------------------------
def test_single_tokenizer_trains_with_the_tokenizer_trainer(data, tmp_path):
    """LlamaGen's recipe (no semantic loss, no disentanglement) through tokenizer/train.py; the checkpoint is in
    LlamaGen's layout. The FQGAN-only flags are refused in one line."""
    from helpers import TINY
    from tokenizer import train as tokenizer_train

    argv = ["--data-path", str(data), *[a for a in TINY if a != "--with_disentanglement"], "--global-batch-size",
            "2", "--disc-start", "0", "--exp-name", "s", "--results-dir", str(tmp_path), "--no-local-save"]
    t = tokenizer_train.build(tokenizer_train.parse_config(argv, "single"))
    assert describe_tokenizer(t.config).startswith("a single-codebook 4x tokenizer (LlamaGen's VQModel")
    logs, _, _ = tokenizer_train.train_step(t, torch.rand(2, 3, 32, 32) * 2 - 1, step=1)
    assert {"codebook_loss_vis", "commit_loss_vis", "generator_adv_loss"} <= set(logs)
    assert not any(k.startswith("semantic_loss") for k in logs) and float(logs["disentangle_loss"]) == 0
    assert "quantize.embedding.weight" in t.checkpoint()["model"]
    for flag, message in (("--with_disentanglement", "one factor, nothing to disentangle"),
                          ("--with_clip_supervision", "no semantic factor to supervise")):
        with pytest.raises(ValueError, match=f"^{flag}: the single tokenizer has {message}$"):
            tokenizer_train.parse_config(argv + [flag], "single")  # before any work


def test_gpt_trains_with_the_far_trainer_on_a_single_codebook_store(tmp_path):
    """train_c2i.py reads the factor count from the code store (its own entry point) and trains a GPT on it;
    a GPT on a factorised store is one line."""
    from autoregressive.data.code_store import CodeStoreWriter
    from autoregressive.train import train_c2i

    rng = np.random.default_rng(0)
    for name, factors in (("single", ["vis"]), ("dual", ["vis", "sem"])):
        w = CodeStoreWriter(tmp_path / name, 4, 1, factors, (4, 4), 64)
        w.write(rng.integers(0, 64, (4, 1, len(factors), 16)), rng.integers(0, 3, 4))
        w.close(num_classes=3)
    argv = ["--code-path", str(tmp_path / "single"), "--gpt-model", "GPT-T", "--vocab-size", "64", "--image-size",
            "16", "--downsample-size", "4", "--num-classes", "3", "--num-workers", "0", "--global-batch-size", "2",
            "--exp-name", "g", "--results-dir", str(tmp_path / "runs"), "--no-local-save"]
    t = train_c2i.build(train_c2i.parse_config(argv, None))
    assert t.config.is_gpt and "tok_embeddings.weight" in t.model.state_dict()
    codes, labels = next(iter(torch.utils.data.DataLoader(t.dataset, batch_size=2,
                                                          collate_fn=train_c2i.collate_codes)))
    logs, skipped = train_c2i.train_step(t, codes, labels)
    assert set(logs) == {"loss", "grad_norm", "loss_vis"} and torch.isfinite(logs["loss"]) and not skipped
    argv[1] = str(tmp_path / "dual")
    with pytest.raises(ValueError, match=r"--gpt-model GPT-T on --code-path .*dual: GPT-T is LlamaGen's "
                                         r"single-codebook generator: it predicts 1 factor, not 2"):
        train_c2i.build(train_c2i.parse_config(argv, None))


# ------------------------------------------------------------------------------------------------------------
# LlamaGen's command lines, as its GETTING_STARTED writes them, on tiny files (one torchrun launch)
# ------------------------------------------------------------------------------------------------------------
def test_llamagen_command_lines_under_torchrun(data, tmp_path):
    """Extraction, GPT training (FSDP2), sampling and reconstruction evaluation with LlamaGen's scripts and
    flags, each reading the factor count from its input: a tokenizer file in LlamaGen's layout (no config) gives
    single-codebook codes, train_c2i.py a GPT, the sampler its images (--image-size from the checkpoint, resized
    bicubically to --image-size-eval; a scale below 1 unguided), the reconstruction its PSNR."""
    from helpers import torchrun
    from tiny import tiny_tokenizer_config

    torch.manual_seed(0)
    tok = FactorizedTokenizer(tiny_tokenizer_config(1, with_adapters=False, adapter_layers=0))
    torch.save({"model": released_state_dict(tok)}, tmp_path / "vq_tiny.pt")  # as LlamaGen writes it
    ckpt = "results/GPT-T-c2i/checkpoints/0000002.pt"
    chain = [
        ["autoregressive/train/extract_codes_c2i.py", "--vq-ckpt", "vq_tiny.pt", "--data-path", str(data),
         "--code-path", "codes", "--ten-crop", "--crop-range", "1.1", "--image-size", "32", "--codebook-size", "64",
         "--codebook-embed-dim", "4", "--dataset", "imagenet", "--num-workers", "0"],
        ["autoregressive/train/train_c2i.py", "--cloud-save-path", "cloud", "--code-path", "codes", "--image-size",
         "32", "--downsample-size", "4", "--gpt-model", "GPT-T", "--vocab-size", "64", "--num-classes", "2",
         "--gpt-type", "c2i", "--cls-token-num", "1", "--no-compile", "--global-batch-size", "4", "--max-steps",
         "2", "--ckpt-every", "2", "--fsdp", "--exp-name", "c2i", "--num-workers", "0", "--log-every", "1"],
        ["autoregressive/sample/sample_c2i_ddp.py", "--vq-ckpt", "vq_tiny.pt", "--gpt-ckpt", ckpt, "--gpt-model",
         "GPT-T", "--from-fsdp", "--image-size-eval", "24", "--downsample-size", "4", "--num-classes", "2",
         "--codebook-size", "64", "--codebook-embed-dim", "4", "--cfg-scale", "0.5", "--precision", "none",
         "--no-compile", "--gpt-type", "c2i", "--cls-token-num", "1", "--num-fid-samples", "4",
         "--per-proc-batch-size", "2", "--name", "gpt"],
        ["tokenizer/reconstruction_vq_ddp.py", "--data-path", str(data), "--vq-ckpt", "vq_tiny.pt", "--image-size",
         "32", "--image-size-eval", "24", "--codebook-size", "64", "--codebook-embed-dim", "4", "--dataset",
         "imagenet", "--per-proc-batch-size", "4", "--num-workers", "0", "--folder-name", "vq_tiny"],
    ]
    (tmp_path / "chain.json").write_text(json.dumps(chain))
    r = torchrun("tests/run_chain.py", "chain.json", cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    from autoregressive.data.code_store import read_manifest

    assert read_manifest(tmp_path / "codes").factor_names == ["vis"]
    trained = torch.load(tmp_path / ckpt, weights_only=False)
    with torch.device("meta"):
        gpt = FAR(far_config("GPT-T", 1, vocab_size=64, block_size=64, num_classes=2))
    assert list(trained["model"]) == list(gpt.state_dict()) and trained["args"].gpt_model == "GPT-T"  # LlamaGen's
    assert "--cloud-save-path is accepted for compatibility and ignored" in out
    assert "a LlamaGen GPT-T generator (dim 256, 4 layers, 4 heads of 64, vocab 64, 2 classes, 8x8 tokens)" in out
    assert "--cfg-scale 0.5: a LlamaGen GPT is guided only above 1, as in LlamaGen; sampling it unguided" in out
    with np.load(tmp_path / "samples" / "gpt.npz") as z:
        assert z["arr_0"].shape == (4, 24, 24, 3) and z["arr_1"].shape == (4,)
    assert "Loaded a single-codebook 4x tokenizer (LlamaGen's VQModel; codebook 64 x 4)" in out
    with np.load(tmp_path / "reconstructions" / "vq_tiny.npz") as z:
        assert z["arr_0"].shape == (8, 24, 24, 3)
    assert json.loads((tmp_path / "reconstructions" / "vq_tiny.json").read_text())["factors"][0]["name"] == "vis"
