#!/usr/bin/env bash
# Sample 50,000 images from a trained FAR generator and score them with the ADM evaluator (FID, IS, ...).
#   VQ_CKPT=fqgan_dual_ds16.pt GPT_CKPT=results/FAR-B-far_base_dual_code_300epoch/checkpoints/1500000.pt \
#   REF_BATCH=reconstructions/VIRTUAL_imagenet256_labeled.npz bash eval_far.sh
# Environment: FACTORS (dual | triple), VQ_CKPT, GPT_CKPT, GPT_MODEL, SAMPLE_DIR, CFG_SCALE, REF_BATCH,
# NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT, PYTHON.
# Extra arguments go to the sampler (e.g. --class-balanced, --per-proc-batch-size 64, --compile).
# REF_BATCH is ADM's ImageNet 256 reference batch (VIRTUAL_imagenet256_labeled.npz from the
# guided-diffusion evaluations page); the evaluator also needs classify_image_graph_def.pb (it says where).
set -euo pipefail
source "$(dirname "$0")/scripts_common.sh"
FACTORS=${FACTORS:-dual}
VQ_CKPT=${VQ_CKPT:-results_tokenizer_image/fqgan_${FACTORS}_ds16.pt}
GPT_CKPT=${GPT_CKPT:-results/FAR-B-far_base_${FACTORS}_code_300epoch/checkpoints/1500000.pt}
GPT_MODEL=${GPT_MODEL:-FAR-B}
SAMPLE_DIR=${SAMPLE_DIR:-samples_far_base_${FACTORS}_code_300epoch}
CFG_SCALE=${CFG_SCALE:-2.0}
NAME=${NAME:-$GPT_MODEL-$(basename "${GPT_CKPT%.pt}")-cfg-$CFG_SCALE}
set -x
launch 12940 autoregressive/sample/sample_c2i_ddp_${FACTORS}_code.py \
  --vq-ckpt "$VQ_CKPT" \
  --codebook-size 16384 \
  --codebook-embed-dim 8 \
  --gpt-ckpt "$GPT_CKPT" \
  --gpt-model "$GPT_MODEL" \
  --image-size 256 \
  --image-size-eval 256 \
  --cfg-scale "$CFG_SCALE" \
  --top-k 0 \
  --top-p 1.0 \
  --sample-dir "$SAMPLE_DIR" \
  --name "$NAME" \
  "$@"
"$PYTHON" "$ROOT/evaluations/evaluator.py" "${REF_BATCH:-reconstructions/VIRTUAL_imagenet256_labeled.npz}" "$SAMPLE_DIR/$NAME.npz"
