// fastmeta::bn_relu_pool on CUDA: per-task BatchNorm (batch statistics) -> ReLU -> MaxPool2d(2), its
// backward and its double backward, with the contract of the CPU kernel (csrc/bn_relu_pool.cpp): statistics and the
// backward's sums accumulate in double; idx is the row-major position (0..3) of each window's
// first maximum, as max_pool2d picks it; g_z = gy at that position where y > 0, else 0;
// dbias = sum g_z, dweight = sum g_z xhat, dx = w invstd (g_z - dbias / M - xhat dweight / M).
//
// Each op runs as two kernels over `slices` blocks per (task, channel), a block taking a range of
// the plane set's images (so a few tasks and channels still fill the GPU): the first writes each
// slice's partial sums (the forward's: element count, mean and squared deviations about it, two
// passes; the backward's two sums; the double backward's five), the second combines a plane set's
// partials in slice order and writes the outputs of its slice (the forward: normalize + ReLU + pool
// and a one-byte index; the backward: dx, each input element finding its own window; dweight and
// dbias, or g_w, by the first slice). Consecutive threads take consecutive elements of a plane
// (coalesced), each thread's position advanced without a division (Walk). Block reductions go
// through shared memory. x's planes may be task-major or task-inner (plane_of); the outputs follow
// x's layout.
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

// The block's share of the work: its (task, channel) tc and images [n0, n0 + nn) of that plane set
// (slice s of a.slices; an image's planes are never split).
struct Slice {
  int64_t tc, t, c, s, n0, nn;
};

template <typename T>
__device__ __forceinline__ Slice slice_of(const BNReLUPoolArgs<T>& a) {
  Slice r;
  r.tc = blockIdx.x / a.slices;
  r.s = blockIdx.x % a.slices;
  r.t = r.tc / a.C;
  r.c = r.tc % a.C;
  r.n0 = r.s * a.N / a.slices;
  r.nn = (r.s + 1) * a.N / a.slices - r.n0;
  return r;
}

// The slices' partial results of one (task, channel): kPartial doubles each.
constexpr int kPartial = 5;

template <typename T>
__device__ __forceinline__ double* partials(const BNReLUPoolArgs<T>& a, int64_t tc) {
  return a.partial + tc * a.slices * kPartial;
}

// Thread 0 stores the block's partial results in its slice's slot.
template <typename T, int n>
__device__ __forceinline__ void store_partials(const BNReLUPoolArgs<T>& a, const Slice& sl, const double (&v)[n]) {
  if (threadIdx.x != 0) return;
  double* out = partials(a, sl.tc) + sl.s * kPartial;
  for (int i = 0; i < n; ++i) out[i] = v[i];
}

// The plane set's total of partial sum f over its slices, in slice order.
template <typename T>
__device__ __forceinline__ double partial_total(const BNReLUPoolArgs<T>& a, int64_t tc, int f) {
  const double* part = partials(a, tc);
  double v = 0;
  for (int64_t k = 0; k < a.slices; ++k) v += part[k * kPartial + f];
  return v;
}

// Calls f(xa, g) for each window of the block's slice whose maximum passes the ReLU (g_z is zero
// elsewhere): xa the maximum's index in x, g the window's gy.
template <typename T, typename F>
__device__ __forceinline__ void for_each_live_max(const BNReLUPoolArgs<T>& a, const Slice& sl, F f) {
  const int64_t plane = a.H * a.W, out_plane = a.Ho * a.Wo;
  for (Walk o(threadIdx.x, blockDim.x, a.Ho, a.Wo); o.n < sl.nn; o.next()) {
    const int64_t i = o.h, j = o.w, pl = plane_of(a, sl.t, sl.n0 + o.n, sl.c), out = pl * out_plane + i * a.Wo + j;
    if (!(a.y[out] > T(0))) continue;
    const int k = a.idx[out];
    f(pl * plane + (2 * i + (k >> 1)) * a.W + 2 * j + (k & 1), static_cast<double>(a.gy[out]));
  }
}

