"""Extract any tokenizer's codes into a code store, LlamaGen's command line (the factor count is read from the
checkpoint: LlamaGen's vq_ds16_c2i.pt gives single-codebook codes for its GPTs); see
autoregressive/train/extract_codes.py.

    torchrun --nproc_per_node=8 autoregressive/train/extract_codes_c2i.py --vq-ckpt vq_ds16_c2i.pt \\
        --data-path /data/ImageNet/train --code-path codes/vq16_384 --ten-crop --crop-range 1.1 --image-size 384
"""
from autoregressive.train.extract_codes import main

if __name__ == "__main__":
    main(num_factors=None)
