"""Sample a FAR generator trained on FQGAN-dual codes (2 factors) into an FID npz; see
autoregressive/sample/sample_c2i.py and eval_far.sh.

    torchrun --nproc_per_node=8 autoregressive/sample/sample_c2i_ddp_dual_code.py \\
        --vq-ckpt fqgan_dual_ds16.pt --gpt-ckpt far_dual.pt --gpt-model FAR-B --cfg-scale 2.0
"""
from autoregressive.sample.sample_c2i import main

if __name__ == "__main__":
    main(num_factors=2)
