#!/usr/bin/env bash
# The GPU check (run on a GPU machine, e.g. by the device tool, from the
# repository root): install, the GPU tests, the GPU benchmark matrix, op benchmarks. Steps run in
# order of importance, each with its own timeout, inside a total budget (GPU_CHECK_SECONDS, default
# 470 s: under 8 minutes) so the whole script fits one device command. $OUT receives summary.txt (each step's tail)
# and logs.tgz (every full log and the benchmark JSONs): few files, as the device tool returns 8.
# GPU_CHECK_STEPS picks steps and their order (default: all, see STEPS below: first what an issue's
# targets need within one run: the GPU tests, the sine steps at T=25 and T=1000 together, then the
# conv workloads and the diagnostics), e.g.
# GPU_CHECK_STEPS="install gputests sine25"; a step the budget no longer fits is skipped and said so.
set -uo pipefail
OUT=${OUT:-/tmp/fastmeta_gpu}
LOG=${GPU_CHECK_LOGS:-/tmp/fastmeta_gpu_logs}
mkdir -p "$OUT" "$LOG"
export FASTMETA_CUDA_ARCH=${FASTMETA_CUDA_ARCH:-90} PYTHONUNBUFFERED=1
TOTAL=${GPU_CHECK_SECONDS:-470}
STEPS=${GPU_CHECK_STEPS:-"install info gputests sine25 sine1000 omniglot convcompile sine_gv probe1000 miniimagenet ncu widemlp omniglot_x3 miniimagenet_x3 convprobe conv_pertask miniprof convprof precision sine_all probe gputests_triton tritonconv miniimagenet_all omniglot_cudnnbench tritontests ops ref64 anil mamlpp reptile mlpmamlpp reptilesine calloverhead dropin activations moremodules tracedforward cpu_auto"}
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
BENCH="python -m fastmeta.bench --workload sine --no-progress --max-seconds 2 --min-seconds 0.3"
# conv: one row per line as it finishes (a step cut short still reports); torch.compile in its own step
CONV="python -m fastmeta.bench --order second --no-progress --reps 5 --max-seconds 4 --min-seconds 0.3"
# ncu on one launch of the CUDA kernel (clocks left as they are: --clock-control none)
NCU="ncu --clock-control none --target-processes all --kernel-name regex:mlp_inner_loop --launch-skip 2 \
  --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis"
# One function per step; they run in the order STEPS lists them.
step_install() { TAIL=8 run_step install 240 install.log python -m pip install --no-build-isolation --no-deps -v -e .; }
step_info() { TAIL=30 run_step info 30 info.txt sh -c 'python -m fastmeta.info; cat fastmeta/_build_status.json'; }
# the GPU tests in two steps: every CUDA and torch path first, the Triton ones (which compile for
# tens of seconds each in float64) after the sine timings
step_gputests() { TAIL=40 run_step gputests 200 tests_gpu.log python -m pytest -q -rfEs -p no:cacheprovider \
  --timeout=120 tests/test_gpu.py -k "${GPU_TESTS_K:-not triton}"; }
step_gputests_triton() { TAIL=20 run_step gputests_triton 150 tests_gpu_triton.log python -m pytest -q -rfEs \
  -p no:cacheprovider --timeout=120 tests/test_gpu.py -k triton; }
# (the rows issue 4's targets name, and ours; the Triton and torch-op rows, already recorded next to
# the CUDA ones, are for sine_all: their first calls compile for tens of seconds)
step_sine25() { run_step sine25 120 bench_sine_T25.txt $BENCH --tasks 25 --providers \
  fastmeta,fastmeta_vg,fastmeta_graph,loop,vmap,vmap_graph,compile --json "$LOG/bench_sine_T25.json"; }
step_sine_all() { run_step sine_all 150 bench_sine_all.txt sh -c "$BENCH --tasks 25 --providers \
  fastmeta-cuda,fastmeta-triton,fastmeta-torch,compile --json $LOG/bench_sine_all_T25.json && $BENCH --tasks 1000 \
  --providers fastmeta-cuda,fastmeta-triton,fastmeta-torch,vmap,compile --json $LOG/bench_sine_all_T1000.json"; }
# (T=1000: more tasks than SMs, so the CUDA kernel's first launch of each shape times its
# configurations and keeps the fastest; the log line says which it took)
step_sine1000() { FASTMETA_CUDA_MLP_AUTOTUNE_LOG=1 run_step sine1000 100 bench_sine_T1000.txt $BENCH --tasks 1000 --providers \
  fastmeta,fastmeta_vg,fastmeta_graph,vmap_graph,compile --json "$LOG/bench_sine_T1000.json"; }
