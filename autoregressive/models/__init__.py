"""FAR, the factorized autoregressive generator of FQGAN (and LlamaGen's GPT, FAR with one factor): model,
checkpoint I/O and sampling."""
from .checkpoint import describe_far, far_checkpoint, infer_far_config, load_far, load_far_weights, save_far
from .far import FAR, FAR_models, GPT_models, MODELS, FARConfig, FAROutput, far_config
from .generate import generate, sample
