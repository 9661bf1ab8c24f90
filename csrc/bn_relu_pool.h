// bn_relu_pool's host/device pieces, shared by its CPU (csrc/bn_relu_pool.cpp) and CUDA
// (csrc/cuda/bn_relu_pool.cu) kernels: the plane layout and the choice of MaxPool2d(2) in one 2x2
// window. (The host-only sizes, checks and allocations are in csrc/common.h.)
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTMETA_HOST_DEVICE __host__ __device__
#else
#define FASTMETA_HOST_DEVICE
#endif

namespace fastmeta {

// The first element, in planes, of plane (t, n, c) of a [T, N, C, H, W] tensor with contiguous
// H x W planes: task-major ((t, n, c) order) or task-inner ((n, t, c), as batched_conv2d returns it).
FASTMETA_HOST_DEVICE inline int64_t bn_relu_pool_plane(bool task_inner, int64_t T, int64_t N, int64_t C, int64_t t,
                                                     int64_t n, int64_t c) {
  return (task_inner ? n * T + t : t * N + n) * C + c;
}

// The first maximum of the window (z0 z1 / z2 z3) in row-major order, as max_pool2d picks it; its
// position 0..3 goes to k. (A NaN here means the whole channel is NaN, its statistics being NaN:
// every window is then NaN and its last position wins, as in max_pool2d, which "!(z <= best)" also
// gives.)
template <typename T>
FASTMETA_HOST_DEVICE inline T window_max(T z0, T z1, T z2, T z3, int& k) {
  bool u = !(z1 <= z0);
  T best = u ? z1 : z0;
  k = u ? 1 : 0;
  u = !(z2 <= best);
  best = u ? z2 : best;
  k = u ? 2 : k;
  u = !(z3 <= best);
  best = u ? z3 : best;
  k = u ? 3 : k;
  return best;
}

}  // namespace fastmeta