# the baselines' other form, grad of the vmapped query losses (the vmap rows before 2026-11-29; wrong
# through BatchNorm, right for the sine MLP) beside today's, each task's grad inside the vmap, in one
# run: targets.py counts the faster form for the sine targets
step_sine_gv() { run_step sine_gv 150 bench_sine_gv.txt sh -c "$BENCH --tasks 25 --providers \
  fastmeta_vg,compile,compile_gv,vmap_graph,vmap_graph_gv --json $LOG/bench_sine_gv_T25.json && $BENCH --tasks 1000 \
  --providers fastmeta_vg,compile,compile_gv --json $LOG/bench_sine_gv_T1000.json"; }
step_probe() { TAIL=32 run_step probe 120 probe.txt python benchmarks/gpu_probe.py; }
# T=1000 (kernel-bound) with the occupancy build and 64-thread blocks against the default; -o8-s0:
# the occupancy build with a task's working set in global memory (L1-cached), which no shared
# memory limit holds below eight blocks an SM (second order's 38 KB working set allows five);
# -t32: one warp a task (barriers that hold no other warp; more blocks an SM, each phase longer)
step_probe1000() { TAIL=14 run_step probe1000 70 probe1000.txt python benchmarks/gpu_probe.py --tasks 1000 \
  --backends cuda,cuda-o8,cuda-o8-s0,cuda-o8-t64,cuda-t64,cuda-t32,cuda-t32-s0,cuda-o8-t32-s0; }
# (T=1000, the kernel-bound case issue 4 still lacks: its warp stall reasons say what bounds it)
# (SourceCounters: the warp stall sampling and where it lands; without it if this ncu lacks it)
step_ncu() { TAIL=80 run_step ncu 75 ncu.txt sh -c "$NCU --section SourceCounters --section InstructionStats \
  python benchmarks/gpu_probe.py --ncu-target cuda,1000 || $NCU python benchmarks/gpu_probe.py --ncu-target cuda,1000"; }
# each convolution kernel alone at the conv workloads' layer shapes: cuDNN's grouped convolution
# against the Triton implicit GEMM in both reduction orders, with the float32 rate each reaches
# the CUDA MLP kernel (one thread block a task) against the batched torch ops at 128 to 1024 wide
step_widemlp() { TAIL=18 run_step widemlp 80 wide_mlp.txt python benchmarks/wide_mlp.py --device cuda --rounds 2; }
# ANIL (inner_params=head) on the Omniglot shape, T=32, S=5, against learn2learn's recipe, task by task
step_anil() { TAIL=18 run_step anil 90 anil.txt python benchmarks/anil.py --device cuda --tasks 32 --seconds 1; }
step_mamlpp() { TAIL=18 run_step mamlpp 120 mamlpp.txt python benchmarks/maml_plus_plus.py --device cuda --tasks 32 --seconds 1; }
step_mlpmamlpp() { TAIL=14 run_step mlpmamlpp 60 mlpmamlpp.txt python benchmarks/mlp_maml_plus_plus.py --device cuda --seconds 1; }
# the drop-in learner (fastmeta.MAML): on the sine MLP its forward on ops.mlp_forward (the C++ op with
# its backward and second-order product in one node each) against the module's own layers, the
# learn2learn-style loop and the naive loop, timed together; on Omniglot (T=32) its forward on
# BatchedMAML's program of one task against the module's call
step_dropin() { TAIL=24 run_step dropin 120 dropin.txt sh -c "$BENCH --tasks 25 --providers \
  loop,maml,maml-torch,maml_pertensor,metasgd --json $LOG/bench_dropin.json && $CONV --workload omniglot --reps 3 \
  --providers loop,maml,maml-torch --json $LOG/bench_dropin_omniglot.json"; }
step_calloverhead() { TAIL=24 run_step calloverhead 60 calloverhead.txt python benchmarks/call_overhead.py --device cuda --seconds 0.3; }
# the sine MLP with each activation on the CUDA kernel and on the batched ops (GELU and SiLU: their
# first GPU run); the models of the other lowered modules (GroupNorm conv4, Conv1d, LayerNorm)
step_activations() { TAIL=20 run_step activations 90 activations.txt python benchmarks/more_modules.py \
  --activations relu,tanh,sigmoid,gelu,gelu_tanh,silu --device cuda --seconds 0.5; }
step_moremodules() { TAIL=60 run_step moremodules 150 more_modules.txt python benchmarks/more_modules.py \
  --device cuda --seconds 0.5; }
# custom-forward models (learn2learn's sine model, an Omniglot CNN of custom blocks, a ResNet, MAML
# reference code's functional conv net with F.batch_norm, a MetaModule-style BatchNorm): traced against
# the whole-model vmap fallback, the same net as a Sequential and the loop
step_tracedforward() { TAIL=60 run_step tracedforward 180 traced_forward.txt python benchmarks/traced_forward.py \
  --device cuda --seconds 0.5; }
