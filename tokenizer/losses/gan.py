"""Adversarial objectives, the adaptive GAN weight and the discriminator warm-up switch.

Discriminator losses take the logits on real and on reconstructed images and average the two halves with
weight 1/2; generator losses take the logits on reconstructions. Any logit shape works (PatchGAN maps or
StyleGAN's one per image): everything is a mean over all elements.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

DiscLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GenLoss = Callable[[torch.Tensor], torch.Tensor]

ADAPTIVE_EPS = 1e-4  # added to the GAN gradient norm (the original's value; taming used the same)
ADAPTIVE_MAX = 1e4  # the adaptive weight is clamped to [0, ADAPTIVE_MAX]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]): no gradient once a side is confidently right."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(G(z)))]): binary cross-entropy, real = 1, fake = 0."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with real = 1, fake = 0, written with BCE-with-logits; mathematically the vanilla
    loss (the "non-saturating" trick concerns the generator side).

    Note: the original passes BCE's arguments the other way round (a constant as the input, the logits as the
    target), which turns its fake half into the constant log 2 and its real half into a linear function of the
    logits. That is a bug, not a design choice, and is not reproduced; the default (hinge) is unaffected."""
    real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return 0.5 * (real + fake)


def hinge_gen_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]."""
    return -logits_fake.mean()


def non_saturating_gen_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """E[softplus(-D(G(z)))] = BCE towards "real"; strong gradients while the discriminator wins.
    (The original's version has the same swapped-argument bug as its d-loss, making it hinge + a constant.)"""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


DISC_LOSSES: dict[str, DiscLoss] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
    "non-saturating": non_saturating_d_loss,
}
GEN_LOSSES: dict[str, GenLoss] = {
    "hinge": hinge_gen_loss,
    "non-saturating": non_saturating_gen_loss,
}


def get_disc_loss(name: str) -> DiscLoss:
    if name not in DISC_LOSSES:
        raise ValueError(f"unknown discriminator loss {name!r}; choose from {sorted(DISC_LOSSES)}")
    return DISC_LOSSES[name]


def get_gen_loss(name: str) -> GenLoss:
    if name not in GEN_LOSSES:
        raise ValueError(f"unknown generator loss {name!r}; choose from {sorted(GEN_LOSSES)}")
    return GEN_LOSSES[name]


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before it (the discriminator warm-up switch).
    The original passes 1-based steps (``train_steps + 1``), so with threshold 20000 the GAN turns on at the
    20000th optimisation step."""
    return value if step < threshold else weight


def adaptive_gan_weight(nll_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        eps: float = ADAPTIVE_EPS, max_weight: float = ADAPTIVE_MAX) -> torch.Tensor:
    """||d nll / d W|| / (||d gan / d W|| + eps), clamped to [0, max_weight] and detached (VQGAN's balancing).

    ``W`` is the decoder's last layer weight and ``nll_loss`` the weighted reconstruction + perceptual loss:
    the GAN term is scaled so that its gradient at the output layer is as large as the reconstruction's. Both
    graphs are kept (``retain_graph``) because the caller backpropagates the total loss afterwards."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(gan_grad) + eps)
    return weight.clamp(0.0, max_weight).detach()
