"""LPIPS perceptual distance (Zhang et al., 2018), VGG16 variant, as a frozen training loss.

Two weight files are involved and neither is downloaded here:

* the VGG16 trunk: torchvision's ImageNet weights, the file torchvision itself would fetch
  (``vgg16-397923af.pth``), looked up in ``torch.hub.get_dir()/checkpoints/`` or passed explicitly;
* the five 1x1 "linear" layers calibrated on human judgements: ``weights/v0.1/vgg.pth`` of the ``lpips`` pip
  package. That file is byte-identical to the one the original training code downloads (same md5), so it is
  read straight out of the installed package.

The distance: scale the [-1, 1] images with LPIPS' fixed shift/scale, take VGG16 activations after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3, unit-normalise every spatial feature vector over channels, square the
difference of the two images' features, weight channels with the linear layer, average over space and sum
over the five stages.
"""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

PathLike = Union[str, Path]

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LINEAR_RELPATH = ("weights", "v0.1", "vgg.pth")

# torchvision's VGG16 ``features``: numbers are 3x3 conv widths (each followed by a ReLU), "M" a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps five stages; stage k covers ``features[STAGE_BOUNDS[k]:STAGE_BOUNDS[k + 1]]`` and ends on
# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. The final max-pool (index 30) is never used.
STAGE_BOUNDS = (0, 4, 9, 16, 23, 30)
STAGE_CHANNELS = (64, 128, 256, 512, 512)

# LPIPS v0.1 input scaling: (x - shift) / scale maps [-1, 1] images to roughly ImageNet-normalised inputs.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # added to the channel norm, as in LPIPS


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


class VGG16Stages(nn.Module):
    """The first 30 layers of torchvision's VGG16 ``features``, cut into LPIPS' five stages.

    Modules keep their ``features`` index as name (``slice2.5`` is ``features.5``), which is also the layout of
    the original LPIPS modules (``net.slice1.0.weight`` ...), so either state dict maps on directly."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for spec in VGG16_LAYOUT:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, spec, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = spec
        for k, (lo, hi) in enumerate(zip(STAGE_BOUNDS[:-1], STAGE_BOUNDS[1:]), start=1):
            self.add_module(f"slice{k}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(lo, hi))))
        self.reset_parameters()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"slice{k}") for k in range(1, len(STAGE_BOUNDS))]

    def reset_parameters(self) -> None:
        # torchvision's VGG initialisation; only matters for the random-weights mode.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load from a torchvision ``vgg16`` state dict (keys ``features.<i>.weight``; the classifier is ignored)."""
        mapped = {}
        for k, stage in enumerate(self.stages, start=1):
            for name, param in stage.state_dict().items():
                source = f"features.{name}"
                if source not in state_dict:
                    raise ValueError(f"not a torchvision VGG16 state dict: key '{source}' is missing")
                if state_dict[source].shape != param.shape:
                    raise ValueError(f"not a torchvision VGG16 state dict: '{source}' has shape "
                                     f"{tuple(state_dict[source].shape)}, expected {tuple(param.shape)}")
                mapped[f"slice{k}.{name}"] = state_dict[source]
        self.load_state_dict(mapped, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class LinearHead(nn.Module):
    """One LPIPS per-channel weighting: a bias-free 1x1 conv to a single channel.

    Slot 0 of ``model`` is where LPIPS had the dropout used when the layer itself was trained; it is an identity
    here (the loss is always evaluated deterministically) and is kept so the shipped keys
    (``lin<k>.model.1.weight``) load unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_channels(x: torch.Tensor) -> torch.Tensor:
    # LPIPS normalisation: divide by the channel norm plus a tiny eps (not clamped like F.normalize).
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + NORM_EPS)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance between two batches of [-1, 1] images; returns one value per image, shape (B,).

    ``vgg_path``: torchvision's ``vgg16-397923af.pth`` (default: the torch hub cache). ``pretrained=False``
    skips it and uses randomly initialised VGG weights - only for benchmarks and tests, where the number means
    nothing but the cost and the plumbing are real. The shipped linear weights are loaded in both cases.
    Gradients flow to the inputs; the module has no trainable parameters and stays in eval mode."""

    def __init__(self, vgg_path: Optional[PathLike] = None, pretrained: bool = True,
                 linear_path: Optional[PathLike] = None):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Stages()
        for k, channels in enumerate(STAGE_CHANNELS):
            self.add_module(f"lin{k}", LinearHead(channels))

        if pretrained:
            path = Path(vgg_path).expanduser() if vgg_path is not None else default_vgg16_path()
            if not path.is_file():
                raise MissingWeightsError(_missing_vgg_message(path))
            self.net.load_torchvision_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        linear_path = Path(linear_path) if linear_path is not None else lpips_linear_weights_path()
        self.load_linear_weights(torch.load(linear_path, map_location="cpu", weights_only=True))

        self.requires_grad_(False)
        self.eval()

    @property
    def lins(self) -> list[LinearHead]:
        return [getattr(self, f"lin{k}") for k in range(len(STAGE_CHANNELS))]

    def load_linear_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load ``lin<k>.model.1.weight`` entries (the lpips package's / original's key layout)."""
        wanted = {f"lin{k}.model.1.weight" for k in range(len(STAGE_CHANNELS))}
        missing = wanted - set(state_dict)
        if missing:
            raise ValueError(f"LPIPS linear weights lack {sorted(missing)}")
        for k, lin in enumerate(self.lins):
            lin.model[1].weight.data.copy_(state_dict[f"lin{k}.model.1.weight"])

    def train(self, mode: bool = True) -> "LPIPS":
        # Always eval: a parent's .train() must not switch anything here (the original's LPIPS ended up in
        # training mode with dropout active on the linear layers because its parent loss module was .train()ed).
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(input.shape)} vs {tuple(target.shape)}")
        shift, scale = self.shift.to(input.dtype), self.scale.to(input.dtype)
        # One trunk pass over both batches (VGG has no batch-dependent layers, so this equals two passes).
        feats = self.net((torch.cat([input, target]) - shift) / scale)
        total = 0
        for lin, f in zip(self.lins, feats):
            fa, fb = f.chunk(2)
            diff = (_unit_channels(fa) - _unit_channels(fb)) ** 2
            total = total + lin(diff).mean(dim=(2, 3))  # (B, 1): spatial average per stage
        return total.flatten()