step_reptilesine() { TAIL=8 run_step reptilesine 60 reptilesine.txt python benchmarks/reptile.py --workload sine --device cuda --seconds 1; }
step_reptile() { TAIL=8 run_step reptile 60 reptile.txt python benchmarks/reptile.py --device cuda --tasks 32 --seconds 1; }
# the GPU machine's CPU (16 cores): auto's CPU choice between the fused kernel and the batched torch
# ops, measured so far on 2 cores only (RESULTS.md, "Few tasks of a wide MLP")
step_cpu_auto() { TAIL=32 run_step cpu_auto 90 cpu_auto.txt python benchmarks/wide_mlp.py --tables auto --rounds 1; }
step_convprobe() { TAIL=70 run_step convprobe 80 conv_probe.txt python benchmarks/conv_probe.py --reps 10; }
# the Triton conv-path kernels against their references on the device, before their timed rows
step_tritonconv() { TAIL=12 run_step tritonconv 90 tests_triton_conv.log python -m pytest -q -rfEs \
  -p no:cacheprovider --timeout=80 tests/test_triton.py -k "conv or bn_relu_pool"; }
# (the loop first, the row every other's error is measured against; fastmeta: auto, on CUDA
# fastmeta._C's convolution ops (cuDNN underneath, grouped or a call a task; their second order
# avoids PyTorch's per-task double backward) or the Triton ones, whichever times faster for each
# primitive and shape in the first call, and bn_relu_pool kernels; -torch: the batched torch ops;
# _rc: recompute=True)
step_omniglot() { TAIL=10 run_step omniglot 110 bench_omniglot.txt $CONV --workload omniglot --providers \
  loop,fastmeta_graph,fastmeta_graph-cuda+tf32x3,fastmeta_graph-triton,vmap,fastmeta,fastmeta-triton,fastmeta_graph_rc,vmap_gv \
  --json "$LOG/bench_omniglot.json"; }
# the convolutions with TF32x3 products (FASTMETA_CONV_PRECISION=tf32x3: three TF32 tensor-core
# products of each operand's high and low parts; float32 on the FMA units otherwise), on Triton (in
# registers) and under auto (each primitive and shape on the faster of Triton and cuDNN, whose
# fastmeta._C ops make the main and the cross products as separate TF32 calls; the cuDNN-only row
# is in the omniglot step): their time, and their meta-gradients against the float32 loop's (the
# loop runs first for that column); a provider's +tf32x3 suffix sets it for that row alone
step_omniglot_x3() { TAIL=8 run_step omniglot_x3 90 bench_omniglot_x3.txt $CONV --workload omniglot --providers \
  loop,fastmeta_graph+tf32x3,fastmeta_graph-triton+tf32x3,fastmeta+tf32x3 \
  --json "$LOG/bench_omniglot_x3.json"; }
step_miniimagenet_x3() { TAIL=8 run_step miniimagenet_x3 120 bench_miniimagenet_x3.txt $CONV --workload miniimagenet \
  --reps 3 --providers loop,vmap,fastmeta_graph_rc_ck@8+tf32x3,fastmeta_graph@8-cuda+tf32x3,fastmeta+tf32x3 \
  --json "$LOG/bench_miniimagenet_x3.json"; }
# fastmeta._C's convolution ops take, shape by shape, the faster of one grouped cuDNN call and one
# call a task (their autotune, on by default on CUDA: the rows of the omniglot and miniimagenet
# steps): here each form forced (FASTMETA_CONV_PER_TASK=0 grouped, as before the autotune; =1 a call
# a task) to weigh the choice, then the choices themselves with their timings
step_conv_pertask() { TAIL=40 run_step conv_pertask 110 bench_conv_pertask.txt sh -c \
  "FASTMETA_CONV_PER_TASK=0 $CONV --workload omniglot --providers fastmeta_graph,fastmeta && \
  FASTMETA_CONV_PER_TASK=1 $CONV --workload omniglot --providers fastmeta_graph,fastmeta && \
  FASTMETA_CONV_PER_TASK=0 $CONV --workload miniimagenet --providers fastmeta_vg_rc_ck && \
  FASTMETA_CONV_PER_TASK=1 $CONV --workload miniimagenet --providers fastmeta_vg_rc_ck && \
  FASTMETA_CONV_AUTOTUNE_LOG=1 $CONV --workload omniglot --providers fastmeta --reps 1 --max-seconds 1 2>&1 | \
  grep -o 'autotune.*' | sed 's/weight \\[[^]]*\\]//'"; }
# the same with cuDNN's algorithm search on (grouped convolutions of per-task weights, all providers)
step_omniglot_cudnnbench() { TAIL=8 run_step omniglot_cudnnbench 60 bench_omniglot_cudnnbench.txt $CONV \
  --workload omniglot --providers fastmeta,loop,vmap --cudnn-benchmark --json "$LOG/bench_omniglot_cudnnbench.json"; }
