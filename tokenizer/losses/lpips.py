"""LPIPS perceptual distance (Zhang et al., 2018), VGG16 variant, as a frozen training loss.

The network is the ``lpips`` package's own (``lpips.LPIPS(net="vgg")``); what this module adds is where its
weights come from. Two weight files are involved and neither is downloaded here:

* the VGG16 trunk: torchvision's ImageNet weights, the file torchvision itself would fetch
  (``vgg16-397923af.pth``), looked up in ``torch.hub.get_dir()/checkpoints/`` or passed explicitly;
* the five 1x1 "linear" layers calibrated on human judgements: ``weights/v0.1/vgg.pth`` of the ``lpips`` pip
  package. That file is byte-identical to the one the original training code downloads (same md5), so it is
  read straight out of the installed package.

The package would download the VGG16 trunk through torchvision at construction; it is built with random
weights instead (``pnet_rand=True``) and the file above is loaded into it, mapping torchvision's
``features.<i>`` keys onto the package's ``net.slice<k>.<i>``.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

PathLike = Union[str, Path]

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LINEAR_RELPATH = ("weights", "v0.1", "vgg.pth")


class MissingWeightsError(FileNotFoundError):
    """A weight file the perceptual loss needs is not on this machine."""


def default_vgg16_path() -> Path:
    """Where torchvision caches its ImageNet VGG16 weights (``$TORCH_HOME/hub/checkpoints/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def lpips_linear_weights_path() -> Path:
    """The linear-layer weights shipped inside the ``lpips`` package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError("the LPIPS linear weights ship with the `lpips` pip package, which is not "
                                  "installed: `pip install lpips==0.1.4`")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*LPIPS_LINEAR_RELPATH)
    if not path.is_file():
        raise MissingWeightsError(f"the installed `lpips` package has no {path}; reinstall it "
                                  "(`pip install --force-reinstall lpips==0.1.4`)")
    return path


def _missing_vgg_message(path: Path) -> str:
    """One line: which file, where it was looked for, how to get it there."""
    return (f"LPIPS needs torchvision's ImageNet VGG16 weights '{VGG16_FILENAME}', not found at {path}: on a "
            f"machine with internet download {VGG16_URL} (or run `python -c \"import torchvision; "
            f"torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` and take it from that machine's "
            f"~/.cache/torch/hub/checkpoints), then copy it to {default_vgg16_path()} (TORCH_HOME moves it) or "
            "pass its path (--vgg-path / vgg_path=...); pretrained=False gives random VGG weights for benchmarks "
            "and tests only")


def _torchvision_to_lpips(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ``vgg16`` state dict (``features.<i>.*``; the classifier is ignored) in the key layout of
    the package's trunk (``slice<k>.<i>.*``: each slice keeps the ``features`` index as module name)."""
    mapped = {}
    for name, param in net.state_dict().items():
        source = "features." + name.split(".", 1)[1]
        if source not in state_dict:
            raise ValueError(f"not a torchvision VGG16 state dict: key '{source}' is missing")
        if state_dict[source].shape != param.shape:
            raise ValueError(f"not a torchvision VGG16 state dict: '{source}' has shape "
                             f"{tuple(state_dict[source].shape)}, expected {tuple(param.shape)}")
        mapped[name] = state_dict[source]
    return mapped


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance between two batches of [-1, 1] images; returns one value per image, shape (B,).

    ``vgg_path``: torchvision's ``vgg16-397923af.pth`` (default: the torch hub cache). ``pretrained=False``
    skips it and keeps randomly initialised VGG weights - only for benchmarks and tests, where the number means
    nothing but the cost and the plumbing are real. The shipped linear weights are loaded in both cases.
    Gradients flow to the inputs; the module has no trainable parameters and stays in eval mode."""

    def __init__(self, vgg_path: Optional[PathLike] = None, pretrained: bool = True):
        super().__init__()
        linear_path = lpips_linear_weights_path()  # also the one-line error when the package is missing
        vgg_file = None
        if pretrained:
            vgg_file = Path(vgg_path).expanduser() if vgg_path is not None else default_vgg16_path()
            if not vgg_file.is_file():
                raise MissingWeightsError(_missing_vgg_message(vgg_file))
        import lpips

        with warnings.catch_warnings():  # the package calls torchvision with its deprecated `pretrained` flag
            warnings.simplefilter("ignore", UserWarning)
            # use_dropout=True only shapes the linear layers like the shipped file (lin<k>.model.1.weight);
            # the module never leaves eval mode, so no dropout is ever applied.
            self.model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, model_path=str(linear_path),
                                     use_dropout=True, verbose=False)
        if vgg_file is not None:
            vgg = torch.load(vgg_file, map_location="cpu", weights_only=True)
            self.net.load_state_dict(_torchvision_to_lpips(self.net, vgg), strict=True)
        self.requires_grad_(False)
        self.eval()

    @property
    def net(self) -> nn.Module:
        """The VGG16 trunk, cut into five slices."""
        return self.model.net

    @property
    def lins(self) -> nn.ModuleList:
        """The five per-channel weightings (1x1 convs)."""
        return self.model.lins

    def train(self, mode: bool = True) -> "LPIPS":
        # Always eval: a parent's .train() must not switch anything here (the original's LPIPS ended up in
        # training mode with dropout active on the linear layers because its parent loss module was .train()ed).
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(input, target).flatten()
