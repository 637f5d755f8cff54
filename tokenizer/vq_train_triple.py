"""Train an FQGAN-triple tokenizer; see tokenizer/train.py and train_fqgan_triple.sh.

    torchrun --nproc_per_node=8 tokenizer/vq_train_triple.py --data-path /data/ImageNet/train \\
        --global-batch-size 256 --entropy-loss-ratio 0.03 --lr 2e-4 --with_disentanglement \\
        --with_clip_supervision --exp-name FQGAN_Triple
"""
from tokenizer.train import main

if __name__ == "__main__":
    main(preset="triple")
