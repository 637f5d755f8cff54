"""Training losses of the factorised tokenizer: one file per ingredient, combined in ``vq_loss.FQGANLoss``."""
from .discriminators import DISCRIMINATORS, RealAndFake, build_discriminator
from .gan import (DISC_LOSSES, GEN_LOSSES, adaptive_gan_weight, adopt_weight, hinge_d_loss, hinge_gen_loss,
                  non_saturating_d_loss, non_saturating_gen_loss, vanilla_d_loss)
from .lpips import LPIPS, MissingWeightsError, default_vgg16_path, lpips_linear_weights_path
from .patchgan import PatchGANDiscriminator
from .semantic import head_class_token, info_nce
from .stylegan import StyleGANDiscriminator
from .vq_loss import DiscriminatorLoss, FQGANLoss, GeneratorLoss, LossConfig
