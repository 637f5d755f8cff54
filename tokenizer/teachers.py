"""Frozen semantic teachers: the vision transformers whose class tokens supervise the feature-prediction heads.

Each head factor of a ``TokenizerConfig`` names a teacher (``FactorConfig.teacher``: a Hugging Face hub name
or a local folder). ``load_teachers(config)`` loads one per head, before training starts, and fails with a
single ``TeacherUnavailableError`` listing every teacher that cannot be found on this machine.

What a teacher computes, as in the original:

* the tokenizer's [-1, 1] image mapped to [0, 1], resized to 224x224 with ``F.interpolate``'s default
  nearest-neighbour mode (no antialiasing; ``resize_mode`` offers bilinear / bicubic with antialiasing),
  normalised with the teacher family's mean and std (OpenAI CLIP's constants for CLIP, ImageNet's for DINOv2);
* the class token of the last layer: for CLIP the encoder output *before* ``post_layernorm`` (the original
  reads ``hidden_states[-1][:, 0]``; no projection, so CLIP-L/14 gives 1024 wide features, CLIP-B/16 768), for
  DINOv2 ``last_hidden_state[:, 0]``, which is after DINOv2's final layernorm (DINOv2-small: 384).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.models.fqgan import SEMANTIC_TEACHERS, TokenizerConfig, preset_factors
from utils.flags import flag

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_IMAGE_SIZE = 224
RESIZE_MODES = ("nearest", "bilinear", "bicubic")

# transformers config ``model_type`` -> (family, model class name in transformers)
_MODEL_TYPES = {
    "clip": ("clip", "CLIPVisionModel"),  # full CLIP checkpoints (openai/clip-vit-*): the vision tower is used
    "clip_vision_model": ("clip", "CLIPVisionModel"),
    "dinov2": ("dinov2", "Dinov2Model"),
    "dinov2_with_registers": ("dinov2", "Dinov2WithRegistersModel"),
}
_NORMALISATION = {"clip": (CLIP_MEAN, CLIP_STD), "dinov2": (IMAGENET_MEAN, IMAGENET_STD)}


class TeacherUnavailableError(RuntimeError):
    """One or more semantic teachers cannot be loaded on this machine. ``missing`` lists
    (factor name, model name or path, reason) for each of them."""

    def __init__(self, missing: Sequence[tuple[str, str, str]]):
        self.missing = list(missing)
        super().__init__(_unavailable_message(self.missing))


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        return "~/.cache/huggingface/hub"


def _unavailable_message(missing: Sequence[tuple[str, str, str]]) -> str:
    """One line: which teacher each factor lacks, why, and the two ways to provide it."""
    needs = "; ".join(f"factor {factor!r} needs {name} ({reason})" for factor, name, reason in missing)
    hub_names = [name for _, name, _ in missing if not _looks_like_path(name)]
    how = []
    if hub_names:
        commands = " and ".join(f"`huggingface-cli download {n}`" for n in hub_names)
        folders = ", ".join(f"models--{n.replace('/', '--')}" for n in hub_names)
        how.append(f"on a machine with internet run {commands}, then copy {folders} into this machine's Hugging "
                   f"Face cache {_hf_cache_dir()} (set by HF_HOME / HF_HUB_CACHE)")
    flags = ", ".join(f"{teacher_flag(factor)} DIR" for factor, _, _ in missing)
    how.append(f"or download the model into a folder (`huggingface-cli download NAME --local-dir DIR`) and pass "
               f"{flags}")
    return (f"semantic teacher not available on this machine: {needs}. To provide it, " + ", ".join(how) +
            "; or train without semantic supervision (no --with_clip_supervision).")


def _looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("owner/name" has at most one slash)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them only once, at import)."""
    truthy = {"1", "true", "yes", "on"}
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars while loading (a vision tower read out of a full
    CLIP checkpoint would list every unused text-tower weight)."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls, name: str, **kwargs):
    """Local files first (a folder, or the HF cache without touching the network); the hub only when online."""
    with _quiet_transformers():
        try:
            return cls.from_pretrained(name, local_files_only=True, **kwargs)
        except OSError:
            if _offline() or _looks_like_path(name):
                raise
        return cls.from_pretrained(name, **kwargs)


