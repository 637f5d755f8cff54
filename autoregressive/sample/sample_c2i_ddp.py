"""Sample any class-conditional generator (LlamaGen's GPT-* or FAR-*, the factor count read from the checkpoint)
into an FID npz, LlamaGen's command line and defaults (--gpt-model GPT-B, --image-size 384); see
autoregressive/sample/sample_c2i.py.

    torchrun --nproc_per_node=8 autoregressive/sample/sample_c2i_ddp.py --vq-ckpt vq_ds16_c2i.pt \\
        --gpt-ckpt c2i_B_384.pt --gpt-model GPT-B --image-size 384 --image-size-eval 256 --cfg-scale 2.0
"""
from autoregressive.sample.sample_c2i import LLAMAGEN_DEFAULTS, main

if __name__ == "__main__":
    main(num_factors=None, defaults=LLAMAGEN_DEFAULTS)
