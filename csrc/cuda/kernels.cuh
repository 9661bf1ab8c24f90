// Launchers of fastmeta's CUDA kernels. Plain CUDA (no torch headers), so that the .cu files can be
// compile-checked with nvcc alone; csrc/cuda/bindings_cuda.cpp wraps them for at::Tensor.
#pragma once
#include <cstdint>

#ifndef FASTMETA_CUDA_EMULATE
#include <cuda_runtime.h>
// Dynamic shared memory and launches through macros, so that tests/cuda_emu/cuda_emu.h can run the
// same kernels on the CPU (threads as fibers) where there is no GPU.
#define FASTMETA_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#define FASTMETA_LAUNCH(kernel, grid, block, shmem, stream, ...) \
  (kernel<<<(grid), (block), (shmem), (stream)>>>(__VA_ARGS__), cudaGetLastError())
#endif

namespace fastmeta {
namespace cuda {

// One tensor of a multi-tensor update: out[j] = p[j % p_period] - lr[j % lr_period] * g[j], j < n.
// lr == nullptr: the rate is lr_value (a scalar known on the host).
template <typename T>
struct UpdateTensor {
  T* out;
  const T* p;
  const T* g;
  const T* lr;
  T lr_value;
  int64_t n, p_period, lr_period;
};

// One unit of work of the update kernel: elements [start, start + kChunk) of tensor `tensor`.
struct UpdateChunk {
  int32_t tensor;
  int64_t start;
};

constexpr int64_t kChunk = 65536;

// FASTMETA_CONV_PRECISION=tf32x3's operands (tf32_split.cu): src [outer, row] (contiguous float32)
// -> dst [outer, parts, row] (parts 1 or 2), dst[o][p] = part p of src[o], part p the low one where
// bit p of `which` is set (hi: the nearest TF32 value, lo: the exact remainder); at most max_blocks
// blocks, which stride over the elements; outer * row < 2^32.
cudaError_t launch_tf32_split_stack(const float* src, float* dst, int64_t outer, int64_t row, int parts, int which,
                                    int max_blocks, cudaStream_t stream);

// All tensors in one launch: `tensors` and `chunks` are device arrays (see inner_update.cu).
template <typename T>
cudaError_t launch_inner_update(const UpdateTensor<T>* tensors, const UpdateChunk* chunks, int64_t num_chunks,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta

namespace fastmeta {
namespace cuda {

// The fused MLP inner loop (csrc/cuda/mlp_inner_loop.cu): one thread block per task.
// It reads the meta-parameters and rates layer by layer (theta0_w/_b, lr_w/_b) and writes flat
// parameter vectors (dtheta, dlr): layer l (0-based) with W at off_w[l] ([dims[l+1], dims[l]]) and
// b at off_b[l]. Inside, a
// task's parameter-sized vectors use a padded layout: W's rows at stride ldw[l] (dims[l] made odd,
// so that the rows a warp reads at once fall in different shared-memory banks) from pw[l], b at pb[l].
constexpr int kMaxLayers = 8;
// The most inner steps of a call with step weights (MLPArgs::step_w, held in the arguments).
constexpr int kMaxWeightedSteps = 64;

// Where a task's slots live (MLPArgs::placement). The working set is what every phase touches
// (current parameters, gradient, the reverse pass's vector, one pass's activations); the history
// is what second order keeps of each step for its reverse pass (parameters, activations, and the
// gradients when the rates are learned).
enum MLPPlacement : int {
  kAllGlobal = 0,   // working set and history in the global scratch
  kWorkShared = 1,  // working set in shared memory, history in the global scratch
  kAllShared = 2,   // both in shared memory
};

template <typename T>
struct MLPArgs {
  const T* xs; const T* ys_f; const int64_t* ys_l;   // [T, K, I]; [T, K, D] (mse) or [T, K] (ce)
  const T* xq; const T* yq_f; const int64_t* yq_l;   // [T, Q, I]; [T, Q, D] or [T, Q]
  const T* theta0_w[kMaxLayers];                      // meta-parameters: W_l [d_{l+1}, d_l], row-major
  const T* theta0_b[kMaxLayers];                      //   and b_l [d_{l+1}], one tensor each
  const T* lr_w[kMaxLayers];                          // per-parameter rates in the same shapes (with
  const T* lr_b[kMaxLayers];                          //   lr_per_step, [steps, *shape]: step s's at s *
                                                      //   the layer's numel), or lr_w[0] == nullptr
  bool lr_per_step;                                   //   (the scalar lr)
  T lr;                                               // scalar rate when lrs == nullptr
  int weighted_steps;                                 // 0 (the query loss at theta_S only), or steps:
  T step_w[kMaxWeightedSteps];                        //   the task's loss is sum_s step_w[s-1] L_query(theta_s)
  T slope;                                            // leaky relu slope
  T* scratch;                                         // [T, scratch_per_task]
  int64_t scratch_per_task;
  T* loss_out;                                        // [T]
  T* dtheta;                                          // [T, P]
  T* dlr;                                             // [T, P] ([T, steps, P] with lr_per_step) or nullptr
  T* adapt_out;                                       // [T, P] or nullptr: the inner loop alone (first
                                                      //   order, no rate gradient, no step weights):
                                                      //   theta_S here, loss_out the loss at theta_0
  int64_t num_tasks, K, Q, steps, P;
  int L, loss;                                        // loss: 0 mse, 1 cross-entropy
  bool first_order;
  bool lr_grad;                                       // dlr wanted (set before mlp_sizes)
  int placement;                                      // MLPPlacement
  int threads;                                        // per block
  int occupancy;                                      // 0, or 8: the kernel built for 8 blocks an SM (<= 128 threads)
  int dims[kMaxLayers + 1];
  int acts[kMaxLayers];
  int64_t off_w[kMaxLayers], off_b[kMaxLayers];      // flat layout
  int ldw[kMaxLayers];                                // padded layout: row stride of W
  int64_t pw[kMaxLayers], pb[kMaxLayers], Pp;         // padded offsets of W, b; padded size
  int act_sections;                                   // 4 (z, a, da, dz) or 2 (see mlp_sizes)
  int64_t inputs;                                     // the task's inputs and MSE targets kept in its
                                                      //   working set (elements), or 0 (see mlp_sizes)
  int64_t work, hist;                                 // elements per task (see mlp_sizes)
};

// Flat and padded offsets of each layer's W and b, P and Pp, from a.L and a.dims (the binding and
// tests/cuda_emu share it).
template <typename T>
inline void mlp_layout(MLPArgs<T>& a) {
  int64_t off = 0, poff = 0;
  for (int l = 0; l < a.L; ++l) {
    const int din = a.dims[l], dout = a.dims[l + 1];
    a.ldw[l] = din % 2 == 0 ? din + 1 : din;
    a.off_w[l] = off;
    a.pw[l] = poff;
    off += static_cast<int64_t>(dout) * din;
    poff += static_cast<int64_t>(dout) * a.ldw[l];
    a.off_b[l] = off;
    a.pb[l] = poff;
    off += dout;
    poff += dout;
  }
  a.P = off;
  a.Pp = poff;
}

// The most elements of a task's inputs and MSE targets (support and query) that its working set
// takes in: every pass reads them (the first layer's product and weight gradient, the loss), and
// from global memory each read waits its latency on the phase's critical path.
constexpr int64_t kMaxStagedInputs = 1024;

// Whether the kernel keeps each step's parameters (and activations, gradients) for a reverse pass:
// second order, and first order where query losses after earlier steps count (weighted_steps).
template <typename T>
__host__ __device__ inline bool mlp_keeps_history(const MLPArgs<T>& a) {
  return !a.first_order || a.weighted_steps > 0;
}
// a.act_sections, a.inputs, a.work and a.hist from the layout, acts, slope, loss, K, Q, steps,
// first_order, weighted_steps and lr_grad (first order with weighted steps sized as second order,
// with the query gradients of the steps before the last in the history too). The working set
// holds three parameter-sized vectors (two in first
// order: theta_s and theta_{s+1} in turn, the query gradient going straight to the output), one
// pass's activations (max(K, Q) rows), in second order the R-operator's buffers, and last the
// task's inputs and MSE targets where they are small (kMaxStagedInputs); second order's history
// keeps each step's parameters, activations and, for lr_grad, gradients. A pass's activations are z, a, da, dz of
// every layer, or only a and dz where every activation is the identity, a ReLU or a leaky ReLU of
// slope >= 0: there z > 0 exactly where a > 0 (all the derivative needs) and the second derivative
// is zero (da is never read again), so z shares a's storage and da dz's.
template <typename T>
inline void mlp_sizes(MLPArgs<T>& a) {
  int64_t sumd = 0;
  int dmax = 0;
  bool slim = true;
  for (int l = 0; l < a.L; ++l) {
    sumd += a.dims[l + 1];
    slim = slim && (a.acts[l] == 0 || a.acts[l] == 1 || (a.acts[l] == 2 && a.slope >= T(0)));
  }
  for (int l = 0; l <= a.L; ++l) dmax = dmax > a.dims[l] ? dmax : a.dims[l];
  a.act_sections = slim ? 2 : 4;
  const int64_t NQ = a.K > a.Q ? a.K : a.Q;
  const int64_t in = (a.K + a.Q) * (a.dims[0] + (a.loss == 0 ? a.dims[a.L] : 0));
  a.inputs = in <= kMaxStagedInputs ? in : 0;
  const bool hist = mlp_keeps_history(a);
  a.work = (hist ? 3 : 2) * a.Pp + a.act_sections * NQ * sumd + (hist ? 2 * a.K * sumd + 2 * a.K * dmax : 0) +
           a.inputs;
  a.hist = hist ? a.steps * ((a.lr_grad ? 2 : 1) * a.Pp + a.act_sections * a.K * sumd) : 0;
  if (a.weighted_steps > 0 && a.steps > 1) a.hist += (a.steps - 1) * a.Pp;  // the step losses' gradients
}

// Dynamic shared memory of one block for a placement: a reduction buffer of one element a thread,
// then the slots that placement keeps in shared memory.
template <typename T>
inline size_t mlp_smem_bytes(const MLPArgs<T>& a, int placement) {
  int64_t n = a.threads;
  if (placement >= kWorkShared) n += a.work;
  if (placement == kAllShared) n += a.hist;
  return static_cast<size_t>(n) * sizeof(T);
}

// Global scratch elements one task needs for a placement.
template <typename T>
inline int64_t mlp_scratch_per_task(const MLPArgs<T>& a, int placement) {
  return (placement == kAllGlobal ? a.work : 0) + (placement == kAllShared ? 0 : a.hist);
}

// The placement of a launch. forced (0, 1, 2; -1: choose) is taken where its shared memory fits a
// block (else the next lower one). Choosing: everything in shared memory when one wave of blocks
// that large holds all tasks, else the working set in shared memory where it fits, else global.
template <typename T>
inline int mlp_choose_placement(const MLPArgs<T>& a, int forced, int64_t optin_limit, int64_t smem_per_sm, int sms,
                                int threads_per_sm) {
  auto fits = [&](int p) { return static_cast<int64_t>(mlp_smem_bytes(a, p)) <= optin_limit; };
  if (forced >= 0) {
    int p = forced > kAllShared ? kAllShared : forced;
    while (p > kAllGlobal && !fits(p)) --p;
    return p;
  }
  if (fits(kAllShared)) {
    const int64_t per_block = static_cast<int64_t>(mlp_smem_bytes(a, kAllShared)) + 1024;  // 1 KB runtime reserve
    int64_t blocks = smem_per_sm / per_block;
    if (blocks > threads_per_sm / a.threads) blocks = threads_per_sm / a.threads;
    if (a.num_tasks <= blocks * sms) return kAllShared;
  }
  return fits(kWorkShared) ? kWorkShared : kAllGlobal;
}

// Lets the kernel for T use up to `bytes` of dynamic shared memory on the current device (above
// 48 KB a kernel must opt in). The caller does it once a device, before any launch that needs it
// and outside stream capture; launch_mlp_inner_loop itself makes no such call.
template <typename T>
cudaError_t mlp_allow_smem(int bytes);

// The most threads a block the kernel (the occupancy build: MLPArgs::occupancy 8) launches with,
// for elements of elem_bytes (4: float, 8: double).
int mlp_max_threads(int occupancy, int elem_bytes);

template <typename T>
cudaError_t launch_mlp_inner_loop(const MLPArgs<T>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta

namespace fastmeta {
namespace cuda {

// BatchNorm (batch statistics of each task and channel) -> ReLU -> MaxPool2d(2), fused
// (csrc/cuda/bn_relu_pool.cu; the contract of csrc/bn_relu_pool.cpp): `slices` thread blocks per
// (task, channel) plane set of x [T, N, C, H, W], each over a range of its images (contiguous H x W
// planes; the planes task-major, or task-inner as batched_conv2d returns them: y, idx, gy and dx in
// x's layout). Each op is two kernels: the slices' sums, then the outputs from their totals.
constexpr int kBNReLUPoolThreads = 256;  // a power of two (the block reductions halve it)

template <typename T>
struct BNReLUPoolArgs {
  int64_t tasks, N, C, H, W, Ho, Wo;
  bool task_inner;     // planes ordered (n, t, c) instead of (t, n, c)
  int64_t slices;      // blocks a (task, channel), 1..N (bn_relu_pool_slices)
  double* partial;     // scratch of [T * C * slices * 5] doubles: the slices' sums
  const T* x;
  const T* weight;     // [T, C]
  const T* bias;       // [T, C] (forward)
  double eps;          // (forward)
  T* y;                // [T, N, C, Ho, Wo] (x's layout): forward's output; backward reads it
  uint8_t* idx;        // same shape: the window position 0..3 of each maximum
  T* mean;             // [T, C]
  T* invstd;           // [T, C]
  const T* gy;         // backward: the gradient of y
  T* dx;               // backward: [T, N, C, H, W] (x's layout)
  T* dweight;          // backward: [T, C]
  T* dbias;            // backward: [T, C]
  const T* ggx;        // double backward: the cotangent of dx (x's layout), or null (zero)
  const T* ggw;        // double backward: the cotangents of dweight and dbias [T, C]
  const T* ggb;
  T* g_gy;             // double backward: [T, N, C, Ho, Wo] (x's layout)
  T* g_x;              // double backward: [T, N, C, H, W] (x's layout)
  T* g_w;              // double backward: [T, C]
};

// Blocks a (task, channel) for a GPU of `sms` multiprocessors: enough for about four blocks an SM
// in all, each over at least 4096 elements, at most one an image.
inline int64_t bn_relu_pool_slices(int64_t tasks, int64_t C, int64_t N, int64_t plane, int64_t sms) {
  const int64_t sets = tasks * C, want = 4 * sms;
  if (sets <= 0 || sets >= want) return 1;
  int64_t s = (want + sets - 1) / sets;
  const int64_t most = N * plane / 4096;
  if (s > most) s = most;
  if (s > N) s = N;
  return s < 1 ? 1 : s;
}

template <typename T>
cudaError_t launch_bn_relu_pool(const BNReLUPoolArgs<T>& a, cudaStream_t stream);

template <typename T>
cudaError_t launch_bn_relu_pool_backward(const BNReLUPoolArgs<T>& a, cudaStream_t stream);

template <typename T>
cudaError_t launch_bn_relu_pool_double_backward(const BNReLUPoolArgs<T>& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta
