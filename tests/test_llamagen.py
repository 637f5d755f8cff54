"""LlamaGen's released family through this project's code: its single-codebook tokenizers (``vq_ds16_c2i.pt``,
``vq_ds8_c2i.pt``) are the one-factor tokenizer without adapter, its GPT generators FAR with one factor, no factor
head and no aggregation layer. The numbers LlamaGen's own code computes (tests/data/golden_llamagen.npz, from the
deterministic weights of reference_weights.py in LlamaGen's key layout) are reproduced through the public loaders,
and the files we write list exactly LlamaGen's keys. Tolerances are the reference README's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_weights import coffee, golden, reference_keys, reference_state_dict
from tokenizer.models import (FactorizedTokenizer, describe_tokenizer, infer_tokenizer_config, load_tokenizer,
                              released_state_dict, save_tokenizer)
from tokenizer.models.checkpoint import tokenizer_from_checkpoint

GOLDEN = golden("golden_llamagen")


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
    from utils.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"does not fit a single-codebook 4x tokenizer .*missing keys: "
                                              r"quantize.codebook_used"):
        tokenizer_from_checkpoint({"model": sd}, "broken.pt")
