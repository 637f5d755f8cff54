"""FAR, the factorized autoregressive generator of FQGAN: model, checkpoint I/O and sampling."""
from .checkpoint import (describe, far_checkpoint, infer_config, load_far, load_released_state_dict,
                         released_state_dict, save_far)
from .far import FAR, FAR_models, FARConfig, FAROutput, PRESETS, factor_names, far_config
from .generate import generate, sample
