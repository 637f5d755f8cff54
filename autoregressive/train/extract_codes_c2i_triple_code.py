"""Extract FQGAN-triple tokenizer codes (3 factors) into a code store; see autoregressive/train/extract_codes.py.

    torchrun --nproc_per_node=8 autoregressive/train/extract_codes_c2i_triple_code.py \\
        --vq-ckpt fqgan_triple_ds16.pt --data-path /data/ImageNet/train --code-path codes/triple --ten-crop
"""
from autoregressive.train.extract_codes import main

if __name__ == "__main__":
    main(num_factors=3)
