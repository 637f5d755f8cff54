"""Train a FAR generator on FQGAN-triple codes (3 factors); see autoregressive/train/train_c2i.py.

    torchrun --nproc_per_node=8 autoregressive/train/train_c2i_triple.py --code-path codes/triple \\
        --gpt-model FAR-B --epochs 300 --lr 1e-4 --global-batch-size 256 --exp-name far_base_triple
"""
from autoregressive.train.train_c2i import main

if __name__ == "__main__":
    main(num_factors=3)
