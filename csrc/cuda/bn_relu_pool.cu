// fastmeta::bn_relu_pool on CUDA: per-task BatchNorm (batch statistics) -> ReLU -> MaxPool2d(2), its
// backward and its double backward, with the contract of the CPU kernel (csrc/bn_relu_pool.cpp): statistics and the
// backward's sums accumulate in double; idx is the row-major position (0..3) of each window's
// first maximum, as max_pool2d picks it; g_z = gy at that position where y > 0, else 0;
// dbias = sum g_z, dweight = sum g_z xhat, dx = w invstd (g_z - dbias / M - xhat dweight / M).
//
// One block per (task, channel): the forward reads the channel's planes three times (mean, the
// variance about it, then normalize + ReLU + pool) and writes the pooled output and a one-byte
// index; the backward reads the pooled gradient and x twice (the two sums, then dx, each input
// element finding its own window), and writes dx once. Consecutive threads take consecutive
// elements of a plane (coalesced). Block reductions go through shared memory. x's planes may be
// task-major or task-inner (plane_of); the outputs follow x's layout.
#include "../bn_relu_pool.h"
#include "kernels.cuh"

namespace fastmeta {
namespace cuda {
namespace {

// The block's total of one double per thread, in every thread (red: blockDim.x doubles of shared
// memory; blockDim.x a power of two). Ends with a barrier, so red can be reused at once.
__device__ double block_sum(double v, double* red) {
  const unsigned i = threadIdx.x;
  red[i] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (i < s) red[i] += red[i + s];
    __syncthreads();
  }
  const double total = red[0];
  __syncthreads();
  return total;
}

// The first element, in planes, of plane (t, n, c) in x's layout.
template <typename T>
__device__ __forceinline__ int64_t plane_of(const BNReLUPoolArgs<T>& a, int64_t t, int64_t n, int64_t c) {
  return bn_relu_pool_plane(a.task_inner, a.tasks, a.N, a.C, t, n, c);
}

// A thread's position (n, h, w) in an N x H x W box that it walks in row-major order, blockDim.x
// elements a step: the start is divided out once, each step adds the stride's digits with at most
// one carry a digit (dh < H and dw < W), so no loop pays a 64-bit division an element. The
// rows and columns fit int (checked by the host, csrc/cuda/bindings_cuda.cpp).
struct Walk {
  int64_t n;
  int h, w;
  int64_t dn;
  int dh, dw, H, W;
  __device__ Walk(int64_t start, int64_t stride, int H_, int W_) : H(H_), W(W_) {
    const int64_t box = static_cast<int64_t>(H_) * W_;
    if (box == 0) {  // an empty box (no pooling windows in a single row or column): no steps
      n = INT64_MAX;
      h = w = dh = dw = 0;
      dn = 0;
      return;
    }
    n = start / box;
    h = static_cast<int>(start % box / W_);
    w = static_cast<int>(start % W_);
    dn = stride / box;
    dh = static_cast<int>(stride % box / W_);
    dw = static_cast<int>(stride % W_);
  }
  __device__ __forceinline__ void next() {
    w += dw;
    if (w >= W) { w -= W; ++h; }
    h += dh;
    if (h >= H) { h -= H; ++n; }
    n += dn;
  }
};

template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_kernel(BNReLUPoolArgs<T> a) {
  FASTMETA_DYNAMIC_SMEM(double, red);
  const int64_t tc = blockIdx.x, t = tc / a.C, c = tc % a.C;
  const int64_t plane = a.H * a.W, M = a.N * plane, out_plane = a.Ho * a.Wo;
  auto in = [&](int64_t n) { return a.x + plane_of(a, t, n, c) * plane; };
  double s = 0;
  for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < a.N; p.next())
    s += static_cast<double>(in(p.n)[p.h * a.W + p.w]);
  const double mean = block_sum(s, red) / static_cast<double>(M);
  double q = 0;
  for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < a.N; p.next()) {
    const double d = static_cast<double>(in(p.n)[p.h * a.W + p.w]) - mean;
    q += d * d;
  }
  const double invstd = 1.0 / sqrt(block_sum(q, red) / static_cast<double>(M) + a.eps);
  if (threadIdx.x == 0) {
    a.mean[tc] = static_cast<T>(mean);
    a.invstd[tc] = static_cast<T>(invstd);
  }
  const double w = static_cast<double>(a.weight[tc]);
  const T scale = static_cast<T>(w * invstd);
  const T shift = static_cast<T>(static_cast<double>(a.bias[tc]) - mean * w * invstd);
  for (Walk o(threadIdx.x, blockDim.x, a.Ho, a.Wo); o.n < a.N; o.next()) {
    const T* p = in(o.n) + 2 * o.h * a.W + 2 * o.w;
    int k;
    const T best = window_max<T>(p[0] * scale + shift, p[1] * scale + shift, p[a.W] * scale + shift,
                                 p[a.W + 1] * scale + shift, k);
    const int64_t out = plane_of(a, t, o.n, c) * out_plane + o.h * a.Wo + o.w;
    a.y[out] = !(best <= T(0)) ? best : T(0);
    a.idx[out] = static_cast<uint8_t>(k);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_backward_kernel(BNReLUPoolArgs<T> a) {
  FASTMETA_DYNAMIC_SMEM(double, red);
  const int64_t tc = blockIdx.x, t = tc / a.C, c = tc % a.C;
  const int64_t plane = a.H * a.W, M = a.N * plane, out_plane = a.Ho * a.Wo;
  const double mean = static_cast<double>(a.mean[tc]), invstd = static_cast<double>(a.invstd[tc]);
  // sums over the window maxima that pass the ReLU (g_z is zero elsewhere)
  double sg = 0, sgx = 0;
  for (Walk o(threadIdx.x, blockDim.x, a.Ho, a.Wo); o.n < a.N; o.next()) {
    const int64_t i = o.h, j = o.w, pl = plane_of(a, t, o.n, c), out = pl * out_plane + i * a.Wo + j;
    if (!(a.y[out] > T(0))) continue;
    const int k = a.idx[out];
    const T* p = a.x + pl * plane + (2 * i + (k >> 1)) * a.W + 2 * j + (k & 1);
    const double g = static_cast<double>(a.gy[out]);
    sg += g;
    sgx += g * (static_cast<double>(*p) - mean);
  }
  const double sum_g = block_sum(sg, red);
  const double sum_gx = block_sum(sgx, red) * invstd;
  if (threadIdx.x == 0) {
    a.dbias[tc] = static_cast<T>(sum_g);
    a.dweight[tc] = static_cast<T>(sum_gx);
  }
  const double wi = static_cast<double>(a.weight[tc]) * invstd;
  const T slope = static_cast<T>(-wi * invstd * sum_gx / static_cast<double>(M));  // per unit of (x - mean)
  const T c0 = static_cast<T>(-wi * sum_g / static_cast<double>(M));
  const T m = static_cast<T>(mean), wiT = static_cast<T>(wi);
  for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < a.N; p.next()) {
    const int h = p.h, w = p.w;
    const int64_t base = plane_of(a, t, p.n, c), rest = static_cast<int64_t>(h) * a.W + w;
    T v = c0 + slope * (a.x[base * plane + rest] - m);
    if (h < 2 * a.Ho && w < 2 * a.Wo) {  // inside a window: add w invstd g_z where it took the maximum
      const int64_t out = base * out_plane + (h >> 1) * a.Wo + (w >> 1);
      if (a.idx[out] == ((h & 1) << 1 | (w & 1)) && a.y[out] > T(0)) v += wiT * a.gy[out];
    }
    a.dx[base * plane + rest] = v;
  }
}

// The double backward (the formulas at the top of csrc/bn_relu_pool.cpp): one pass for the five
// sums (S1, S2 over the elements, A, B, S3 over the windows), one over the elements for g_x (each
// element finding its own window) and one over the windows for g_gy.
template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_double_backward_kernel(BNReLUPoolArgs<T> a) {
  FASTMETA_DYNAMIC_SMEM(double, red);
  const int64_t tc = blockIdx.x, t = tc / a.C, c = tc % a.C;
  const int64_t plane = a.H * a.W, M = a.N * plane, out_plane = a.Ho * a.Wo;
  const double Md = static_cast<double>(M);
  const double mean = static_cast<double>(a.mean[tc]), s = static_cast<double>(a.invstd[tc]);
  const double wv = static_cast<double>(a.weight[tc]);
  double s1 = 0, s2 = 0, sa = 0, sb = 0, s3 = 0;
  if (a.ggx != nullptr) {
    for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < a.N; p.next()) {
      const int64_t off = plane_of(a, t, p.n, c) * plane + static_cast<int64_t>(p.h) * a.W + p.w;
      const double q = static_cast<double>(a.ggx[off]);
      s1 += q;
      s2 += q * (static_cast<double>(a.x[off]) - mean);
    }
  }
  for (Walk o(threadIdx.x, blockDim.x, a.Ho, a.Wo); o.n < a.N; o.next()) {
    const int64_t i = o.h, j = o.w, pl = plane_of(a, t, o.n, c), out = pl * out_plane + i * a.Wo + j;
    if (!(a.y[out] > T(0))) continue;
    const int k = a.idx[out];
    const int64_t xa = pl * plane + (2 * i + (k >> 1)) * a.W + 2 * j + (k & 1);
    const double g = static_cast<double>(a.gy[out]);
    sa += g;
    sb += g * (static_cast<double>(a.x[xa]) - mean);
    if (a.ggx != nullptr) s3 += g * static_cast<double>(a.ggx[xa]);
  }
  const double S1 = block_sum(s1, red), S2 = block_sum(s2, red) * s, A = block_sum(sa, red);
  const double B = block_sum(sb, red) * s, S3 = block_sum(s3, red);
  const double gw = static_cast<double>(a.ggw[tc]), gb = static_cast<double>(a.ggb[tc]);
  if (threadIdx.x == 0) a.g_w[tc] = static_cast<T>(s * (S3 - A * S1 / Md - B * S2 / Md));
  const double K = -wv * s * B / Md, P = gw - wv * s * S2 / Md;
  const double Gs = wv * S3 - wv * (A * S1 + B * S2) / Md;
  const double c0 = -s * (P * A + K * S1) / Md, c1 = -(s * (P * B + K * S2) + s * s * Gs) / Md;
  const T sK = static_cast<T>(s * K), a0 = static_cast<T>(c0), a1 = static_cast<T>(c1 * s);
  const T m = static_cast<T>(mean), sP = static_cast<T>(s * P);
  for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < a.N; p.next()) {
    const int h = p.h, w = p.w;
    const int64_t pl = plane_of(a, t, p.n, c), off = pl * plane + static_cast<int64_t>(h) * a.W + w;
    T v = (a.ggx != nullptr ? sK * a.ggx[off] : T(0)) + a0 + a1 * (a.x[off] - m);
    if (h < 2 * a.Ho && w < 2 * a.Wo) {  // inside a window: s P g where it took the maximum
      const int64_t out = pl * out_plane + (h >> 1) * a.Wo + (w >> 1);
      if (a.idx[out] == ((h & 1) << 1 | (w & 1)) && a.y[out] > T(0)) v += sP * a.gy[out];
    }
    a.g_x[off] = v;
  }
  const T r0 = static_cast<T>(gb - wv * s * S1 / Md), r1 = static_cast<T>((gw - wv * s * S2 / Md) * s);
  const T ws = static_cast<T>(wv * s);
  for (Walk o(threadIdx.x, blockDim.x, a.Ho, a.Wo); o.n < a.N; o.next()) {
    const int64_t i = o.h, j = o.w, pl = plane_of(a, t, o.n, c), out = pl * out_plane + i * a.Wo + j;
    T v = T(0);
    if (a.y[out] > T(0)) {
      const int k = a.idx[out];
      const int64_t xa = pl * plane + (2 * i + (k >> 1)) * a.W + 2 * j + (k & 1);
      v = r0 + r1 * (a.x[xa] - m) + (a.ggx != nullptr ? ws * a.ggx[xa] : T(0));
    }
    a.g_gy[out] = v;
  }
}

