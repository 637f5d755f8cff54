#!/usr/bin/env bash
# Train the FQGAN-Triple tokenizer (visual, mid- and high-level semantic codebooks; DINOv2-small and
# CLIP ViT-B/16 teachers) with the paper's hyper-parameters; the same script as train_fqgan_dual.sh.
#   DATA_PATH=/data/ImageNet/train bash train_fqgan_triple.sh [extra flags, e.g. --teacher-sem-mid DIR]
set -euo pipefail
FACTORS=triple exec bash "$(dirname "$0")/train_fqgan_dual.sh" "$@"
