// Multi-tensor inner-loop update on CUDA (multi_tensor_apply style): theta'_i = theta_i - lr_i g_i
// for every tensor of every task in ONE launch. The host splits each tensor into chunks of
// kChunk elements and passes a device table of (tensor, chunk start); each block takes one chunk.
// Rates are read from device memory (Meta-SGD tensors, a learnable scalar), so there is no host
// sync; a plain float rate travels in the table. Broadcast operands (a meta-parameter at step 0,
// per-parameter rates shared by all tasks) are read periodically, never copied.
// nvcc contracts p - lr * g into an FMA: results match the reference to rounding, not bit for bit.
#include "kernels.cuh"

namespace fastmeta {
namespace cuda {

template <typename T>
__global__ void inner_update_kernel(const UpdateTensor<T>* __restrict__ tensors,
                                    const UpdateChunk* __restrict__ chunks) {
  const UpdateChunk c = chunks[blockIdx.x];
  const UpdateTensor<T> t = tensors[c.tensor];
  const int64_t end = min(c.start + kChunk, t.n);
  for (int64_t j = c.start + threadIdx.x; j < end; j += blockDim.x) {
    const T p = t.p_period == t.n ? t.p[j] : t.p[j % t.p_period];
    const T rate = t.lr == nullptr ? t.lr_value : (t.lr_period == 1 ? t.lr[0] : t.lr[j % t.lr_period]);
    t.out[j] = p - rate * t.g[j];
  }
}

template <typename T>
cudaError_t launch_inner_update(const UpdateTensor<T>* tensors, const UpdateChunk* chunks, int64_t num_chunks,
                                cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  // grids are limited to 2^31 - 1 blocks in x: more chunks than that is 2^47 elements
  return FASTMETA_LAUNCH(inner_update_kernel<T>, static_cast<unsigned>(num_chunks), 256, 0, stream, tensors, chunks);
}

template cudaError_t launch_inner_update<float>(const UpdateTensor<float>*, const UpdateChunk*, int64_t,
                                                cudaStream_t);
template cudaError_t launch_inner_update<double>(const UpdateTensor<double>*, const UpdateChunk*, int64_t,
                                                 cudaStream_t);

}  // namespace cuda
}  // namespace fastmeta
