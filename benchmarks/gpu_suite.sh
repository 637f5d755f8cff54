#!/usr/bin/env bash
# The GPU suite, one command: every benchmark at GPU sizes, each under its own timeout, then the CUDA-only
# tests (pytest -m cuda). Prints ONE JSON line per step on stdout, also when a step fails or times out
# ({"benchmark": NAME, "error": ..., "rc": ..., "stderr_tail": ...}), and keeps going. Progress and each
# step's wall time go to stderr; full logs to $SUITE_LOGS (default: a fresh temporary folder).
#
#   bash benchmarks/gpu_suite.sh | tee suite.jsonl
#
# Budget: under 8 minutes on one H100-class GPU (SUITE_BUDGET_S, default 470 s). Each step's timeout is cut to
# what is left of the budget; a step with under 20 s left is reported as skipped. Steps run in order of
# importance. Needs python3 with torch (CUDA), numpy, pytest; not lpips or tensorflow.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-470}
LOGS=${SUITE_LOGS:-$(mktemp -d -t gpu_suite.XXXXXX)}
mkdir -p "$LOGS"
START=$(date +%s)
echo "# gpu_suite: logs in $LOGS, budget ${BUDGET}s" >&2

# The line printed for a step that failed, timed out or printed no JSON (with the ends of its output).
ERROR_LINE='
import json, sys
name, rc, seconds, limit, err, out = sys.argv[1:]
tail = lambda path, n: open(path, errors="replace").read()[-n:]
print(json.dumps({"benchmark": name, "error": "timeout" if rc in ("124", "137") else "failed", "rc": int(rc),
                  "seconds": int(seconds), "limit_s": int(limit), "stderr_tail": tail(err, 1500),
                  "stdout_tail": tail(out, 500)}))'

# run NAME TIMEOUT_S COMMAND...: the step's last JSON line on stdout, or one error/skip line
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "{\"benchmark\": \"$name\", \"skipped\": \"suite budget spent\"}"
    echo "# $name: skipped (budget)" >&2
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err"
  local rc=$?
  local seconds=$(($(date +%s) - t0))
  local line
  line=$(grep -E '^\{.*\}[[:space:]]*$' "$LOGS/$name.out" | tail -n 1)
  if [ "$rc" -eq 0 ] && [ -n "$line" ]; then
    echo "$line"
  else
    "$PY" -c "$ERROR_LINE" "$name" "$rc" "$seconds" "$limit" "$LOGS/$name.err" "$LOGS/$name.out" ||
      echo "{\"benchmark\": \"$name\", \"error\": \"failed\", \"rc\": $rc}"
  fi
  echo "# $name: rc $rc, ${seconds}s (elapsed $(($(date +%s) - START))s)" >&2
}

# run_if_present NAME TIMEOUT_S SCRIPT ARGS...: for benchmarks other issues add; skipped while the script, or
# a flag it is given, does not exist yet
run_if_present() {
  local name=$1 limit=$2 script=$3
  shift 3
  local flag
  if [ ! -f "$script" ]; then
    echo "{\"benchmark\": \"$name\", \"skipped\": \"$script not present\"}"
    return
  fi
  for flag in "$@"; do
    if [[ $flag == --* ]] && ! "$PY" "$script" --help 2>/dev/null | grep -q -e "$flag"; then
      echo "{\"benchmark\": \"$name\", \"skipped\": \"$script has no $flag yet\"}"
      return
    fi
  done
  run "$name" "$limit" "$PY" "$script" "$@"
}

run environment 60 "$PY" -c '
import json, os, torch
cuda = torch.cuda.is_available()
print(json.dumps({"benchmark": "environment", "torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name() if cuda else None, "cpus": os.cpu_count(),
                  "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}))'
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo '{"benchmark": "gpu_suite", "skipped": "no CUDA device (the benchmarks would run on the CPU)"}'
  exit 0
fi

# --- this issue: FID sampling -------------------------------------------------------------------------------
# The headline: FAR-B dual, CFG 2.0, batch from free memory, compiled (+ CUDA graphs, compiled decoder), two
# timed batches, then the same again decoding on a second stream (images_per_s_decode_stream).
SAMPLE_BATCH=${SAMPLE_BATCH:-}
run sample_fid_farb_dual_compiled 240 "$PY" benchmarks/sample_fid.py --gpt-model FAR-B --factors 2 \
  --cfg-scale 2.0 ${SAMPLE_BATCH:+--batch-size $SAMPLE_BATCH} --num-batches 2 --decode-stream both
# Eager at the same batch (the free-memory rule gives the same one): compiled must never be slower.
run sample_fid_farb_dual_eager 120 "$PY" benchmarks/sample_fid.py --gpt-model FAR-B --factors 2 \
  --cfg-scale 2.0 ${SAMPLE_BATCH:+--batch-size $SAMPLE_BATCH} --num-batches 1 --no-compile --no-stages
# The CUDA-only tests: compiled generation == eager, sampler under torchrun/NCCL, bf16 training steps.
run pytest_cuda 240 "$PY" -c '
import json, subprocess, sys, time
t0 = time.time()
r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider"],
                   capture_output=True, text=True)
lines = (r.stdout + r.stderr).strip().splitlines()
print("\n".join(lines[-40:]), file=sys.stderr)
print(json.dumps({"benchmark": "pytest_cuda", "rc": r.returncode, "summary": lines[-1] if lines else "",
                  "failures": [l for l in lines if l.startswith(("FAILED", "ERROR"))][:10],
                  "seconds": round(time.time() - t0, 1)}))
sys.exit(r.returncode)'
# The decoder alone: fp32, bf16, bf16 + channels_last, and that compiled (its compile hits the cache above).
run decode_variants 120 "$PY" benchmarks/sample_fid.py --decode-variants --decode-batch-size 128
# Eager generation alone at batch 256 (the issue's starting point: 38.8 images/s on an H200).
run generate_farb_dual_eager_b256 90 "$PY" benchmarks/generate.py --gpt-model FAR-B --factors 2 \
  --batch-size 256 --cfg-scale 2.0 --loader-items 0

# --- tokenizer benchmarks (GPU defaults) ----------------------------------------------------------------------
run tokenizer 90 "$PY" benchmarks/tokenizer.py --iters 2
run reconstruct 90 "$PY" benchmarks/reconstruct.py --iters 2
run train_tokenizer 90 "$PY" benchmarks/train_tokenizer.py --batch-size 8 --iters 2

# --- added by other issues: training and evaluator benchmarks --------------------------------------------------
# Owners: put GPU-size flags here; keep each step's timeout within the suite budget (stdout: one JSON line).
run_if_present train_far 90 benchmarks/train_far.py
run_if_present train_tokenizer_compiled 120 benchmarks/train_tokenizer.py --compile --batch-size 8
run_if_present evaluator 90 benchmarks/evaluator.py

echo "# gpu_suite: done in $(($(date +%s) - START))s" >&2