// Forward, first kernel: each slice's element count, mean and sum of squared deviations about it
// (two passes over the slice).
template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_stats_kernel(BNReLUPoolArgs<T> a) {
  FASTMETA_DYNAMIC_SMEM(double, red);
  const Slice sl = slice_of(a);
  const int64_t plane = a.H * a.W;
  const double count = static_cast<double>(sl.nn * plane);
  auto in = [&](int64_t n) { return a.x + plane_of(a, sl.t, sl.n0 + n, sl.c) * plane; };
  double s = 0;
  for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < sl.nn; p.next())
    s += static_cast<double>(in(p.n)[p.h * a.W + p.w]);
  const double mean = block_sum(s, red) / count;
  double q = 0;
  for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < sl.nn; p.next()) {
    const double d = static_cast<double>(in(p.n)[p.h * a.W + p.w]) - mean;
    q += d * d;
  }
  const double m2 = block_sum(q, red);
  store_partials(a, sl, {count, mean, m2});
}

// Forward, second kernel: the statistics of the whole plane set from its slices' (count, mean,
// squared deviations), combined in slice order (Chan et al.; one slice: the two-pass mean and
// variance as they are), then normalize + ReLU + pool over the slice's windows.
template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_apply_kernel(BNReLUPoolArgs<T> a) {
  const Slice sl = slice_of(a);
  const int64_t plane = a.H * a.W, out_plane = a.Ho * a.Wo;
  const double* part = partials(a, sl.tc);
  double count = part[0], mean = part[1], m2 = part[2];
  for (int64_t k = 1; k < a.slices; ++k) {
    const double nk = part[k * kPartial], d = part[k * kPartial + 1] - mean, total = count + nk;
    mean += d * nk / total;
    m2 += part[k * kPartial + 2] + d * d * count * nk / total;
    count = total;
  }
  const double invstd = 1.0 / sqrt(m2 / count + a.eps);
  if (sl.s == 0 && threadIdx.x == 0) {
    a.mean[sl.tc] = static_cast<T>(mean);
    a.invstd[sl.tc] = static_cast<T>(invstd);
  }
  // z = (x - mean) (w invstd) + b: exact where x is the mean, and equal inputs (a blank region of
  // an image) give equal outputs, as the reference's (x - mean) invstd w + b
  const T m = static_cast<T>(mean), scale = static_cast<T>(static_cast<double>(a.weight[sl.tc]) * invstd);
  const T bias = a.bias[sl.tc];
  for (Walk o(threadIdx.x, blockDim.x, a.Ho, a.Wo); o.n < sl.nn; o.next()) {
    const int64_t pl = plane_of(a, sl.t, sl.n0 + o.n, sl.c);
    const T* p = a.x + pl * plane + 2 * o.h * a.W + 2 * o.w;
    int k;
    const T best = window_max<T>((p[0] - m) * scale + bias, (p[1] - m) * scale + bias, (p[a.W] - m) * scale + bias,
                                 (p[a.W + 1] - m) * scale + bias, k);
    const int64_t out = pl * out_plane + o.h * a.Wo + o.w;
    a.y[out] = !(best <= T(0)) ? best : T(0);
    a.idx[out] = static_cast<uint8_t>(k);
  }
}

// Backward, first kernel: each slice's sums over the window maxima that pass the ReLU (g_z is zero
// elsewhere): sum g and sum g (x - mean).
template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_backward_sums_kernel(BNReLUPoolArgs<T> a) {
  FASTMETA_DYNAMIC_SMEM(double, red);
  const Slice sl = slice_of(a);
  const double mean = static_cast<double>(a.mean[sl.tc]);
  double sg = 0, sgx = 0;
  for_each_live_max(a, sl, [&](int64_t xa, double g) {
    sg += g;
    sgx += g * (static_cast<double>(a.x[xa]) - mean);
  });
  const double total_g = block_sum(sg, red), total_gx = block_sum(sgx, red);
  store_partials(a, sl, {total_g, total_gx});
}

