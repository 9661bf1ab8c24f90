// Launchers of fastmeta's CUDA kernels. Plain CUDA (no torch headers), so that the .cu files can be
// compile-checked with nvcc alone; csrc/cuda/bindings_cuda.cpp wraps them for at::Tensor.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

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
