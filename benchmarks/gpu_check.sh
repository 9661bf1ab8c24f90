#!/usr/bin/env bash
# The one GPU check of a session (run on the lent GPU machine by the device tool, from the
# repository root): install, the GPU tests, op benchmarks, the GPU benchmark matrix. Logs go under
# $OUT (summary.txt first). Steps run in order of importance, each with its own timeout, inside a
# total budget (GPU_CHECK_SECONDS, default 540 s) so the whole script fits one device command.
set -uo pipefail
OUT=${OUT:-/tmp/fastmeta_gpu}
mkdir -p "$OUT"
export FASTMETA_CUDA_ARCH=${FASTMETA_CUDA_ARCH:-90}
TOTAL=${GPU_CHECK_SECONDS:-540}
start=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - start) )); }
# run_step NAME SECONDS LOG COMMAND...: runs COMMAND with min(SECONDS, budget left - 10) seconds
run_step() {
  local name=$1 secs=$2 log=$3; shift 3
  local budget=$(( $(left) - 10 ))
  (( secs > budget )) && secs=$budget
  if (( secs < 20 )); then echo "== $name: skipped, out of budget" | tee -a "$OUT/summary.txt"; return; fi
  echo "== $name (t=$(( $(date +%s) - start ))s, limit ${secs}s)" | tee -a "$OUT/summary.txt"
  timeout "$secs" "$@" > "$OUT/$log" 2>&1
  echo "   rc=$?" >> "$OUT/summary.txt"
  grep -v '^USDT' "$OUT/$log" | tail -"${TAIL:-40}" >> "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv >> "$OUT/summary.txt" 2>&1
TAIL=5 run_step install 300 install.log pip install --no-build-isolation --no-deps -e .
TAIL=30 run_step info 30 info.txt python -m fastmeta.info
TAIL=15 run_step "gpu tests" 150 tests.log python -m pytest -q -x -rs tests/test_gpu.py tests/test_triton.py tests/test_ops.py
TAIL=45 run_step "op benchmarks" 45 bench_ops.txt python -m pytest -q benchmarks/bench_ops.py --benchmark-only \
  --benchmark-json "$OUT/bench_ops.json" --benchmark-columns=median,iqr,rounds
run_step "sine T=25" 150 bench_sine_T25.txt python -m fastmeta.bench --workload sine --tasks 25 --no-progress \
  --max-seconds 4 --min-seconds 0.3 --json "$OUT/bench_sine_T25.json"
run_step "sine T=1000" 100 bench_sine_T1000.txt python -m fastmeta.bench --workload sine --tasks 1000 --no-progress \
  --providers fastmeta,fastmeta-triton,fastmeta-cuda,fastmeta-torch,vmap,vmap_graph,compile --max-seconds 4 --min-seconds 0.3 \
  --json "$OUT/bench_sine_T1000.json"
run_step "conv" 150 bench_conv.txt python -m fastmeta.bench --workload omniglot,miniimagenet --order second \
  --no-progress --providers fastmeta,loop,vmap,compile --reps 5 --max-seconds 4 --json "$OUT/bench_conv.json"
echo "== done (t=$(( $(date +%s) - start ))s)" | tee -a "$OUT/summary.txt"
