#!/usr/bin/env bash
# The GPU suite, one command: every benchmark at GPU sizes and the CUDA-only tests (pytest -m cuda), each under
# its own timeout. Prints the JSON lines of each step on stdout (one per measurement), or ONE line when a step
# fails or times out ({"benchmark": NAME, "error": ..., "rc": ..., "stderr_tail": ...}), and keeps going. Progress and each
# step's wall time go to stderr; full logs to $SUITE_LOGS (default: a fresh temporary folder).
#
#   bash benchmarks/gpu_suite.sh | tee suite.jsonl
#   SUITE_ONLY='sample|generate' bash benchmarks/gpu_suite.sh     # only the steps whose names match (grep -E)
#
# Budget: 9 minutes (SUITE_BUDGET_S, default 540 s, inside one 10-minute device command; compiling is most of
# it). Every step together takes longer than that, so the budget cuts the tail; raise it to run everything.
# Each step's timeout is cut to what is left of the budget; a step with under 20 s left is reported as skipped.
# Steps run in order of importance: decode attention, the FID pipeline cold and warm, compiled training steps,
# the evaluator, pytest -m cuda. Needs python3 with torch (CUDA), numpy, pytest, scikit-image, transformers and tensorboard; not
# tensorflow; lpips only for the tokenizer's full training step (the others run without it).
set -u
cd "$(dirname "$0")/.." || exit 1
# the project's packages without an install (GPU machines often run a preinstalled python3)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-540}
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

# run NAME TIMEOUT_S COMMAND...: the step's JSON lines on stdout, or one error/skip line
run() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${SUITE_ONLY:-}" ] && [ "$name" != environment ] && ! grep -qE "$SUITE_ONLY" <<<"$name"; then
    return
  fi
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
  local lines
  lines=$(grep -E '^\{.*\}[[:space:]]*$' "$LOGS/$name.out")
  [ -n "$lines" ] && echo "$lines"  # what it measured, also when it then failed or ran out of time
  if [ "$rc" -ne 0 ] || [ -z "$lines" ]; then
    "$PY" -c "$ERROR_LINE" "$name" "$rc" "$seconds" "$limit" "$LOGS/$name.err" "$LOGS/$name.out" ||
      echo "{\"benchmark\": \"$name\", \"error\": \"failed\", \"rc\": $rc}"
  fi
  echo "# $name: rc $rc, ${seconds}s (elapsed $(($(date +%s) - START))s)" >&2
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

# Steps in order of importance; the budget cuts the tail.
# 1. Decode attention, every kernel side by side at FAR-B's shapes (2048 rows, 16 heads, head dim 64, bf16) at
#    filled lengths 1, 64, 128, 129, 256, 257: microseconds, GB/s, error against SDPA, and the fastest kernel.
run attention_decode 150 "$PY" benchmarks/attention_decode.py
FASTEST=$(grep -h '"attention_decode_summary"' "$LOGS"/attention_decode.out 2>/dev/null | "$PY" -c '
import json, sys
lines = [json.loads(line) for line in sys.stdin]
print((lines[-1].get("fastest") if lines else None) or "sdpa")' 2>/dev/null || echo sdpa)
echo "# decode kernel for the FID pipeline: ${FASTEST:-sdpa}" >&2
# 2. FID sampling, the whole pipeline (FAR-B dual, CFG 2.0, batch from free memory, compiled decoder, decode
#    stream), with that kernel: setup split into compile / warm-up / capture, ms per position at four lengths.
#    Twice: cold, then warm (the second process finds inductor's cache on disk; setup_compile_s drops).
SAMPLE_BATCH=${SAMPLE_BATCH:-}
for RUN in cold warm; do
  run sample_fid_farb_dual_${FASTEST:-sdpa}_$RUN 200 "$PY" benchmarks/sample_fid.py --gpt-model FAR-B \
    --factors 2 --cfg-scale 2.0 ${SAMPLE_BATCH:+--batch-size $SAMPLE_BATCH} --num-batches 2 \
    --attention "${FASTEST:-sdpa}"
done
# 3. Training steps, compiled: FAR-B dual (batch 64), then the tokenizer (VQ-16 dual, batch 32, bf16; the model
#    step, then the full step with LPIPS + GAN, which needs the lpips package).
run train_far_compiled 120 "$PY" benchmarks/train_far.py --iters 5
run train_tokenizer_compiled 240 "$PY" benchmarks/train_tokenizer.py --compile --iters 3
# 4. The evaluator's torch backend on the GPU at full size (a stand-in Inception graph of the real one's size).
run evaluator 90 "$PY" benchmarks/evaluator.py --backend torch --device cuda --images 3000
# 5. The CUDA-only tests: compiled generation == eager with every decode kernel and its graph counts, the
#    sampler under torchrun/NCCL, compiled bf16 training steps, the torch Inception backend on the GPU.
run pytest_cuda 300 "$PY" -c '
import json, subprocess, sys, time
t0 = time.time()
r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider",
                    "--tb=line", "--durations=12"], capture_output=True, text=True)
lines = (r.stdout + r.stderr).strip().splitlines()
print("\n".join(lines), file=sys.stderr)
print(json.dumps({"benchmark": "pytest_cuda", "rc": r.returncode, "summary": lines[-1] if lines else "",
                  "failures": [l[:600] for l in lines if l.startswith(("FAILED", "ERROR", "/", "E "))][:12],
                  "durations": [l for l in lines if " call " in l or " setup " in l][:12],
                  "seconds": round(time.time() - t0, 1)}))
sys.exit(r.returncode)'
# 6. Past the default budget (raise SUITE_BUDGET_S): eager references (compiled must never be slower), the
#    generation benchmark with its per-kernel profile, the decoder variants, TF32 and the codes.
run sample_fid_farb_dual_eager 120 "$PY" benchmarks/sample_fid.py --gpt-model FAR-B --factors 2 \
  --cfg-scale 2.0 ${SAMPLE_BATCH:+--batch-size $SAMPLE_BATCH} --num-batches 1 --no-compile --no-stages
run generate_farb_dual_b1024_${FASTEST:-sdpa} 160 "$PY" benchmarks/generate.py --gpt-model FAR-B --factors 2 \
  --batch-size 1024 --cfg-scale 2.0 --compile --attention "${FASTEST:-sdpa}" --profile --loader-items 0
run decode_variants 120 "$PY" benchmarks/sample_fid.py --decode-variants --decode-batch-size 128
run tf32_indices 60 "$PY" benchmarks/tf32_indices.py
run train_tokenizer_eager 90 "$PY" benchmarks/train_tokenizer.py --steps model --iters 3
run train_far_eager 60 "$PY" benchmarks/train_far.py --no-compile --iters 5
run encode_decode 90 "$PY" benchmarks/encode_decode.py --iters 2
run reconstruct 90 "$PY" benchmarks/reconstruct.py --iters 2

echo "# gpu_suite: done in $(($(date +%s) - START))s" >&2