class SemanticTeacher(nn.Module):
    """A frozen CLIP vision tower or DINOv2 model mapping [-1, 1] images (B, 3, H, W) to class tokens (B, width).

    Always in eval mode with gradients off; the output is float32 and carries no graph."""

    def __init__(self, model: nn.Module, family: str, name: str = "", image_size: int = TEACHER_IMAGE_SIZE,
                 resize_mode: str = "nearest"):
        super().__init__()
        if family not in _NORMALISATION:
            raise ValueError(f"unknown teacher family {family!r}; choose from {sorted(_NORMALISATION)}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize_mode!r}; choose from {RESIZE_MODES}")
        self.model = model
        self.family = family
        self.name = name
        self.image_size = image_size
        self.resize_mode = resize_mode
        mean, std = _NORMALISATION[family]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> "SemanticTeacher":
        return super().train(False)  # frozen: a parent's .train() must not enable dropout / drop-path here

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the teacher's normalised (B, 3, image_size, image_size) input, float32."""
        x = images.float() * 0.5 + 0.5
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            if self.resize_mode == "nearest":  # the original: F.interpolate's default mode
                x = F.interpolate(x, size=size, mode="nearest")
            else:
                x = F.interpolate(x, size=size, mode=self.resize_mode, align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=x.to(dtype))
        # CLIP: encoder output before post_layernorm (== hidden_states[-1]); DINOv2: after its final layernorm.
        return out.last_hidden_state[:, 0].float()


def load_teacher(name: str, image_size: int = TEACHER_IMAGE_SIZE, resize_mode: str = "nearest",
                 dtype: Optional[torch.dtype] = None) -> SemanticTeacher:
    """One teacher from a hub name or a local folder; the model class follows the checkpoint's config type.
    Raises ``OSError`` when the files are not available (``load_teachers`` turns that into
    ``TeacherUnavailableError``) and ``ValueError`` for an unsupported model type."""
    import transformers
    config = _from_pretrained(transformers.AutoConfig, name)
    if config.model_type not in _MODEL_TYPES:
        raise ValueError(f"teacher {name!r} is a {config.model_type!r} model; supported types: "
                         f"{sorted(_MODEL_TYPES)} (CLIP vision towers and DINOv2)")
    family, class_name = _MODEL_TYPES[config.model_type]
    model_class = getattr(transformers, class_name)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = _from_pretrained(model_class, name, **kwargs)
    return SemanticTeacher(model, family, name, image_size, resize_mode)


class Teachers(nn.Module):
    """One teacher per head factor. ``teachers(images)`` -> {factor index: (B, width) class tokens}, the mapping
    ``FQGANLoss.generator_step`` takes as ``teacher_cls``."""

    def __init__(self, teachers: Mapping[int, SemanticTeacher]):
        super().__init__()
        self.by_factor = nn.ModuleDict({str(i): t for i, t in sorted(teachers.items())})

    def __getitem__(self, factor: int) -> SemanticTeacher:
        return self.by_factor[str(factor)]

    def __len__(self) -> int:
        return len(self.by_factor)

    def factors(self) -> list[int]:
        return [int(i) for i in self.by_factor]

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return {int(i): teacher(images) for i, teacher in self.by_factor.items()}


