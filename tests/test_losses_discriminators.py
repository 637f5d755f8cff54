"""Discriminators: output shapes, the original's state-dict layout, init, and the StyleGAN blur."""
import pytest
import torch
import torch.nn.functional as F

from tokenizer.losses import PatchGANDiscriminator, StyleGANDiscriminator, build_discriminator
from tokenizer.losses.stylegan import Blur

# The original's PatchGAN state dict (3 layers, 64 filters): key -> shape.
PATCHGAN_WEIGHTS = {
    "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
    "main.2.weight": (128, 64, 4, 4),
    "main.5.weight": (256, 128, 4, 4),
    "main.8.weight": (512, 256, 4, 4),
    "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
}
PATCHGAN_NORMS = {3: 128, 6: 256, 9: 512}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def test_patchgan_state_dict_layout():
    sd = PatchGANDiscriminator().state_dict()
    expected = dict(PATCHGAN_WEIGHTS)
    for i, c in PATCHGAN_NORMS.items():
        for k in BN_KEYS:
            expected[f"main.{i}.{k}"] = () if k == "num_batches_tracked" else (c,)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # A checkpoint's "discriminator" entry with these keys loads strictly.
    PatchGANDiscriminator().load_state_dict({k: torch.zeros(s) for k, s in expected.items()})


def test_patchgan_forward_shape_and_init():
    torch.manual_seed(0)
    d = PatchGANDiscriminator()
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    w = d.main[5].weight
    assert abs(w.mean().item()) < 2e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)
    bn = d.main[6]
    assert bn.weight.std().item() == pytest.approx(0.02, rel=0.2) and torch.all(bn.bias == 0)
    assert d.main[2].bias is None  # BatchNorm follows: no conv bias
    assert PatchGANDiscriminator(in_channels=1, ndf=8, n_layers=2)(torch.randn(1, 1, 32, 32)).shape == (1, 1, 6, 6)


def test_stylegan_state_dict_layout():
    sd = StyleGANDiscriminator(image_size=256).state_dict()
    assert len(sd) == 62
    assert sd["blocks.0.weight"].shape == (64, 3, 3, 3)
    # Six residual blocks take 256 down to 4: widths 64 -> 128 -> 256 -> 512 -> 512 -> 512 -> 512.
    widths = [64, 128, 256, 512, 512, 512, 512]
    for j in range(6):
        p = f"blocks.{j + 2}."
        assert sd[p + "conv_res.weight"].shape == (widths[j + 1], widths[j], 1, 1)
        assert sd[p + "net.0.weight"].shape == (widths[j + 1], widths[j], 3, 3)
        assert sd[p + "net.2.weight"].shape == (widths[j + 1], widths[j + 1], 3, 3)
        assert sd[p + "downsample.1.weight"].shape == (widths[j + 1], widths[j + 1], 3, 3)
        assert torch.equal(sd[p + "downsample.0.f"], torch.tensor([1.0, 2.0, 1.0]))
    assert sd["final_conv.0.weight"].shape == (512, 512, 3, 3)
    assert sd["final_linear.0.weight"].shape == (512, 512 * 16)
    assert sd["final_linear.2.weight"].shape == (1, 512)
    assert len(StyleGANDiscriminator(image_size=512).state_dict()) == 71


def test_stylegan_forward_and_size_check():
    d = StyleGANDiscriminator(image_size=32)
    assert d(torch.randn(3, 3, 32, 32)).shape == (3, 1)
    with pytest.raises(ValueError, match="32x32"):
        d(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="power-of-two"):
        StyleGANDiscriminator(image_size=48)
    assert StyleGANDiscriminator(image_size=256)(torch.randn(1, 3, 256, 256)).shape == (1, 1)


def test_blur_is_a_normalised_binomial_filter_with_reflect_borders():
    x = torch.randn(2, 3, 5, 6)
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = torch.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            expected += k[dy, dx] * padded[..., dy:dy + 5, dx:dx + 6]
    assert torch.allclose(Blur()(x), expected, atol=1e-6)
    assert torch.allclose(Blur()(torch.full((1, 2, 4, 4), 3.0)), torch.full((1, 2, 4, 4), 3.0))


def test_build_discriminator():
    assert isinstance(build_discriminator("patchgan"), PatchGANDiscriminator)
    assert isinstance(build_discriminator("stylegan", image_size=64), StyleGANDiscriminator)
    with pytest.raises(ValueError, match="unknown discriminator"):
        build_discriminator("biggan")
