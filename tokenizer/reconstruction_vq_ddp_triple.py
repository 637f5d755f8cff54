"""Reconstruction evaluation of an FQGAN-triple tokenizer (3 factors); see tokenizer/reconstruct.py.

    torchrun --nproc_per_node=8 tokenizer/reconstruction_vq_ddp_triple.py --data-path /data/ImageNet/val \\
        --vq-ckpt fqgan_triple_ds16.pt --per-proc-batch-size 128 --folder-name FQGAN_Triple_DS16
"""
from tokenizer.reconstruct import main

if __name__ == "__main__":
    main(num_factors=3)