def teacher_names(config: TokenizerConfig,
                  overrides: Optional[Mapping[Union[str, int], Optional[str]]] = None) -> dict[int, str]:
    """Factor index -> teacher model for every head factor, ``overrides`` (keyed by factor name or index;
    None values ignored) taking precedence over ``FactorConfig.teacher``."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    known = {f.name for f in config.factors} | set(range(config.num_factors))
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ValueError(f"teacher overrides for unknown factor(s) {unknown}; factors: "
                         f"{[f.name for f in config.factors]}")
    heads = set(config.head_factors)
    useless = [k for k in overrides
               if (k if isinstance(k, int) else [f.name for f in config.factors].index(k)) not in heads]
    if useless:
        raise ValueError(f"teacher overrides for factor(s) {useless}, which have no feature-prediction head")
    names = {}
    for i in config.head_factors:
        factor = config.factors[i]
        name = overrides.get(factor.name, overrides.get(i, factor.teacher))
        if not name:
            raise ValueError(f"factor {factor.name!r} has a feature-prediction head but no teacher: set "
                             f"FactorConfig.teacher or pass {teacher_flag(factor.name)} PATH")
        names[i] = str(name)
    return names


def load_teachers(config: TokenizerConfig,
                  overrides: Optional[Mapping[Union[str, int], Optional[str]]] = None, *,
                  image_size: int = TEACHER_IMAGE_SIZE, resize_mode: str = "nearest",
                  dtype: Optional[torch.dtype] = None, check_width: bool = True) -> Teachers:
    """Load every head factor's teacher (empty ``Teachers`` when the model has no heads).

    ``overrides`` maps factor name (or index) -> hub name or local folder, e.g. ``{"sem": "/data/clip-l14"}``
    (what ``teacher_overrides_from_args`` builds from ``--teacher-<factor>`` flags). All teachers are tried
    before failing, so one ``TeacherUnavailableError`` lists every missing model. With ``check_width`` a
    teacher whose width differs from its head's ``head_width`` is a ``ValueError``."""
    names = teacher_names(config, overrides)
    teachers, missing = {}, []
    for i, name in names.items():
        factor = config.factors[i]
        try:
            teacher = load_teacher(name, image_size, resize_mode, dtype)
        except OSError as err:
            missing.append((factor.name, name, _short_reason(name, err)))
            continue
        if check_width and teacher.width != factor.head_width:
            raise ValueError(f"factor {factor.name!r}: teacher {name} gives {teacher.width}-wide class tokens "
                             f"but the head predicts {factor.head_width}-wide features")
        teachers[i] = teacher
    if missing:
        raise TeacherUnavailableError(missing)
    return Teachers(teachers)


def _short_reason(name: str, err: BaseException) -> str:
    if _looks_like_path(name):
        if not Path(name).expanduser().exists():
            return "no such folder"
    elif _offline():
        return "not in the local Hugging Face cache, and offline mode (HF_HUB_OFFLINE) is on"
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# ---------------------------------------------------------------------- command-line flags
def teacher_flag(factor_name: str) -> str:
    """The command-line flag overriding a factor's teacher: ``sem_mid`` -> ``--teacher-sem-mid``."""
    return "--teacher-" + factor_name.replace("_", "-")


def teacher_field(factor_name: str):
    """The config field of ``--teacher-<factor>`` (field ``teacher_<factor>``): a hub name or a local folder that
    replaces the factor's default teacher."""
    _, default = SEMANTIC_TEACHERS[factor_name]
    return flag(None, metavar="NAME_OR_DIR", resume="ignored",
                help=f"semantic teacher of factor {factor_name!r}: a Hugging Face hub name or a local folder "
                     f"(default {default})")


def teacher_fields_outside(preset: str) -> tuple[str, ...]:
    """The ``teacher_<factor>`` fields of the factors a preset does not have (its command line leaves them out)."""
    own = {f.name for f in preset_factors(preset)}
    return tuple(f"teacher_{name}" for name in SEMANTIC_TEACHERS if name not in own)


def teacher_overrides_from_args(args: argparse.Namespace, config: TokenizerConfig) -> dict[str, str]:
    """The ``overrides`` for ``load_teachers`` from parsed ``--teacher-<factor>`` flags (unset flags skipped)."""
    out = {}
    for f in config.factors:
        value = getattr(args, f"teacher_{f.name}", None)
        if value:
            out[f.name] = value
    return out
