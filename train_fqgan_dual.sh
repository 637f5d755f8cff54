#!/usr/bin/env bash
# Train the FQGAN-Dual tokenizer (VQ-16, 2 x 16384 x 8 codebooks) with the paper's hyper-parameters
# (train_fqgan_triple.sh runs this with FACTORS=triple: 3 codebooks, DINOv2 and CLIP teachers).
#   DATA_PATH=/data/ImageNet/train bash train_fqgan_dual.sh                      # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 DATA_PATH=... bash train_fqgan_dual.sh  # (and NODE_RANK=1 on host1)
# Environment: FACTORS (dual | triple), DATA_PATH, EXP_NAME, NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT, PYTHON.
# Extra arguments are passed to tokenizer/vq_train_<FACTORS>.py and override the defaults below
# (e.g. --vq-model VQ-8, --ema, --auto-resume, --teacher-sem /models/clip-vit-large-patch14).
#
# The paper trained on 8 GPUs x 32 images. The images of one forward pass are also the InfoNCE negatives, the
# entropy loss's batch average and the PatchGAN's BatchNorm statistics, so on fewer GPUs the script keeps 32
# images per forward pass with gradient accumulation (printed below); --gradient-accumulation-steps overrides.
set -euo pipefail
source "$(dirname "$0")/scripts_common.sh"
FACTORS=${FACTORS:-dual}
GLOBAL_BATCH=$(flag_value --global-batch-size 256 "$@")
ACCUM=$(recipe_accumulation "$GLOBAL_BATCH" 32 "$@")
set -x
launch 8988 tokenizer/vq_train_${FACTORS}.py \
  --data-path "${DATA_PATH:-/data/ImageNet/train}" \
  --image-size 256 \
  --vq-model VQ-16 \
  --global-batch-size 256 \
  --gradient-accumulation-steps "$ACCUM" \
  --codebook-size 16384 \
  --codebook-embed-dim 8 \
  --entropy-loss-ratio 0.03 \
  --epochs 40 \
  --lr 2e-4 \
  --with_disentanglement \
  --disentanglement-ratio 0.1 \
  --with_clip_supervision \
  --semantic-weight 0.5 \
  --exp-name "${EXP_NAME:-FQGAN_${FACTORS^}_16384_40ep_DisAndSem}" \
  "$@"
