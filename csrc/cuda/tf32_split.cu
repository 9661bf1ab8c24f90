// The TF32 parts of a float32 tensor, stacked (FASTMETA_CONV_PRECISION=tf32x3, csrc/batched_conv2d.cpp):
// src seen as [outer, R] (R = D x inner, the stacked dimension and those after it) becomes dst
// [outer, parts, R], dst[o][p] part p of src[o] (hi, x rounded to the nearest TF32 value, ties away
// from zero; or lo = x - hi, exact, where bit p of `which` is set). One read and `parts` writes an
// element, in one pass.
#include "kernels.cuh"

#ifndef FASTMETA_CUDA_EMULATE
#define FASTMETA_BITS_OF(x) __float_as_uint(x)
#define FASTMETA_FLOAT_OF(u) __uint_as_float(u)
#endif

namespace fastmeta {
namespace cuda {
namespace {

__global__ void tf32_split_stack_kernel(const float* __restrict__ src, float* __restrict__ dst, uint32_t n,
                                        uint32_t row, uint32_t parts, uint32_t which) {
  const uint32_t step = gridDim.x * blockDim.x;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    const uint32_t o = i / row, r = i - o * row;
    const float x = src[i];
    const float hi = FASTMETA_FLOAT_OF((FASTMETA_BITS_OF(x) + 0x1000u) & ~0x1FFFu);
    const float lo = x - hi;
    float* d = dst + (static_cast<uint64_t>(o) * parts * row + r);
    for (uint32_t p = 0; p < parts; ++p) d[static_cast<uint64_t>(p) * row] = (which >> p) & 1u ? lo : hi;
  }
}

}  // namespace

cudaError_t launch_tf32_split_stack(const float* src, float* dst, int64_t outer, int64_t row, int parts, int which,
                                    int max_blocks, cudaStream_t stream) {
  const int64_t n = outer * row;
  if (n == 0) return cudaSuccess;
  if (n > 0xFFFFFFFFll || row <= 0 || max_blocks <= 0 || parts < 1 || parts > 2) return cudaErrorInvalidValue;
  const int threads = 256;
  const int64_t want = (n + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < max_blocks ? want : max_blocks);
  return FASTMETA_LAUNCH(tf32_split_stack_kernel, blocks, threads, 0, stream, src, dst, static_cast<uint32_t>(n),
                         static_cast<uint32_t>(row), static_cast<uint32_t>(parts), static_cast<uint32_t>(which));
}

}  // namespace cuda
}  // namespace fastmeta
