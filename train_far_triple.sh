#!/usr/bin/env bash
# Train the FAR generator on FQGAN-Triple codes; the same steps as train_far_dual.sh (see there).
set -euo pipefail
FACTORS=triple exec bash "$(dirname "$0")/train_far_dual.sh" "$@"
