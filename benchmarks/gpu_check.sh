#!/usr/bin/env bash
# The one GPU check of a session (run on the lent GPU machine by the device tool, from the
# repository root): install, the GPU tests, the GPU benchmark matrix, op benchmarks. Steps run in
# order of importance, each with its own timeout, inside a total budget (GPU_CHECK_SECONDS, default
# 440 s) so the whole script fits one device command. $OUT receives summary.txt (each step's tail)
# and logs.tgz (every full log and the benchmark JSONs): few files, as the device tool returns 8.
# GPU_CHECK_STEPS picks steps (default: all), e.g. GPU_CHECK_STEPS="install tests sine25".
set -uo pipefail
OUT=${OUT:-/tmp/fastmeta_gpu}
LOG=${GPU_CHECK_LOGS:-/tmp/fastmeta_gpu_logs}
mkdir -p "$OUT" "$LOG"
export FASTMETA_CUDA_ARCH=${FASTMETA_CUDA_ARCH:-90} PYTHONUNBUFFERED=1
TOTAL=${GPU_CHECK_SECONDS:-440}
STEPS=${GPU_CHECK_STEPS:-"install info tests sine25 sine1000 prof ops omniglot miniimagenet"}
start=$(date +%s)
SUMMARY="$OUT/summary.txt"
pack() { cp "$SUMMARY" "$LOG/" 2>/dev/null; tar czf "$OUT/logs.tgz" -C "$LOG" . 2>/dev/null; }
trap pack EXIT
left() { echo $(( TOTAL - ($(date +%s) - start) )); }
want() { [[ " $STEPS " == *" $1 "* ]]; }
# run_step KEY SECONDS LOG COMMAND...: runs COMMAND with min(SECONDS, budget left - 15) seconds
run_step() {
  local key=$1 secs=$2 log=$3; shift 3
  want "$key" || return 0
  local budget=$(( $(left) - 15 ))
  (( secs > budget )) && secs=$budget
  if (( secs < 20 )); then echo "== $key: skipped, out of budget" | tee -a "$SUMMARY"; return; fi
  echo "== $key (t=$(( $(date +%s) - start ))s, limit ${secs}s)" | tee -a "$SUMMARY"
  timeout "$secs" "$@" > "$LOG/$log" 2>&1
  echo "   rc=$? after $(( $(date +%s) - start ))s" >> "$SUMMARY"
  grep -v '^USDT' "$LOG/$log" | tail -"${TAIL:-40}" >> "$SUMMARY"
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
  python -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  nvcc --version | tail -1; } >> "$SUMMARY" 2>&1
TAIL=8 run_step install 240 install.log python -m pip install --no-build-isolation --no-deps -v -e .
TAIL=30 run_step info 30 info.txt sh -c 'python -m fastmeta.info; cat fastmeta/_build_status.json'
TAIL=40 run_step tests 170 tests.log python -m pytest -q -rfEs -p no:cacheprovider --timeout=120 \
  tests/test_gpu.py tests/test_triton.py tests/test_ops.py
BENCH="python -m fastmeta.bench --workload sine --no-progress --max-seconds 3 --min-seconds 0.3"
run_step sine25 150 bench_sine_T25.txt $BENCH --tasks 25 \
  --providers fastmeta,fastmeta-triton,fastmeta-cuda,fastmeta-torch,loop,vmap,vmap_graph,compile \
  --json "$LOG/bench_sine_T25.json"
run_step sine1000 100 bench_sine_T1000.txt $BENCH --tasks 1000 \
  --providers fastmeta,fastmeta-triton,fastmeta-cuda,fastmeta-torch,vmap,vmap_graph,compile \
  --json "$LOG/bench_sine_T1000.json"
TAIL=60 run_step prof 60 profile.txt sh -c 'for b in triton cuda; do for o in second first; do
  python -m fastmeta.profile --workload sine --tasks 25 --provider fastmeta-$b --order $o --iterations 20 --trace ""
  done; done'
TAIL=45 run_step ops 45 bench_ops.txt python -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py \
  --benchmark-only --benchmark-json "$LOG/bench_ops.json" --benchmark-columns=median,iqr,rounds
# conv: one row per line as it finishes (a step cut short still reports); torch.compile last
CONV="python -m fastmeta.bench --order second --no-progress --reps 5 --max-seconds 4 --min-seconds 0.3"
TAIL=12 run_step omniglot 100 bench_omniglot.txt $CONV --workload omniglot --providers fastmeta,loop,vmap,compile \
  --json "$LOG/bench_omniglot.json"
TAIL=12 run_step miniimagenet 100 bench_miniimagenet.txt $CONV --workload miniimagenet \
  --providers fastmeta,loop,vmap,compile --json "$LOG/bench_miniimagenet.json"
echo "== done (t=$(( $(date +%s) - start ))s)" | tee -a "$SUMMARY"
