"""Loading and saving tokenizer checkpoints in the released layout, and the errors for files that don't fit."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference_weights import reference_keys
from tiny import tiny_tokenizer_config
from tokenizer.models import (FactorizedTokenizer, infer_tokenizer_config, load_tokenizer, load_tokenizer_weights,
                              released_state_dict, save_tokenizer, tokenizer_config)
from utils.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _tiny(num_factors=2, **kw):
    torch.manual_seed(0)
    return FactorizedTokenizer(tiny_tokenizer_config(num_factors, **kw)).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,preset,vq,heads", [
    ("tokenizer_dual_vq16", "dual", "VQ-16", True),
    ("tokenizer_triple_vq16", "triple", "VQ-16", True),
    ("tokenizer_dual_vq8", "dual", "VQ-8", False),
])
def test_presets_have_the_released_layout(name, preset, vq, heads):
    ref = {e["key"]: tuple(e["shape"]) for e in reference_keys(name)}
    with torch.device("meta"):
        model = FactorizedTokenizer(preset, vq_model=vq, with_feature_heads=heads)
    assert {k: tuple(v.shape) for k, v in released_state_dict(model).items()} == ref
    # ... and the config can be recovered from the released keys alone
    meta_sd = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    assert infer_tokenizer_config(meta_sd) == tokenizer_config(preset, vq, with_feature_heads=heads)


@pytest.mark.parametrize("entry", ["ema", "model", "state_dict", ""])
def test_load_weights_wherever_the_file_keeps_them(tmp_path, entry):
    model = _tiny(3)
    sd = released_state_dict(model)
    obj = sd if entry == "" else {entry: sd, "steps": 7}
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = load_tokenizer(tmp_path / "ckpt.pt", base_image_size=32)
    # everything the weights can tell is recovered (factor names pick up their preset teachers)
    assert [(f.name, f.head_width) for f in loaded.config.factors] == \
        [(f.name, f.head_width) for f in model.config.factors]
    assert loaded.config.replace(factors=model.config.factors) == \
        model.config.replace(entropy_loss_ratio=0.0, disentanglement_ratio=0.0)
    assert _same_weights(loaded, model)
    assert not loaded.training


def test_ema_preferred_and_wrapper_prefixes_removed(tmp_path):
    model, other = _tiny(2), FactorizedTokenizer(tiny_tokenizer_config(2))
    ddp_style = {f"module.{k}": v for k, v in released_state_dict(model).items()}
    torch.save({"model": released_state_dict(other), "ema": ddp_style}, tmp_path / "c.pt")
    assert _same_weights(load_tokenizer(tmp_path / "c.pt"), model)
    assert _same_weights(load_tokenizer(tmp_path / "c.pt", prefer=("model",)), other)


def test_file_without_feature_heads_loads(tmp_path):
    model = _tiny(2)
    sd = {k: v for k, v in released_state_dict(model).items() if not k.startswith("feat_pred_head.")}
    torch.save({"model": sd}, tmp_path / "noheads.pt")
    loaded = load_tokenizer(tmp_path / "noheads.pt")
    assert loaded.config.head_factors == [] and len(loaded.heads) == 0
    # into a model that has heads: allowed only when asked for
    with_heads = FactorizedTokenizer(model.config)
    with pytest.raises(CheckpointError, match="missing keys: feat_pred_head"):
        load_tokenizer_weights(with_heads, sd, "noheads.pt")
    load_tokenizer_weights(with_heads, sd, "noheads.pt", allow_missing_heads=True)


def test_save_is_atomic_and_readable_by_plain_torch_load(tmp_path):
    model = _tiny(2)
    path = tmp_path / "out" / "tok.pt"
    save_tokenizer(path, model, steps=3)
    assert [p.name for p in path.parent.iterdir()] == ["tok.pt"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["steps"] == 3 and "quantize_vis.embedding.weight" in raw["model"]
    assert "encoder.visual_head.0.ln_pre.weight" in raw["model"] and "feat_pred_head.ln_post.bias" in raw["model"]


def test_mismatch_error_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model = _tiny(2)
    sd = dict(released_state_dict(model))
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["quant_conv_sem.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer_weights(FactorizedTokenizer(model.config), sd, "bad.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("bad.pt: does not fit a dual")
    assert "missing keys: decoder.conv_out.bias" in msg
    assert "unexpected keys: encoder.extra.weight" in msg
    assert "quant_conv_sem.bias (5,) in file vs (4,) in model" in msg


def test_wrong_factor_count_and_bad_files(tmp_path):
    save_tokenizer(tmp_path / "triple.pt", _tiny(3))
    with pytest.raises(CheckpointError, match="holds a triple .* but 2 factors were expected"):
        load_tokenizer(tmp_path / "triple.pt", expect_factors=2)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_tokenizer(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable torch checkpoint"):
        load_tokenizer(tmp_path / "junk.pt")
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not FQGAN or LlamaGen tokenizer weights"):
        load_tokenizer(tmp_path / "other.pt")
    torch.save({"optimizer": {}}, tmp_path / "noweights.pt")
    with pytest.raises(CheckpointError, match=r"no weights under any of \['ema', 'model', 'state_dict'\]"):
        load_tokenizer(tmp_path / "noweights.pt")


def test_original_style_code_reads_our_checkpoint(tmp_path):
    """A script that knows nothing of this project (plain torch, the original's key names) reads our file."""
    save_tokenizer(tmp_path / "t.pt", _tiny(3))
    code = (
        "import torch, sys; sd = torch.load(sys.argv[1], weights_only=True)['model'];"
        "need = ['encoder.semantic_head_mid.0.positional_embedding', 'quantize_sem_high.embedding.weight',"
        " 'mid_sem_feat_pred.class_embedding', 'high_sem_feat_pred.upscale.2.weight', 'post_quant_conv.weight'];"
        "missing = [k for k in need if k not in sd]; print('missing', missing); sys.exit(bool(missing))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_reconstruct_image_command(tmp_path):
    """The README's one-command reconstruction, on a real photograph."""
    import skimage.data
    from PIL import Image

    save_tokenizer(tmp_path / "tok.pt", _tiny(2))
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.jpg")
    script = [sys.executable, "tokenizer/reconstruct_image.py", "--image-size", "32", "--per-factor"]
    r = subprocess.run(script + ["--vq-ckpt", str(tmp_path / "tok.pt"), "--image", str(tmp_path / "cat.jpg"),
                                 "--out", str(tmp_path / "r.png")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "PSNR" in r.stdout and "only vis | only sem" in r.stdout
    assert Image.open(tmp_path / "r.png").size == (4 * 32 + 5 * 2, 32 + 2 * 2)
    r = subprocess.run(script + ["--vq-ckpt", str(tmp_path / "missing.pt"), "--image", str(tmp_path / "cat.jpg")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {tmp_path / 'missing.pt'}: checkpoint file not found"
