"""Reconstruction evaluation of any tokenizer, LlamaGen's command line (the factor count is read from the
checkpoint: LlamaGen's vq_ds16_c2i.pt / vq_ds8_c2i.pt or an FQGAN one); see tokenizer/reconstruct.py.

    torchrun --nproc_per_node=8 tokenizer/reconstruction_vq_ddp.py --data-path /data/ImageNet/val \\
        --vq-model VQ-16 --vq-ckpt vq_ds16_c2i.pt --image-size 256 --image-size-eval 256 --folder-name VQ16
"""
from tokenizer.reconstruct import main

if __name__ == "__main__":
    main(num_factors=None)
