# Shared by the launch scripts (sourced, not run): torchrun settings from the environment.
#   NNODES NPROC_PER_NODE NODE_RANK MASTER_ADDR MASTER_PORT   torchrun's settings
#   PYTHON                                                    interpreter (default: .venv/bin/python, else python3)
# NPROC_PER_NODE defaults to the number of visible GPUs, or 1 on a machine without one.
# Paths given to the scripts are relative to where you run them (outputs land there too), as in the original.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# The project's packages, also for an interpreter where `pip install -r requirements.txt` (which installs the
# project itself, editable) has not run.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
# check_count NAME MIN: the variable NAME must be a whole number >= MIN (one line and exit 2 otherwise), checked
# here before any bash arithmetic or torchrun sees it.
check_count() {
  local value=${!1}
  if ! [[ "$value" =~ ^[0-9]+$ ]] || [ "$((10#$value))" -lt "$2" ]; then
    echo "error: $1=$value: expected a whole number >= $2" >&2
    exit 2
  fi
}
check_count NNODES 1
check_count NPROC_PER_NODE 1
check_count NODE_RANK 0
[ "$NODE_RANK" -lt "$NNODES" ] || { echo "error: NODE_RANK=$NODE_RANK: must be below NNODES=$NNODES" >&2; exit 2; }
if [ -n "${MASTER_PORT:-}" ]; then check_count MASTER_PORT 1; fi
# launch PORT SCRIPT ARGS...: torchrun SCRIPT (relative to the repository); one CPU, one GPU node or many nodes
launch() {
  local port=$1; shift
  "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-$port}" "$ROOT/$1" "${@:2}"
}
# check_flags SCRIPT ARGS...: SCRIPT's own check of its flags, before torchrun starts: one line and the exit status
# of argparse (2) or of the config (1) when they are wrong; else it prints the batch split the run will use, computed
# by the code the run uses, for NNODES x NPROC_PER_NODE processes.
check_flags() {
  WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) "$PYTHON" "$ROOT/$1" --check-flags "${@:2}" >&2
}
