#!/usr/bin/env bash
# The one GPU check of a session (run on the lent GPU machine by the device tool, from the
# repository root): install, the GPU tests, the GPU benchmark matrix. Logs go under $OUT.
# Sized for under 8 minutes on an H100.
set -uo pipefail
OUT=${OUT:-/tmp/fastmeta_gpu}
mkdir -p "$OUT"
export FASTMETA_CUDA_ARCH=${FASTMETA_CUDA_ARCH:-90}
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start ))s)" | tee -a "$OUT/summary.txt"; }

step install
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || tail -30 "$OUT/install.log"
python -m fastmeta.info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt" >> "$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv >> "$OUT/summary.txt" 2>&1

step "gpu tests"
timeout 240 python -m pytest -q -x tests/test_gpu.py tests/test_triton.py tests/test_ops.py \
  > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/summary.txt"; tail -3 "$OUT/tests.log" >> "$OUT/summary.txt"

step "bench inner_update"
timeout 60 python -m pytest -q benchmarks/bench_ops.py --benchmark-only --benchmark-json "$OUT/bench_ops.json" \
  > "$OUT/bench_ops.txt" 2>&1; tail -25 "$OUT/bench_ops.txt" >> "$OUT/summary.txt"

step "bench sine T=25"
timeout 150 python -m fastmeta.bench --workload sine --tasks 25 --no-progress --json "$OUT/bench_sine_T25.json" \
  > "$OUT/bench_sine_T25.txt" 2>&1; cat "$OUT/bench_sine_T25.txt" >> "$OUT/summary.txt"

step "bench sine T=1000"
timeout 120 python -m fastmeta.bench --workload sine --tasks 1000 --no-progress \
  --providers fastmeta,fastmeta-torch,vmap,vmap_graph,compile --json "$OUT/bench_sine_T1000.json" \
  > "$OUT/bench_sine_T1000.txt" 2>&1; cat "$OUT/bench_sine_T1000.txt" >> "$OUT/summary.txt"

step "bench conv"
timeout 150 python -m fastmeta.bench --workload omniglot,miniimagenet --order second --no-progress \
  --providers fastmeta,loop,vmap,compile --reps 5 --json "$OUT/bench_conv.json" \
  > "$OUT/bench_conv.txt" 2>&1; cat "$OUT/bench_conv.txt" >> "$OUT/summary.txt"
step done
