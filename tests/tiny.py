"""Tiny configurations of the project's models, for fast tests."""
from tokenizer.models import FactorConfig, TokenizerConfig

FACTOR_SETS = {
    1: (FactorConfig("vis"),),
    2: (FactorConfig("vis"), FactorConfig("sem", head_width=32)),
    3: (FactorConfig("vis"), FactorConfig("sem_mid", head_width=32), FactorConfig("sem_high", head_width=64)),
    4: (FactorConfig("vis"), FactorConfig("sem_a", head_width=32), FactorConfig("sem_b"),
        FactorConfig("extra", head_width=32)),
}


def tiny_tokenizer_config(num_factors: int = 2, **overrides) -> TokenizerConfig:
    """A few-hundred-thousand-parameter tokenizer on 32x32 images (4x downsampling, 8x8 codes)."""
    kw = dict(factors=FACTOR_SETS[num_factors], ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32,
              codebook_size=64, codebook_embed_dim=4, adapter_layers=1, head_layers=1, base_image_size=32,
              entropy_loss_ratio=0.03, disentanglement_ratio=0.1)
    kw.update(overrides)
    return TokenizerConfig(**kw)