// Backward, second kernel: the sums of the plane set (its slices', in slice order), dweight and
// dbias (by the first slice), then dx over the slice's elements.
template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_backward_dx_kernel(BNReLUPoolArgs<T> a) {
  const Slice sl = slice_of(a);
  const int64_t plane = a.H * a.W, M = a.N * plane, out_plane = a.Ho * a.Wo;
  const double mean = static_cast<double>(a.mean[sl.tc]), invstd = static_cast<double>(a.invstd[sl.tc]);
  const double sum_g = partial_total(a, sl.tc, 0), sum_gx = partial_total(a, sl.tc, 1) * invstd;
  if (sl.s == 0 && threadIdx.x == 0) {
    a.dbias[sl.tc] = static_cast<T>(sum_g);
    a.dweight[sl.tc] = static_cast<T>(sum_gx);
  }
  const double wi = static_cast<double>(a.weight[sl.tc]) * invstd;
  const T slope = static_cast<T>(-wi * invstd * sum_gx / static_cast<double>(M));  // per unit of (x - mean)
  const T c0 = static_cast<T>(-wi * sum_g / static_cast<double>(M));
  const T m = static_cast<T>(mean), wiT = static_cast<T>(wi);
  for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < sl.nn; p.next()) {
    const int h = p.h, w = p.w;
    const int64_t base = plane_of(a, sl.t, sl.n0 + p.n, sl.c), rest = static_cast<int64_t>(h) * a.W + w;
    T v = c0 + slope * (a.x[base * plane + rest] - m);
    if (h < 2 * a.Ho && w < 2 * a.Wo) {  // inside a window: add w invstd g_z where it took the maximum
      const int64_t out = base * out_plane + (h >> 1) * a.Wo + (w >> 1);
      if (a.idx[out] == ((h & 1) << 1 | (w & 1)) && a.y[out] > T(0)) v += wiT * a.gy[out];
    }
    a.dx[base * plane + rest] = v;
  }
}

// The double backward (the formulas at the top of csrc/bn_relu_pool.cpp), first kernel: each
// slice's five sums (S1, S2 over the elements, A, B, S3 over the windows; S2 and B before their
// factor invstd).
template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_double_sums_kernel(BNReLUPoolArgs<T> a) {
  FASTMETA_DYNAMIC_SMEM(double, red);
  const Slice sl = slice_of(a);
  const int64_t plane = a.H * a.W;
  const double mean = static_cast<double>(a.mean[sl.tc]);
  double s1 = 0, s2 = 0, sa = 0, sb = 0, s3 = 0;
  if (a.ggx != nullptr) {
    for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < sl.nn; p.next()) {
      const int64_t off = plane_of(a, sl.t, sl.n0 + p.n, sl.c) * plane + static_cast<int64_t>(p.h) * a.W + p.w;
      const double q = static_cast<double>(a.ggx[off]);
      s1 += q;
      s2 += q * (static_cast<double>(a.x[off]) - mean);
    }
  }
  for_each_live_max(a, sl, [&](int64_t xa, double g) {
    sa += g;
    sb += g * (static_cast<double>(a.x[xa]) - mean);
    if (a.ggx != nullptr) s3 += g * static_cast<double>(a.ggx[xa]);
  });
  const double t1 = block_sum(s1, red), t2 = block_sum(s2, red), ta = block_sum(sa, red);
  const double tb = block_sum(sb, red), t3 = block_sum(s3, red);
  store_partials(a, sl, {t1, t2, ta, tb, t3});
}

