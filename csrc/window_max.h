// The choice of MaxPool2d(2) in one 2x2 window, shared by bn_relu_pool's CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define FASTMETA_HOST_DEVICE __host__ __device__
#else
#define FASTMETA_HOST_DEVICE
#endif

namespace fastmeta {

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