# (fastmeta_vg@N / fastmeta_graph@N: BatchedMAML(task_chunk=N), N tasks' graphs at a time; _rc:
# recompute=True, _ck: checkpoint_steps=True. For the memory target (peak <= 2x the loop's, ~1.03
# GB on the H200) the chunk is bounded by what passes through the first block at once: its
# convolution's output for 75 query images and that output's gradient, ~135 MB a task in float32,
# whatever the switches (RESULTS.md, "CPU peak memory, every allocation counted"); so chunks of 8,
# graphed first. The baselines come second and third so that a step cut short still has them;
# then chunks of 4 with recompute alone (no step recomputed; on the CPU two tasks at once with
# recompute peak at 581 MB, so ~1.2 GB for four); all tasks at once (fastmeta) gives the speed
# without the memory bound)
step_miniimagenet() { TAIL=10 run_step miniimagenet 150 bench_miniimagenet.txt $CONV --workload miniimagenet \
  --providers fastmeta_graph_rc_ck@8,loop,vmap,fastmeta_graph_rc@4,fastmeta_graph_rc_ck@8-cuda+tf32x3,fastmeta_graph_ck@8,fastmeta_vg_rc_ck@8,fastmeta,fastmeta_vg_rc_ck \
  --json "$LOG/bench_miniimagenet.json"; }
# mini-ImageNet with every task at once on each convolution backend (the memory target aside)
step_miniimagenet_all() { TAIL=8 run_step miniimagenet_all 90 bench_miniimagenet_all.txt $CONV --workload miniimagenet \
  --reps 3 --providers fastmeta-triton,fastmeta,fastmeta-torch --json "$LOG/bench_miniimagenet_all.json"; }
# each parameter's float32 meta-gradient error against the float64 loop, per backend (Omniglot T=4,
# as tests/test_gpu.py::test_omniglot_on_gpu, which sat at its 1e-4 bound)
step_precision() { TAIL=50 run_step precision 90 precision.txt python benchmarks/gpu_precision.py --workload omniglot \
  --tasks 4 --providers loop,fastmeta,fastmeta-torch,fastmeta-triton; }
# where the conv path's GPU time goes (hot kernels by their own device time), torch ops and cuda ops
PROF="python -m fastmeta.profile --workload omniglot --order second --iterations 3 --trace ''"
# mini-ImageNet (T=8) one task at a time and all at once: where the chunked step's time goes
MPROF="python -m fastmeta.profile --workload miniimagenet --tasks 8 --order second --iterations 2 --trace ''"
step_miniprof() { TAIL=50 run_step miniprof 90 profile_miniimagenet.txt sh -c "$MPROF --provider fastmeta@1 && \
  $MPROF --provider fastmeta"; }
step_convprof() { TAIL=50 run_step convprof 90 profile_conv.txt sh -c "$PROF --provider fastmeta-torch && \
  $PROF --provider fastmeta"; }
step_tritontests() { TAIL=15 run_step tritontests 120 tests_triton.log python -m pytest -q -rfEs -p no:cacheprovider \
  --timeout=100 tests/test_triton.py tests/test_ops.py -k "not conv and not bn_relu_pool"; }
step_ops() { TAIL=45 run_step ops 45 bench_ops.txt python -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py \
  --benchmark-only --benchmark-json "$LOG/bench_ops.json" --benchmark-columns=median,iqr,rounds; }
step_convcompile() { TAIL=8 run_step convcompile 200 bench_conv_compile.txt $CONV --workload omniglot \
  --providers loop,fastmeta_graph,fastmeta_graph+tf32x3,compile --json "$LOG/bench_conv_compile.json"; }
# the float32 meta-gradients against the loop run in float64 (the exact answer): on the CPU the
# loop's own is 1e-1 from it for mini-ImageNet (S=5) and ~1e-5 for Omniglot (RESULTS.md), so a row's
# max rel err against the float32 loop is partly the loop's own rounding
step_ref64() { TAIL=14 run_step ref64 120 bench_ref64.txt $CONV --workload omniglot,miniimagenet --reps 1 \
  --providers loop,fastmeta,fastmeta-torch,fastmeta_graph@1 --reference float64 --json "$LOG/bench_ref64.json"; }
for s in $STEPS; do
  if declare -F "step_$s" > /dev/null; then "step_$s"; else echo "== $s: unknown step" | tee -a "$SUMMARY"; fi
done
# the issues' targets against this run's bench JSONs (each ratio within one file, i.e. one run)
{ echo "== targets"; python benchmarks/targets.py "$LOG"; } >> "$SUMMARY" 2>&1
echo "== done (t=$(( $(date +%s) - start ))s)" | tee -a "$SUMMARY"
