"""FQGAN: a VQ tokenizer whose codebook is factorised into F independent sub-codebooks.

    image -> shared conv trunk -> per factor: adapter -> GroupNorm, swish, 3x3 conv -> 1x1 conv -> quantizer
          -> concat(codes of all factors, visual first) -> 1x1 conv -> conv decoder -> image

Semantic factors carry a feature-prediction head trained to match a frozen teacher (CLIP, DINOv2), and a
disentanglement regulariser pushes the factors' codes towards orthogonality. The number of factors is a
config value; ``dual`` (visual, semantic) and ``triple`` (visual, mid- and high-level semantic) are presets.

``single`` is LlamaGen's VQ tokenizer (``VQModel``, which FQGAN extends): one factor, no adapter (the trunk's
features go straight to the output conv) and no feature head. Its files use LlamaGen's key names
(see checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.factors import PRESET_FACTORS

from .blocks import NORM_GROUPS, group_norm, swish
from .convnet import Decoder, EncoderTrunk
from .heads import FactorAdapter, FeaturePredictionHead
from .quantizer import QuantizerOutput, VectorQuantizer

VQ_CH_MULT = {"VQ-16": (1, 1, 2, 2, 4), "VQ-8": (1, 2, 2, 4)}


@dataclass(frozen=True)
class FactorConfig:
    """One sub-codebook. ``head_width`` > 0 gives it a feature-prediction head of that width, supervised by
    ``teacher`` (a Hugging Face hub name or a local folder; used by training only)."""
    name: str
    head_width: int = 0
    teacher: Optional[str] = None


# The paper's semantic factors: feature-head width and the teacher that supervises it (the width is the
# teacher's class-token width). Factor names and their order per preset live in utils.factors.
SEMANTIC_TEACHERS = {
    "sem": (1024, "openai/clip-vit-large-patch14"),
    "sem_mid": (384, "facebook/dinov2-small"),
    "sem_high": (768, "openai/clip-vit-base-patch16"),
}


def preset_factors(preset: str) -> tuple[FactorConfig, ...]:
    """The factor configs of a preset (``single`` / ``dual`` / ``triple``): visual first, then the semantic
    factors with their heads and teachers."""
    if preset not in PRESET_FACTORS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose from {sorted(PRESET_FACTORS)}")
    return tuple(FactorConfig(name, *SEMANTIC_TEACHERS.get(name, (0, None))) for name in PRESET_FACTORS[preset])


# What a preset sets beyond its factors: LlamaGen's single codebook has no adapter and no feature head.
PRESET_FIELDS = {"single": dict(with_adapters=False, with_feature_heads=False)}

DUAL_FACTORS = preset_factors("dual")
TRIPLE_FACTORS = preset_factors("triple")


@dataclass(frozen=True)
class TokenizerConfig:
    factors: tuple[FactorConfig, ...] = DUAL_FACTORS
    ch_mult: tuple[int, ...] = VQ_CH_MULT["VQ-16"]
    ch: int = 128
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout_p: float = 0.0
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    entropy_temperature: float = 0.01
    adapter_layers: int = 6
    adapter_heads: int = 8
    head_layers: int = 3
    head_heads: int = 8
    with_feature_heads: bool = True  # the original's --with_clip_supervision
    with_adapters: bool = True  # False: no per-factor transformer adapter (LlamaGen's VQModel)
    disentanglement_ratio: float = 0.0  # 0 turns the regulariser off (the original's --with_disentanglement)
    base_image_size: int = 256  # the learned positions cover base_image_size / downsample squared tokens

    def __post_init__(self):
        # A config read back from a checkpoint (dataclasses.asdict, or JSON) has dicts and lists here.
        object.__setattr__(self, "factors", tuple(FactorConfig(**f) if isinstance(f, dict) else f
                                                  for f in self.factors))
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        self._check()

    def _check(self) -> None:
        """Reject what cannot build (or would fail deep inside torch) with one line naming the field."""
        def fail(msg):
            raise ValueError(f"TokenizerConfig: {msg}")
        if not self.factors:
            fail("a tokenizer needs at least one factor")
        names = [f.name for f in self.factors]
        if len(set(names)) != len(names):
            fail(f"factor names must be unique, got {names}")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            fail(f"ch_mult {self.ch_mult} must be one or more positive integers (one per level, e.g. 1,2,2)")
        if self.ch < 1 or self.ch % NORM_GROUPS:
            fail(f"ch {self.ch} must be a positive multiple of {NORM_GROUPS} (every conv width ch x ch_mult[i] is "
                 f"group-normalised in {NORM_GROUPS} groups)")
        for field_name in ("num_res_blocks", "z_channels", "codebook_size", "codebook_embed_dim", "adapter_heads",
                           "head_heads", "base_image_size"):
            if getattr(self, field_name) < 1:
                fail(f"{field_name} must be >= 1, got {getattr(self, field_name)}")
        for field_name in ("adapter_layers", "head_layers"):
            if getattr(self, field_name) < 0:
                fail(f"{field_name} must be >= 0, got {getattr(self, field_name)}")
        width = self.ch * self.ch_mult[-1]
        if width % self.adapter_heads:
            fail(f"the adapters' width ch x ch_mult[-1] = {width} is not divisible by adapter_heads "
                 f"{self.adapter_heads}")
        for f in self.factors:
            if f.head_width < 0 or (f.head_width and self.with_feature_heads and f.head_width % self.head_heads):
                fail(f"factor {f.name}: head_width {f.head_width} must be a multiple of head_heads "
                     f"{self.head_heads} (0: no feature head)")
        if self.base_image_size < self.downsample:
            fail(f"base_image_size {self.base_image_size} is smaller than the downsampling factor {self.downsample} "
                 f"(2 ** (len(ch_mult) - 1)): no code positions")
        if not 0 <= self.dropout_p < 1:
            fail(f"dropout_p {self.dropout_p} must be in [0, 1)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_factors(self) -> int:
        return len(self.factors)

    @property
    def head_factors(self) -> list[int]:
        """Indices of the factors that carry a feature-prediction head (empty without heads)."""
        if not self.with_feature_heads:
            return []
        return [i for i, f in enumerate(self.factors) if f.head_width]

    def replace(self, **changes) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)


def tokenizer_config(preset: str = "dual", vq_model: str = "VQ-16", **overrides) -> TokenizerConfig:
    """Config of a preset (``single`` / ``dual`` / ``triple``) at a downsampling (``VQ-16`` / ``VQ-8``), with
    overrides."""
    if vq_model not in VQ_CH_MULT:
        raise ValueError(f"unknown --vq-model {vq_model!r}; choose from {sorted(VQ_CH_MULT)}")
    return TokenizerConfig(**{"factors": preset_factors(preset), "ch_mult": VQ_CH_MULT[vq_model],
                              **PRESET_FIELDS.get(preset, {}), **overrides})


@dataclass
class FactorOutput:
    """What one factor produced in a forward pass. Losses are None outside training mode."""
    quant: torch.Tensor
    indices: torch.Tensor
    codebook_loss: Optional[torch.Tensor]
    commit_loss: Optional[torch.Tensor]
    entropy_loss: Optional[torch.Tensor]
    usage: torch.Tensor  # () fraction of the codebook used recently (training only, else 0)


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # (B, 3, H, W), roughly in [-1, 1], not clamped
    factors: list[FactorOutput]  # in factor order, visual first
    disentangle_loss: torch.Tensor  # already times the ratio; 0 when the regulariser is off
    head_features: dict[int, torch.Tensor] = field(default_factory=dict)  # factor index -> (B, 1 + hw, width)

    @property
    def indices(self) -> torch.Tensor:
        return torch.stack([f.indices for f in self.factors], dim=1)

    def quantizer_loss(self, codebook_weight: float = 1.0) -> torch.Tensor:
        """Sum over factors of codebook + commitment + entropy losses, times ``codebook_weight``."""
        total = sum(f.codebook_loss + f.commit_loss + f.entropy_loss for f in self.factors)
        return codebook_weight * total


class FactorBranch(nn.Module):
    """Everything one factor owns: adapter (or none), output conv to z_channels, projection to code_dim,
    quantizer."""

    def __init__(self, cfg: TokenizerConfig, width: int, grid: int):
        super().__init__()
        self.adapter = (FactorAdapter(grid, width, cfg.adapter_layers, cfg.adapter_heads) if cfg.with_adapters
                        else nn.Identity())
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.commit_loss_beta,
                                         cfg.entropy_loss_ratio, cfg.codebook_l2_norm, cfg.entropy_temperature)

    def forward(self, h: torch.Tensor) -> QuantizerOutput:
        h = self.conv_out(swish(self.norm_out(self.adapter(h))))
        return self.quantizer(self.quant_conv(h))


class FactorizedTokenizer(nn.Module):
    """The factorised tokenizer. Build it with ``FactorizedTokenizer("dual")``,
    ``FactorizedTokenizer("triple", vq_model="VQ-8")``, ``FactorizedTokenizer("single")`` (LlamaGen's VQ
    tokenizer) or ``FactorizedTokenizer(TokenizerConfig(...))``; load a released checkpoint (FQGAN's or
    LlamaGen's) with ``tokenizer.models.load_tokenizer(path)``."""

    def __init__(self, config: TokenizerConfig | str = "dual", vq_model: str = "VQ-16", **overrides):
        super().__init__()
        if isinstance(config, str):
            config = tokenizer_config(config, vq_model, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        self.config = cfg = config
        self.encoder = EncoderTrunk(cfg.ch_mult, cfg.ch, cfg.num_res_blocks, cfg.dropout_p)
        width = self.encoder.out_channels
        grid = cfg.base_image_size // cfg.downsample
        self.factors = nn.ModuleList([FactorBranch(cfg, width, grid) for _ in cfg.factors])
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim * cfg.num_factors, cfg.z_channels, 1)
        self.decoder = Decoder(cfg.ch_mult, cfg.ch, cfg.num_res_blocks, cfg.z_channels, cfg.dropout_p)
        self.heads = nn.ModuleDict({
            str(i): FeaturePredictionHead(cfg.codebook_embed_dim, cfg.factors[i].head_width, grid,
                                          cfg.head_layers, cfg.head_heads)
            for i in cfg.head_factors
        })

    # ------------------------------------------------------------------ inference API
    @property
    def factor_names(self) -> list[str]:
        return [f.name for f in self.config.factors]

    def quantize(self, x: torch.Tensor) -> list[QuantizerOutput]:
        """Images (B, 3, H, W) in [-1, 1] -> one QuantizerOutput per factor."""
        h = self.encoder(x)
        return [branch(h) for branch in self.factors]

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> code indices (B, F, H/ds, W/ds), factor order visual first.
        Runs ``batch_size`` images at a time so memory stays bounded whatever B is."""
        return torch.cat([torch.stack([q.indices for q in self.quantize(part)], dim=1)
                          for part in x.split(batch_size)])

    def codes_from_indices(self, indices: torch.Tensor, keep: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Indices (B, F, h, w) -> concatenated codes (B, F * D, h, w). Factors not in ``keep`` are zeroed."""
        if indices.dim() != 4 or indices.shape[1] != self.config.num_factors:
            raise ValueError(f"expected code indices of shape (B, {self.config.num_factors}, h, w) for "
                             f"factors {', '.join(self.factor_names)}; got {tuple(indices.shape)}")
        codes = [branch.quantizer.lookup(indices[:, i]) for i, branch in enumerate(self.factors)]
        if keep is not None:
            keep = set(keep)
            codes = [c if i in keep else torch.zeros_like(c) for i, c in enumerate(codes)]
        return torch.cat(codes, dim=1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Concatenated codes (B, F * D, h, w) -> images (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(codes))

    def decode_indices(self, indices: torch.Tensor, keep: Optional[Sequence[int]] = None,
                       batch_size: int = 8) -> torch.Tensor:
        """Indices (B, F, h, w) -> images (B, 3, H, W), ``batch_size`` at a time. ``keep`` lists the factors to
        decode; the others get zero codes, which shows what each factor carries on its own. Swap a factor
        between images by editing ``indices[:, f]`` (see ``swap_factor``)."""
        return torch.cat([self.decode_codes(self.codes_from_indices(part, keep))
                          for part in indices.split(batch_size)])

    # ------------------------------------------------------------------ training forward
    def disentangle_loss(self, quants: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over factor pairs of the mean squared cosine similarity of their codes, times the ratio."""
        ratio = self.config.disentanglement_ratio
        if not ratio or len(quants) < 2:
            return quants[0].new_zeros(())
        flat = [F.normalize(q.permute(0, 2, 3, 1).reshape(-1, q.shape[1]), p=2, dim=-1) for q in quants]
        pairs = [torch.mean(torch.sum(a * b, dim=1) ** 2) * ratio for a, b in itertools.combinations(flat, 2)]
        return sum(pairs) / len(pairs)

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        qs = self.quantize(x)
        quants = [q.quant for q in qs]
        feats = {int(i): head(quants[int(i)]) for i, head in self.heads.items()}
        recon = self.decode_codes(torch.cat(quants, dim=1))
        factors = [FactorOutput(q.quant, q.indices, q.codebook_loss, q.commit_loss, q.entropy_loss, q.usage)
                   for q in qs]
        return TokenizerOutput(recon, factors, self.disentangle_loss(quants), feats)


def swap_factor(indices_a: torch.Tensor, indices_b: torch.Tensor, factor: int) -> torch.Tensor:
    """A copy of ``indices_a`` (B, F, h, w) with factor ``factor`` taken from ``indices_b``."""
    out = indices_a.clone()
    out[:, factor] = indices_b[:, factor]
    return out
