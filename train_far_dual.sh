#!/usr/bin/env bash
# Train the FAR generator on FQGAN-Dual codes: (1) extract ten-crop codes of ImageNet with the tokenizer,
# (2) train FAR-B for 300 epochs. The paper's steps and defaults.
#   VQ_CKPT=fqgan_dual_ds16.pt DATA_PATH=/data/ImageNet/train bash train_far_dual.sh
# Environment: VQ_CKPT, DATA_PATH, CODE_PATH, GPT_MODEL, EXP_NAME, SKIP_EXTRACT=1 (codes already there),
# NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT, PYTHON.
# Extra arguments go to the training script (e.g. --fsdp for FAR-L, --auto-resume, --ema).
set -euo pipefail
source "$(dirname "$0")/scripts_common.sh"
FACTORS=${FACTORS:-dual}
VQ_CKPT=${VQ_CKPT:-results_tokenizer_image/fqgan_${FACTORS}_ds16.pt}
CODE_PATH=${CODE_PATH:-DATA/C2I/imagenet_code_c2i_flip_ten_crop_${FACTORS}}
GPT_MODEL=${GPT_MODEL:-FAR-B}
set -x
if [ "${SKIP_EXTRACT:-0}" != "1" ]; then
  launch 12335 autoregressive/train/extract_codes_c2i_${FACTORS}_code.py \
    --vq-ckpt "$VQ_CKPT" \
    --codebook-size 16384 \
    --codebook-embed-dim 8 \
    --data-path "${DATA_PATH:-/data/ImageNet/train}" \
    --code-path "$CODE_PATH" \
    --ten-crop \
    --crop-range 1.1 \
    --image-size 256
fi
launch 18988 autoregressive/train/train_c2i_${FACTORS}.py \
  --code-path "$CODE_PATH" \
  --image-size 256 \
  --vocab-size 16384 \
  --epochs 300 \
  --dataset imagenet_${FACTORS}_code \
  --gpt-model "$GPT_MODEL" \
  --ckpt-every 125000 \
  --lr 1e-4 \
  --global-batch-size 256 \
  --exp-name "${EXP_NAME:-far_base_${FACTORS}_code_300epoch}" \
  "$@"
