"""The factorised tokenizer (FQGAN) and its checkpoint I/O."""
from .checkpoint import (describe, infer_config, load_released_state_dict, load_tokenizer, released_state_dict,
                         save_tokenizer, tokenizer_checkpoint)
from .fqgan import (DUAL_FACTORS, PRESETS, TRIPLE_FACTORS, VQ_CH_MULT, FactorConfig, FactorizedTokenizer,
                    FactorOutput, TokenizerConfig, TokenizerOutput, swap_factor, tokenizer_config)
