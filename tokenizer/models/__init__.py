"""The factorised tokenizer (FQGAN) and its checkpoint I/O."""
from .checkpoint import (TokenizerFlags, check_tokenizer_flags, describe_tokenizer, infer_tokenizer_config, load_tokenizer,
                         load_tokenizer_weights, released_state_dict, save_tokenizer, tokenizer_checkpoint)
from .fqgan import (DUAL_FACTORS, TRIPLE_FACTORS, VQ_CH_MULT, FactorConfig, FactorizedTokenizer, FactorOutput,
                    TokenizerConfig, TokenizerOutput, preset_factors, swap_factor, tokenizer_config)