// One block per (task, channel), a double per thread of shared memory for the reductions.
template <typename T, typename Kernel>
cudaError_t launch_per_channel(Kernel kernel, const BNReLUPoolArgs<T>& a, cudaStream_t stream) {
  const int64_t blocks = a.tasks * a.C;
  if (blocks == 0) return cudaSuccess;
  return FASTMETA_LAUNCH(kernel, static_cast<unsigned>(blocks), kBNReLUPoolThreads,
                         kBNReLUPoolThreads * sizeof(double), stream, a);
}

}  // namespace

template <typename T>
cudaError_t launch_bn_relu_pool(const BNReLUPoolArgs<T>& a, cudaStream_t stream) {
  return launch_per_channel(bn_relu_pool_kernel<T>, a, stream);
}

template <typename T>
cudaError_t launch_bn_relu_pool_backward(const BNReLUPoolArgs<T>& a, cudaStream_t stream) {
  return launch_per_channel(bn_relu_pool_backward_kernel<T>, a, stream);
}

template <typename T>
cudaError_t launch_bn_relu_pool_double_backward(const BNReLUPoolArgs<T>& a, cudaStream_t stream) {
  return launch_per_channel(bn_relu_pool_double_backward_kernel<T>, a, stream);
}

template cudaError_t launch_bn_relu_pool<float>(const BNReLUPoolArgs<float>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool<double>(const BNReLUPoolArgs<double>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool_backward<float>(const BNReLUPoolArgs<float>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool_backward<double>(const BNReLUPoolArgs<double>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool_double_backward<float>(const BNReLUPoolArgs<float>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool_double_backward<double>(const BNReLUPoolArgs<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastmeta
