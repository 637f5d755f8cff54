"""Behaviour of the factor-generic tokenizer on tiny configurations."""
import math

import pytest
import torch

from tiny import tiny_tokenizer_config
from tokenizer.models import FactorizedTokenizer, TokenizerConfig, swap_factor, tokenizer_config
from tokenizer.models import quantizer as quantizer_mod
from tokenizer.models.blocks import resize_positions
from tokenizer.models.quantizer import VectorQuantizer, entropy_loss


def _images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("num_factors", [1, 2, 3, 4])
def test_training_forward_any_factor_count(num_factors):
    torch.manual_seed(0)
    cfg = tiny_tokenizer_config(num_factors)
    model = FactorizedTokenizer(cfg).train()
    x = _images()
    out = model(x)
    assert out.recon.shape == x.shape
    assert len(out.factors) == num_factors
    assert out.indices.shape == (2, num_factors, 8, 8)
    for f in out.factors:
        assert f.quant.shape == (2, cfg.codebook_embed_dim, 8, 8)
        assert f.codebook_loss.item() >= 0 and f.commit_loss.item() >= 0
        assert 0 < f.usage <= 1
    assert sorted(out.head_features) == cfg.head_factors
    for i, feat in out.head_features.items():
        assert feat.shape == (2, 1 + 64, cfg.factors[i].head_width)
    if num_factors == 1:
        assert out.disentangle_loss.item() == 0
    else:
        assert out.disentangle_loss.item() > 0
    loss = out.recon.pow(2).mean() + out.quantizer_loss() + out.disentangle_loss + \
        sum(f.mean() for f in out.head_features.values())
    loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    for branch in model.factors:
        assert branch.quantizer.embedding.weight.grad.abs().sum() > 0  # codebook loss reaches the codes
        assert branch.adapter.positional_embedding.grad.abs().sum() > 0


def test_eval_forward_has_no_losses_and_matches_decode_of_indices():
    torch.manual_seed(0)
    model = FactorizedTokenizer(tiny_tokenizer_config(3)).eval()
    x = _images(3)
    with torch.no_grad():
        out = model(x)
        idx = model.encode_indices(x)
        rec = model.decode_indices(idx)
    assert all(f.codebook_loss is None and f.usage == 0 for f in out.factors)
    assert torch.equal(out.indices, idx)
    assert torch.allclose(out.recon, rec, atol=1e-5)


def test_micro_batching_does_not_change_results():
    torch.manual_seed(0)
    model = FactorizedTokenizer(tiny_tokenizer_config(2)).eval()
    x = _images(5)
    with torch.no_grad():
        a = model.encode_indices(x, batch_size=2)
        b = model.encode_indices(x, batch_size=16)
        assert torch.equal(a, b)
        assert torch.allclose(model.decode_indices(a, batch_size=2), model.decode_indices(a), atol=1e-5)


def test_keep_zeroes_other_factors_and_swap():
    torch.manual_seed(0)
    model = FactorizedTokenizer(tiny_tokenizer_config(2)).eval()
    idx = model.encode_indices(_images(2))
    with torch.no_grad():
        codes = model.codes_from_indices(idx)
        only_vis = model.decode_indices(idx, keep=[0])
        manual = codes.clone()
        manual[:, 4:] = 0  # factor 1's 4 channels
        assert torch.allclose(only_vis, model.decode_codes(manual))
    swapped = swap_factor(idx[:1], idx[1:], factor=1)
    assert torch.equal(swapped[:, 0], idx[:1, 0]) and torch.equal(swapped[:, 1], idx[1:, 1])


def test_bad_indices_are_clear_errors():
    model = FactorizedTokenizer(tiny_tokenizer_config(2)).eval()
    with pytest.raises(ValueError, match=r"\(B, 2, h, w\).*vis, sem"):
        model.decode_indices(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode_indices(torch.full((1, 2, 8, 8), 64))


def test_other_image_sizes_resize_positions():
    torch.manual_seed(0)
    model = FactorizedTokenizer(tiny_tokenizer_config(2)).eval()
    with torch.no_grad():
        out = model(_images(1, size=64))
    assert out.recon.shape == (1, 3, 64, 64)
    assert out.indices.shape == (1, 2, 16, 16)
    assert out.head_features[1].shape == (1, 1 + 256, 32)
    pos = model.factors[0].adapter.positional_embedding
    assert resize_positions(pos, (8, 8)) is pos  # exact at the trained size
    big = resize_positions(pos, (16, 16))
    assert big.shape == (256, pos.shape[1])


def test_nearest_search_is_chunked_and_exact(monkeypatch):
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=1000, code_dim=8).eval()
    z = torch.nn.functional.normalize(torch.randn(777, 8), dim=-1)
    full = vq._distances(z, vq.codebook()).argmin(1)
    seen = []
    real = VectorQuantizer._distances

    def spy(self, part, e):
        seen.append(part.shape[0] * e.shape[0])
        return real(self, part, e)

    monkeypatch.setattr(quantizer_mod, "SEARCH_CHUNK_ELEMENTS", 50_000)
    monkeypatch.setattr(VectorQuantizer, "_distances", spy)
    assert torch.equal(vq.nearest(z), full)
    assert len(seen) > 1 and max(seen) <= 50_000


def test_default_search_chunk_is_bounded_for_released_codebooks(monkeypatch):
    """64 images at 256x256 with VQ-16 are 16384 positions; a released codebook has 16384 codes. The search, with
    its default chunk, never holds more than 64 MiB of float32 distances at a time (the distance matrices it
    builds are measured, not the constant)."""
    vq = VectorQuantizer(codebook_size=16384, code_dim=8).eval()
    z = torch.nn.functional.normalize(torch.randn(3000, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    sizes = []
    real = VectorQuantizer._distances

    def spy(self, part, e):
        d = real(self, part, e)
        sizes.append(d.numel() * d.element_size())
        return d

    monkeypatch.setattr(VectorQuantizer, "_distances", spy)
    idx = vq.nearest(z)
    assert idx.shape == (3000,) and len(sizes) > 1  # a part of the 16384 positions: chunks of the same size
    assert max(sizes) <= 64 * 2 ** 20


def test_entropy_loss_by_hand():
    # Uniform affinities: every sample has entropy log K, the batch average too -> loss 0.
    assert entropy_loss(torch.zeros(6, 10)).item() == pytest.approx(0.0, abs=1e-3)
    # Each sample certain of a distinct code: sample entropy 0, batch entropy log 4 -> loss -log 4.
    aff = torch.full((4, 4), -100.0)
    aff.fill_diagonal_(0.0)
    assert entropy_loss(aff).item() == pytest.approx(-math.log(4), abs=1e-3)
    # All samples certain of the same code: both entropies 0.
    aff = torch.full((4, 4), -100.0)
    aff[:, 0] = 0
    assert entropy_loss(aff).item() == pytest.approx(0.0, abs=1e-3)


def test_usage_window_counts_like_the_original():
    vq = VectorQuantizer(codebook_size=100, code_dim=4).train()
    vq.codebook_used = torch.zeros(10)  # a short window to see it roll
    assert vq._track_usage(torch.tensor([5, 6, 7])) == pytest.approx(4 / 100)  # 5, 6, 7 and the zero fill
    assert vq._track_usage(torch.arange(10, 20)) == pytest.approx(10 / 100)  # window now holds 10..19 only
    assert vq._track_usage(torch.arange(30, 55)) == pytest.approx(10 / 100)  # longer than the window


def test_disentanglement_loss_by_hand():
    model = FactorizedTokenizer(tiny_tokenizer_config(3, disentanglement_ratio=0.5))
    e = torch.eye(4).view(1, 4, 2, 2)  # 4 positions, one-hot codes
    orthogonal = [e, torch.roll(e, 1, dims=1), torch.roll(e, 2, dims=1)]
    assert model.disentangle_loss(orthogonal).item() == pytest.approx(0.0)
    same = [e, e, -e]
    assert model.disentangle_loss(same).item() == pytest.approx(0.5)  # cos^2 = 1 for every pair
    off = FactorizedTokenizer(tiny_tokenizer_config(3, disentanglement_ratio=0.0))
    assert off.disentangle_loss(same).item() == 0.0


def test_presets_and_config_errors():
    dual = tokenizer_config("dual", "VQ-16")
    triple = tokenizer_config("triple", "VQ-8")
    assert [f.name for f in dual.factors] == ["vis", "sem"] and dual.downsample == 16
    assert [f.head_width for f in triple.factors] == [0, 384, 768] and triple.downsample == 8
    assert triple.factors[1].teacher == "facebook/dinov2-small"
    with pytest.raises(ValueError, match="unknown tokenizer preset 'quad'"):
        tokenizer_config("quad")
    with pytest.raises(ValueError, match="--vq-model 'VQ-32'"):
        tokenizer_config("dual", "VQ-32")
    with pytest.raises(ValueError, match="unique"):
        TokenizerConfig(factors=dual.factors * 2)
    no_heads = dual.replace(with_feature_heads=False)
    assert no_heads.head_factors == []
    with torch.device("meta"):
        m = FactorizedTokenizer("triple", vq_model="VQ-8", with_feature_heads=False)
    assert len(m.heads) == 0 and m.config.num_factors == 3