// The double backward, second kernel: the five sums of the plane set (in slice order), g_w (by the
// first slice), then g_x over the slice's elements (each finding its own window) and g_gy over its
// windows.
template <typename T>
__global__ void __launch_bounds__(kBNReLUPoolThreads) bn_relu_pool_double_apply_kernel(BNReLUPoolArgs<T> a) {
  const Slice sl = slice_of(a);
  const int64_t plane = a.H * a.W, out_plane = a.Ho * a.Wo;
  const double Md = static_cast<double>(a.N * plane);
  const double mean = static_cast<double>(a.mean[sl.tc]), s = static_cast<double>(a.invstd[sl.tc]);
  const double wv = static_cast<double>(a.weight[sl.tc]);
  const double S1 = partial_total(a, sl.tc, 0), S2 = partial_total(a, sl.tc, 1) * s;
  const double A = partial_total(a, sl.tc, 2), B = partial_total(a, sl.tc, 3) * s, S3 = partial_total(a, sl.tc, 4);
  const double gw = static_cast<double>(a.ggw[sl.tc]), gb = static_cast<double>(a.ggb[sl.tc]);
  if (sl.s == 0 && threadIdx.x == 0) a.g_w[sl.tc] = static_cast<T>(s * (S3 - A * S1 / Md - B * S2 / Md));
  const double K = -wv * s * B / Md, P = gw - wv * s * S2 / Md;
  const double Gs = wv * S3 - wv * (A * S1 + B * S2) / Md;
  const double c0 = -s * (P * A + K * S1) / Md, c1 = -(s * (P * B + K * S2) + s * s * Gs) / Md;
  const T sK = static_cast<T>(s * K), a0 = static_cast<T>(c0), a1 = static_cast<T>(c1 * s);
  const T m = static_cast<T>(mean), sP = static_cast<T>(s * P);
  for (Walk p(threadIdx.x, blockDim.x, a.H, a.W); p.n < sl.nn; p.next()) {
    const int h = p.h, w = p.w;
    const int64_t pl = plane_of(a, sl.t, sl.n0 + p.n, sl.c), off = pl * plane + static_cast<int64_t>(h) * a.W + w;
    T v = (a.ggx != nullptr ? sK * a.ggx[off] : T(0)) + a0 + a1 * (a.x[off] - m);
    if (h < 2 * a.Ho && w < 2 * a.Wo) {  // inside a window: s P g where it took the maximum
      const int64_t out = pl * out_plane + (h >> 1) * a.Wo + (w >> 1);
      if (a.idx[out] == ((h & 1) << 1 | (w & 1)) && a.y[out] > T(0)) v += sP * a.gy[out];
    }
    a.g_x[off] = v;
  }
  const T r0 = static_cast<T>(gb - wv * s * S1 / Md), r1 = static_cast<T>((gw - wv * s * S2 / Md) * s);
  const T ws = static_cast<T>(wv * s);
  for (Walk o(threadIdx.x, blockDim.x, a.Ho, a.Wo); o.n < sl.nn; o.next()) {
    const int64_t i = o.h, j = o.w, pl = plane_of(a, sl.t, sl.n0 + o.n, sl.c), out = pl * out_plane + i * a.Wo + j;
    T v = T(0);
    if (a.y[out] > T(0)) {
      const int k = a.idx[out];
      const int64_t xa = pl * plane + (2 * i + (k >> 1)) * a.W + 2 * j + (k & 1);
      v = r0 + r1 * (a.x[xa] - m) + (a.ggx != nullptr ? ws * a.ggx[xa] : T(0));
    }
    a.g_gy[out] = v;
  }
}

// A slice's block for each (task, channel) and slice: the first kernel of a pair with a double per
// thread of shared memory for its reductions, then the second, which reads the first's partials
// (stream order).
template <typename T, typename First, typename Second>
cudaError_t launch_sliced(First first, Second second, const BNReLUPoolArgs<T>& a, cudaStream_t stream) {
  const int64_t blocks = a.tasks * a.C * a.slices;
  if (blocks == 0) return cudaSuccess;
  if (a.slices < 1 || a.slices > a.N || a.partial == nullptr) return cudaErrorInvalidValue;
  cudaError_t e = FASTMETA_LAUNCH(first, static_cast<unsigned>(blocks), kBNReLUPoolThreads,
                                  kBNReLUPoolThreads * sizeof(double), stream, a);
  if (e != cudaSuccess) return e;
  return FASTMETA_LAUNCH(second, static_cast<unsigned>(blocks), kBNReLUPoolThreads, 0, stream, a);
}

}  // namespace

template <typename T>
cudaError_t launch_bn_relu_pool(const BNReLUPoolArgs<T>& a, cudaStream_t stream) {
  return launch_sliced(bn_relu_pool_stats_kernel<T>, bn_relu_pool_apply_kernel<T>, a, stream);
}

template <typename T>
cudaError_t launch_bn_relu_pool_backward(const BNReLUPoolArgs<T>& a, cudaStream_t stream) {
  return launch_sliced(bn_relu_pool_backward_sums_kernel<T>, bn_relu_pool_backward_dx_kernel<T>, a, stream);
}

template <typename T>
cudaError_t launch_bn_relu_pool_double_backward(const BNReLUPoolArgs<T>& a, cudaStream_t stream) {
  return launch_sliced(bn_relu_pool_double_sums_kernel<T>, bn_relu_pool_double_apply_kernel<T>, a, stream);
}

template cudaError_t launch_bn_relu_pool<float>(const BNReLUPoolArgs<float>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool<double>(const BNReLUPoolArgs<double>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool_backward<float>(const BNReLUPoolArgs<float>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool_backward<double>(const BNReLUPoolArgs<double>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool_double_backward<float>(const BNReLUPoolArgs<float>&, cudaStream_t);
template cudaError_t launch_bn_relu_pool_double_backward<double>(const BNReLUPoolArgs<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastmeta
