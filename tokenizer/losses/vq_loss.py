"""The FQGAN training objective for any number of factors and any set of semantic heads.

Generator step (the original's ``optimizer_idx == 0``), every term named in the result:

    loss = w_rec * rec + w_lpips * lpips
         + codebook_weight * sum over factors (codebook + commitment + entropy)
         + disentangle                                   (already times its ratio, from the model)
         + semantic_weight * sum over heads InfoNCE(head class token, teacher class token)
         + adaptive * disc_weight * [step >= disc_start] * generator adversarial loss

Discriminator step (``optimizer_idx == 1``): ``disc_weight * [step >= disc_start] * d_loss(D(x), D(x_rec))``.

Defaults are the original training scripts' flag defaults. Two deliberate differences, both no-ops at the
defaults: ``codebook_weight`` is applied (the original accepts the flag but never uses it; default 1), and the
"non-saturating" GAN losses use the correct BCE argument order (see ``gan.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.models.fqgan import TokenizerOutput

from .discriminators import DISCRIMINATORS
from .gan import adaptive_gan_weight, adopt_weight, get_disc_loss, get_gen_loss
from .lpips import LPIPS
from .semantic import head_class_token, info_nce

Number = Union[float, torch.Tensor]
RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


@dataclass(frozen=True)
class LossConfig:
    reconstruction_loss: str = "l2"  # "l2" (mean squared error) or "l1"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0  # 0: LPIPS is not built at all (no VGG weights needed)
    codebook_weight: float = 1.0  # times each factor's codebook + commitment + entropy losses
    semantic_weight: float = 0.5  # per head; 0: teachers are not needed
    semantic_temperature: float = 1.0  # the original divides cosine similarities by nothing
    disc_weight: float = 0.5
    disc_start: int = 20000  # steps (1-based, like the original's train_steps + 1) before the GAN switches on
    disc_type: str = "patchgan"  # or "stylegan"
    disc_loss: str = "hinge"  # "hinge", "vanilla" or "non-saturating"
    gen_loss: str = "hinge"  # "hinge" or "non-saturating"
    disc_adaptive_weight: bool = False  # VQGAN gradient-norm balancing; off in the original's training
    disc_dim: int = 64  # PatchGAN width
    disc_num_layers: int = 3  # PatchGAN depth
    disc_in_channels: int = 3
    image_size: int = 256  # StyleGAN discriminator input size
    vgg_path: Optional[str] = None  # torchvision's vgg16-397923af.pth; None: the torch hub cache
    lpips_pretrained: bool = True  # False: random VGG weights (benchmarks / tests only)

    def __post_init__(self):
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"unknown reconstruction loss {self.reconstruction_loss!r}; choose from "
                             f"{sorted(RECONSTRUCTION_LOSSES)}")
        if self.disc_type not in DISCRIMINATORS:
            raise ValueError(f"unknown discriminator type {self.disc_type!r}; choose from {DISCRIMINATORS}")
        get_disc_loss(self.disc_loss)
        get_gen_loss(self.gen_loss)
        if self.semantic_temperature <= 0:
            raise ValueError(f"semantic_temperature must be > 0, got {self.semantic_temperature}")


def _detached(value: Number) -> Number:
    return value.detach() if isinstance(value, torch.Tensor) else value


@dataclass
class GeneratorLoss:
    """Result of a generator step. ``loss == sum(weights[k] * terms[k] for k in terms)``.

    Term names: ``rec_loss``, ``perceptual_loss`` (when LPIPS is on), ``codebook_loss_<factor>``,
    ``commit_loss_<factor>``, ``entropy_loss_<factor>`` (commitment and entropy already include beta and the
    entropy ratio), ``disentangle_loss`` (already times its ratio), ``semantic_loss_<factor>`` per head (when
    semantic supervision is on), ``generator_adv_loss`` (0 before ``disc_start``; not even computed then)."""
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # unweighted
    weights: dict[str, Number]  # the factor each term enters ``loss`` with
    codebook_usage: dict[str, Number]  # per factor, fraction of the codebook in the recent-usage window
    adaptive_weight: Number  # 1 when adaptive weighting is off; 0 while the GAN is off and it was not computed
    disc_factor: float  # 0 before disc_start, 1 after
    disc_weight: float  # the configured disc weight times disc_factor

    def logs(self) -> dict[str, Number]:
        """Every term, the total, the GAN weighting and the codebook usages, detached (tensors stay on the
        device: reading them is left to the logging step)."""
        out = {"loss": self.loss.detach(), **{k: v.detach() for k, v in self.terms.items()},
               "disc_adaptive_weight": _detached(self.adaptive_weight),
               "disc_weight": float(self.disc_weight), "disc_factor": float(self.disc_factor)}
        out.update({f"codebook_usage_{k}": _detached(v) for k, v in self.codebook_usage.items()})
        return out


@dataclass
class DiscriminatorLoss:
    loss: torch.Tensor  # disc_weight * disc_factor * disc_adv_loss: what to backpropagate
    disc_adv_loss: torch.Tensor  # unweighted discriminator loss
    logits_real: torch.Tensor  # mean logit on real images (detached)
    logits_fake: torch.Tensor  # mean logit on reconstructions (detached)
    disc_weight: float  # the configured disc weight times disc_factor
    disc_factor: float

    def logs(self) -> dict[str, Number]:
        return {"disc_loss": self.loss.detach(), "discriminator_adv_loss": self.disc_adv_loss.detach(),
                "logits_real": self.logits_real, "logits_fake": self.logits_fake,
                "disc_weight": float(self.disc_weight), "disc_factor": float(self.disc_factor)}


class FQGANLoss(nn.Module):
    """Reconstruction + perceptual + quantizer + disentanglement + semantic + adversarial losses.

    ``factor_names`` (e.g. ``tokenizer.factor_names``) label the per-factor terms; without them factors are
    labelled by index. The semantic teachers and the discriminator live outside this module (the training
    loop owns them, with the discriminator's optimizer and DDP wrapper): pass the teachers' class tokens, one
    (B, W) tensor per head factor index (``tokenizer.teachers.Teachers`` returns exactly that mapping), and the
    discriminator to each step that runs it. ``perceptual`` injects an already built LPIPS module (else it is
    built from the config)."""

    def __init__(self, config: LossConfig = LossConfig(), factor_names: Sequence[str] = (),
                 perceptual: Optional[nn.Module] = None):
        super().__init__()
        self.config = cfg = config
        self.factor_names = list(factor_names)
        self.rec_loss = RECONSTRUCTION_LOSSES[cfg.reconstruction_loss]
        if cfg.perceptual_weight:
            self.perceptual = perceptual if perceptual is not None else \
                LPIPS(vgg_path=cfg.vgg_path, pretrained=cfg.lpips_pretrained)
        else:
            self.perceptual = None
        self.disc_loss = get_disc_loss(cfg.disc_loss)
        self.gen_loss = get_gen_loss(cfg.gen_loss)

    def disc_factor(self, step: int) -> float:
        """1.0 once the discriminator is on (``step >= disc_start``), else 0.0."""
        return adopt_weight(1.0, step, threshold=self.config.disc_start)

    def _name(self, index: int) -> str:
        return self.factor_names[index] if index < len(self.factor_names) else str(index)

    # ------------------------------------------------------------------ generator
    def generator_step(self, images: torch.Tensor, output: TokenizerOutput, step: int,
                       teacher_cls: Optional[Mapping[int, torch.Tensor]] = None,
                       last_layer: Optional[torch.Tensor] = None,
                       discriminator: Optional[nn.Module] = None) -> GeneratorLoss:
        """Tokenizer loss for one batch.

        images: the (B, 3, H, W) inputs in [-1, 1]; output: the tokenizer's training-mode forward on them;
        step: the 1-based training step (decides whether the GAN is on); teacher_cls: factor index -> the
        teacher's (B, W) class tokens for every head (not needed when semantic_weight is 0 or the model has no
        heads); last_layer: the decoder's last weight (``tokenizer.decoder.last_layer``), needed only with
        ``disc_adaptive_weight``; discriminator: needed once the GAN is on (the bare module: its parameters
        should be frozen here, see ``utils.steps.frozen``)."""
        cfg = self.config
        recon = output.recon
        if self.factor_names and len(self.factor_names) != len(output.factors):
            raise ValueError(f"the loss was built for factors {self.factor_names} but the tokenizer output has "
                             f"{len(output.factors)} factors")
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, Number] = {}

        def add(name: str, value: torch.Tensor, weight: Number) -> None:
            terms[name], weights[name] = value, weight

        # Pixels and perception.
        add("rec_loss", self.rec_loss(recon, images), cfg.reconstruction_weight)
        if self.perceptual is not None:
            add("perceptual_loss", self.perceptual(images, recon).mean(), cfg.perceptual_weight)
        nll = sum(weights[k] * terms[k] for k in terms)  # what the adaptive GAN weight balances against

        # Quantizers, one set of terms per factor.
        usage: dict[str, float] = {}
        for i, f in enumerate(output.factors):
            if f.codebook_loss is None:
                raise ValueError("the tokenizer output carries no quantizer losses: run the tokenizer in "
                                 "training mode (tokenizer.train()) for the loss forward")
            name = self._name(i)
            add(f"codebook_loss_{name}", f.codebook_loss, cfg.codebook_weight)
            add(f"commit_loss_{name}", f.commit_loss, cfg.codebook_weight)
            add(f"entropy_loss_{name}", f.entropy_loss, cfg.codebook_weight)
            usage[name] = f.usage
        add("disentangle_loss", output.disentangle_loss, 1.0)

        # Semantic heads against their teachers.
        if cfg.semantic_weight and output.head_features:
            for i, tokens in self._pair_heads(output.head_features, teacher_cls).items():
                student = head_class_token(output.head_features[i])
                add(f"semantic_loss_{self._name(i)}", info_nce(student, tokens, cfg.semantic_temperature),
                    cfg.semantic_weight)

        # Adversarial term. Before disc_start its weight is 0, so the discriminator is not even run.
        disc_factor = self.disc_factor(step)
        disc_weight = cfg.disc_weight * disc_factor
        adaptive: Number = 1.0 if not cfg.disc_adaptive_weight else 0.0
        if disc_weight > 0:
            if discriminator is None:
                raise ValueError(f"step {step} >= disc_start {cfg.disc_start}: the generator step needs the "
                                 "discriminator")
            g_loss = self.gen_loss(discriminator(recon))
            if cfg.disc_adaptive_weight:
                if last_layer is None:
                    raise ValueError("disc_adaptive_weight needs last_layer=tokenizer.decoder.last_layer")
                adaptive = adaptive_gan_weight(nll, g_loss, last_layer)
            add("generator_adv_loss", g_loss, adaptive * disc_weight)
        else:
            add("generator_adv_loss", recon.new_zeros((), dtype=torch.float32), 0.0)

        loss = sum(weights[k] * terms[k] for k in terms)
        return GeneratorLoss(loss, terms, weights, usage, adaptive, disc_factor, disc_weight)

    def _pair_heads(self, heads: Mapping[int, torch.Tensor],
                    teacher_cls: Optional[Mapping[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Teacher class tokens (B, W) for every head, in factor order; clear errors for any mismatch."""
        teacher_cls = dict(teacher_cls or {})
        missing = sorted(set(heads) - set(teacher_cls))
        if missing:
            raise ValueError(f"no teacher class tokens for head factor(s) {[self._name(i) for i in missing]}: "
                             "pass teacher_cls=teachers(images) (tokenizer.teachers.load_teachers), or set "
                             "semantic_weight=0 to train without semantic supervision")
        extra = sorted(set(teacher_cls) - set(heads))
        if extra:
            raise ValueError(f"teacher class tokens given for factor(s) {[self._name(i) for i in extra]}, which "
                             "have no feature-prediction head")
        pairs = {}
        for i in sorted(heads):
            tokens = teacher_cls[i]
            if tokens.dim() == 3 and tokens.shape[1] == 1:  # (B, 1, W) -> (B, W)
                tokens = tokens[:, 0]
            width = heads[i].shape[-1]
            if tokens.shape != (heads[i].shape[0], width):
                raise ValueError(f"factor {self._name(i)!r}: head features are {width} wide for a batch of "
                                 f"{heads[i].shape[0]}, teacher class tokens have shape {tuple(tokens.shape)}")
            pairs[i] = tokens
        return pairs

    # ------------------------------------------------------------------ discriminator
    def discriminator_step(self, real_and_fake: nn.Module, images: torch.Tensor,
                           recon: Union[torch.Tensor, TokenizerOutput], step: int) -> DiscriminatorLoss:
        """Discriminator loss on real images vs (detached) reconstructions.

        ``real_and_fake``: the discriminator as a ``RealAndFake``, which runs the real and the fake batch
        separately, as in the original: with PatchGAN's BatchNorm the two batches are normalised with their own
        statistics, which a single concatenated pass would change. The training loop passes it DDP-wrapped:
        this is the only step that trains the discriminator (the generator step runs the bare module with
        frozen parameters)."""
        if isinstance(recon, TokenizerOutput):
            recon = recon.recon
        logits_real, logits_fake = real_and_fake(images.detach(), recon.detach())
        disc_factor = self.disc_factor(step)
        disc_weight = self.config.disc_weight * disc_factor
        adv = self.disc_loss(logits_real, logits_fake)
        return DiscriminatorLoss(disc_weight * adv, adv, logits_real.detach().mean(), logits_fake.detach().mean(),
                                 disc_weight, disc_factor)
