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

// All tensors in one launch: `tensors` and `chunks` are device arrays (see inner_update.cu).
template <typename T>
cudaError_t launch_inner_update(const UpdateTensor<T>* tensors, const UpdateChunk* chunks, int64_t num_chunks,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta

namespace fastmeta {
namespace cuda {

// The fused MLP inner loop (csrc/cuda/mlp_inner_loop.cu): one thread block per task.
// Layer l (0-based) has W at theta + off_w[l] ([dims[l+1], dims[l]]) and b at theta + off_b[l].
constexpr int kMaxLayers = 8;

template <typename T>
struct MLPArgs {
  const T* xs; const T* ys_f; const int64_t* ys_l;   // [T, K, I]; [T, K, D] (mse) or [T, K] (ce)
  const T* xq; const T* yq_f; const int64_t* yq_l;   // [T, Q, I]; [T, Q, D] or [T, Q]
  const T* theta0;                                    // [P] meta-parameters, flat
  const T* lrs;                                       // [P] per-parameter rates or nullptr
  T lr;                                               // scalar rate when lrs == nullptr
  T slope;                                            // leaky relu slope
  T* scratch;                                         // [T, scratch_per_task]
  int64_t scratch_per_task;
  T* loss_out;                                        // [T]
  T* dtheta;                                          // [T, P]
  T* dlr;                                             // [T, P] or nullptr
  int64_t num_tasks, K, Q, steps, P;
  int L, loss;                                        // loss: 0 mse, 1 cross-entropy
  bool first_order;
  bool smem;                                          // workspace in shared memory (scratch unused)
  int dims[kMaxLayers + 1];
  int acts[kMaxLayers];
  int64_t off_w[kMaxLayers], off_b[kMaxLayers];
};

// Offsets of each layer's W and b in the flat parameter vector ([W_1, b_1, W_2, ...], each
// row-major) and their total P, from a.L and a.dims (the binding and tests/cuda_emu share it).
template <typename T>
inline void mlp_layout(MLPArgs<T>& a) {
  int64_t off = 0;
  for (int l = 0; l < a.L; ++l) {
    a.off_w[l] = off;
    off += static_cast<int64_t>(a.dims[l + 1]) * a.dims[l];
    a.off_b[l] = off;
    off += a.dims[l + 1];
  }
  a.P = off;
}

// Workspace elements one task needs (the caller allocates num_tasks times this, or none when the
// workspace goes to shared memory: see mlp_smem_bytes).
int64_t mlp_scratch_per_task(const int* dims, int L, int64_t K, int64_t Q, int64_t steps, int64_t P,
                             bool first_order, bool keep_grads);

// Dynamic shared memory of one block: its reduction buffer, and with smem its whole workspace.
template <typename T>
size_t mlp_smem_bytes(int64_t scratch_per_task, bool smem);

template <typename T>
cudaError_t launch_mlp_inner_loop(const MLPArgs<T>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta
