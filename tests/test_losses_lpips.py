"""LPIPS: agreement with the lpips package, weight loading, and the missing-VGG message."""
import hashlib

import pytest
import torch

from tokenizer.losses import FQGANLoss, LossConfig, MissingWeightsError
from tokenizer.losses import lpips as lpips_module
from tokenizer.losses.lpips import LPIPS, VGG16_FILENAME, lpips_linear_weights_path

LPIPS_VGG_MD5 = "d507d7349b931f0638a25a48a722f98a"  # the file the original training code downloads


@pytest.fixture(scope="module")
def random_lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


def images(seed: int, n: int = 2, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_identical_images_give_zero_and_different_images_do_not(random_lpips):
    a, b = images(1), images(2)
    assert torch.all(random_lpips(a, a) == 0)
    d = random_lpips(a, b)
    assert d.shape == (2,) and torch.all(d > 0)
    assert torch.allclose(d, random_lpips(b, a), rtol=1e-5)


def test_frozen_eval_and_differentiable_in_the_inputs(random_lpips):
    assert not any(p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.training and not any(m.training for m in random_lpips.modules())
    a = images(3).requires_grad_(True)
    random_lpips(a, images(4)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_shipped_linear_weights_are_the_originals():
    path = lpips_linear_weights_path()
    assert hashlib.md5(path.read_bytes()).hexdigest() == LPIPS_VGG_MD5


@pytest.mark.filterwarnings("ignore::UserWarning")  # lpips calls torchvision with the old `pretrained` kwarg
def test_matches_the_lpips_package_with_the_same_vgg_weights(random_lpips):
    lpips = pytest.importorskip("lpips")
    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    reference.net.load_state_dict(random_lpips.net.state_dict())  # same slice layout, same keys
    for k, lin in enumerate(random_lpips.lins):
        assert torch.equal(lin.model[1].weight, reference.lins[k].model[1].weight)
    a, b = images(5), images(6)
    with torch.no_grad():
        ours, theirs = random_lpips(a, b), reference(a, b).flatten()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def _torchvision_style_state_dict(trunk: torch.nn.Module) -> dict:
    """What torchvision's vgg16 file holds for the trunk: ``features.<i>.*`` keys (classifier left out)."""
    return {f"features.{k.split('.', 1)[1]}": v.clone() for k, v in trunk.state_dict().items()}


def test_loads_vgg_from_the_torch_hub_cache_and_from_a_path(tmp_path, monkeypatch, random_lpips):
    state = _torchvision_style_state_dict(random_lpips.net)
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / VGG16_FILENAME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    from_cache = LPIPS()
    assert torch.equal(from_cache.net.slice3.get_submodule("14").weight, state["features.14.weight"])
    explicit = tmp_path / "elsewhere.pth"
    torch.save(state, explicit)
    from_path = LPIPS(vgg_path=explicit)
    a, b = images(7, n=1, size=32), images(8, n=1, size=32)
    assert torch.allclose(from_path(a, b), random_lpips(a, b))


def test_rejects_a_file_that_is_not_vgg16(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        LPIPS(vgg_path=bad)


def test_missing_vgg_weights_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        LPIPS()
    msg = str(err.value)
    assert VGG16_FILENAME in msg and str(tmp_path / "checkpoints") in msg
    assert "vgg_path" in msg and "pretrained=False" in msg
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        LPIPS(vgg_path=tmp_path / "nowhere.pth")
    # The combined loss fails the same way, before any training step.
    with pytest.raises(MissingWeightsError):
        FQGANLoss(LossConfig())


def test_missing_lpips_package_message(monkeypatch):
    monkeypatch.setattr(lpips_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingWeightsError, match="pip install lpips"):
        lpips_linear_weights_path()


def test_combined_loss_uses_lpips(random_lpips):
    from tokenizer.models import FactorOutput, TokenizerOutput
    x = images(9, n=2, size=32)
    recon = images(10, n=2, size=32)
    out = TokenizerOutput(recon, [FactorOutput(torch.zeros(2, 8, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long),
                                               torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), 0.0)],
                          torch.tensor(0.0))
    loss = FQGANLoss(LossConfig(perceptual_weight=2.0), ["vis"], perceptual=random_lpips)
    res = loss.generator_step(x, out, step=1)
    assert res.terms["perceptual_loss"].item() == pytest.approx(random_lpips(x, recon).mean().item(), rel=1e-6)
    assert res.weights["perceptual_loss"] == 2.0
