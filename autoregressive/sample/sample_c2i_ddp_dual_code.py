"""Sample a FAR generator trained on FQGAN-dual codes (2 factors) into an FID npz; see
autoregressive/sample/sample_c2i.py and eval_far.sh.

    torchrun --nproc_per_node=8 autoregressive/sample/sample_c2i_ddp_dual_code.py \\
        --vq-ckpt fqgan_dual_ds16.pt --gpt-ckpt far_dual.pt --gpt-model FAR-B --cfg-scale 2.0
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from autoregressive.sample.sample_c2i import main  # noqa: E402

if __name__ == "__main__":
    main(num_factors=2)
