#!/usr/bin/env bash
# Train the FQGAN-Dual tokenizer (VQ-16, 2 x 16384 x 8 codebooks) with the paper's hyper-parameters
# (train_fqgan_triple.sh runs this with FACTORS=triple: 3 codebooks, DINOv2 and CLIP teachers).
#   DATA_PATH=/data/ImageNet/train bash train_fqgan_dual.sh                      # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 DATA_PATH=... bash train_fqgan_dual.sh  # (and NODE_RANK=1 on host1)
# Environment: FACTORS (dual | triple), DATA_PATH, EXP_NAME, NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT, PYTHON.
# Extra arguments are passed to tokenizer/vq_train_<FACTORS>.py and override the recipe
# (e.g. --vq-model VQ-8, --ema, --auto-resume, --teacher-sem /models/clip-vit-large-patch14).
#
# The recipe (utils/recipes.py, --recipe fqgan-<FACTORS>) is the paper's: batch 256, 40 epochs, lr 2e-4, entropy loss
# 0.03, disentanglement 0.1, semantic supervision 0.5, and 32 images per forward pass on any number of GPUs (the
# run computes the gradient-accumulation steps; --gradient-accumulation-steps overrides). The split is printed first.
set -euo pipefail
source "$(dirname "$0")/scripts_common.sh"
FACTORS=${FACTORS:-dual}
ARGS=(--recipe "fqgan-$FACTORS" --data-path "${DATA_PATH:-/data/ImageNet/train}"
      --exp-name "${EXP_NAME:-FQGAN_${FACTORS^}_16384_40ep_DisAndSem}" "$@")
check_flags tokenizer/vq_train_${FACTORS}.py "${ARGS[@]}"
set -x
launch 8988 tokenizer/vq_train_${FACTORS}.py "${ARGS[@]}"
