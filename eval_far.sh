#!/usr/bin/env bash
# Sample 50,000 images from a trained FAR generator and score them with the ADM numbers (IS, FID, sFID, precision,
# recall), in one command: each rank runs ADM's Inception graph (torch backend) on its images as they are decoded,
# and rank 0 prints and writes the five numbers at the end (<sample-dir>/<name>.txt, <sample-dir>/fid.jsonl).
#   VQ_CKPT=fqgan_dual_ds16.pt GPT_CKPT=results/FAR-B-far_base_dual_code_300epoch/checkpoints/1500000.pt \
#   REF_BATCH=reconstructions/VIRTUAL_imagenet256_labeled.npz bash eval_far.sh
# Environment: FACTORS (dual | triple), VQ_CKPT, GPT_CKPT, GPT_MODEL, SAMPLE_DIR, CFG_SCALE, REF_BATCH,
# NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT, PYTHON;
# CFG_SCALES=1.5,1.75,2.0 for a guidance sweep in one process (one npz, score and JSON line per scale);
# TWO_STEP=1 for the two-step path: the npz, then evaluations/evaluator.py (EVAL_BACKEND=tf for ADM's TensorFlow).
# Extra arguments go to the sampler (e.g. --class-balanced, --per-proc-batch-size 64, --no-save-npz).
# REF_BATCH is ADM's ImageNet 256 reference batch (VIRTUAL_imagenet256_labeled.npz from the
# guided-diffusion evaluations page); scoring also needs classify_image_graph_def.pb (the error says where).
set -euo pipefail
source "$(dirname "$0")/scripts_common.sh"
FACTORS=${FACTORS:-dual}
VQ_CKPT=${VQ_CKPT:-results_tokenizer_image/fqgan_${FACTORS}_ds16.pt}
GPT_CKPT=${GPT_CKPT:-results/FAR-B-far_base_${FACTORS}_code_300epoch/checkpoints/1500000.pt}
GPT_MODEL=${GPT_MODEL:-FAR-B}
SAMPLE_DIR=${SAMPLE_DIR:-samples_far_base_${FACTORS}_code_300epoch}
CFG_SCALE=${CFG_SCALE:-2.0}
REF_BATCH=${REF_BATCH:-reconstructions/VIRTUAL_imagenet256_labeled.npz}
NAME=${NAME:-$GPT_MODEL-$(basename "${GPT_CKPT%.pt}")-cfg-$CFG_SCALE}
GUIDANCE=(--cfg-scale "$CFG_SCALE")
if [[ -n "${CFG_SCALES:-}" ]]; then  # the names get -cfg-<scale>
  GUIDANCE=(--cfg-scales "$CFG_SCALES")
  NAME=$GPT_MODEL-$(basename "${GPT_CKPT%.pt}")
fi
SCORE=(--fid-ref "$REF_BATCH")
[[ "${TWO_STEP:-0}" == 1 ]] && SCORE=()
set -x
launch 12940 autoregressive/sample/sample_c2i_ddp_${FACTORS}_code.py \
  --vq-ckpt "$VQ_CKPT" \
  --codebook-size 16384 \
  --codebook-embed-dim 8 \
  --gpt-ckpt "$GPT_CKPT" \
  --gpt-model "$GPT_MODEL" \
  --image-size-eval 256 \
  "${GUIDANCE[@]}" \
  --top-k 0 \
  --top-p 1.0 \
  --sample-dir "$SAMPLE_DIR" \
  --name "$NAME" \
  "${SCORE[@]}" \
  "$@"
if [[ "${TWO_STEP:-0}" == 1 ]]; then
  for npz in "$SAMPLE_DIR/$NAME"*.npz; do
    "$PYTHON" "$ROOT/evaluations/evaluator.py" --backend "${EVAL_BACKEND:-auto}" "$REF_BATCH" "$npz"
  done
fi
