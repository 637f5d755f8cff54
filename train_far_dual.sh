#!/usr/bin/env bash
# Train the FAR generator on FQGAN-Dual codes: (1) extract ten-crop codes of ImageNet with the tokenizer,
# (2) train FAR-B for 300 epochs. The paper's steps and defaults (the training recipe: --recipe far, utils/recipes.py).
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
TRAIN=(--recipe far --code-path "$CODE_PATH" --gpt-model "$GPT_MODEL" --exp-name "${EXP_NAME:-far_base_${FACTORS}_code_300epoch}"
       "$@")
check_flags autoregressive/train/train_c2i_${FACTORS}.py "${TRAIN[@]}"  # before hours of extraction
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
launch 18988 autoregressive/train/train_c2i_${FACTORS}.py "${TRAIN[@]}"
