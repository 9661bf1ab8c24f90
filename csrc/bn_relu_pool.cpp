// fastmeta::bn_relu_pool: per-task BatchNorm (batch statistics) -> ReLU -> MaxPool2d(2) in one pass
// over the activations, and its backward, on CPU. The conv4 block of few-shot learning spends more
// time in these three memory-bound ops (five full passes forward, six backward, int64 pool indices)
// than in its convolutions; fused, the forward reads x twice and writes the pooled output and a
// one-byte window index, the backward reads x twice and writes dx once.
//
//   x [T, N, C, H, W] (task-major, or task-inner as batched_conv2d returns it: y, idx and dx then
//   are too), weight/bias [T, C]; per task t and channel c over (N, H, W):
//   mean, var (biased), invstd = 1 / sqrt(var + eps), z = (x - mean) (w invstd) + b (exact where x is
//   the mean, and equal inputs, such as a blank region of an image, give equal outputs),
//   y = max over each 2x2 window (stride 2, floor) of relu(z): [T, N, C, H/2, W/2]; idx in 0..3 is the
//   window position of the first maximum (max_pool2d's choice; where every z <= 0, y = 0 and the
//   gradient is 0 whatever idx says).
//   Backward: g_z = gy at (window, idx) where y > 0, else 0; dbias = sum g_z, dweight = sum g_z xhat,
//   dx = w invstd (g_z - dbias / M - xhat dweight / M), M = N H W.
//
// Double backward (bn_relu_pool_double_backward): the derivatives of (dx, dweight, dbias) with
// respect to (gy, x, weight), in closed form, contracted with their cotangents (ggx, ggw, ggb);
// the window choice and the ReLU mask are piecewise constant (no derivative), so with
// g = g_z, s = invstd, A = sum g, B = sum g xhat, S1 = sum ggx, S2 = sum ggx xhat, S3 = sum ggx g:
//   g_weight = s (S3 - A S1 / M - B S2 / M)
//   g_gy     = at each window's maximum where y > 0: ggb + ggw xhat + w s (ggx - S1 / M - xhat S2 / M)
//   g_x      = s K ggx + s P g + c0 + c1 xhat, with K = -w s B / M, P = ggw - w s S2 / M,
//              Gs = w S3 - w (A S1 + B S2) / M (the cotangent of s), c0 = -s (P A + K S1) / M,
//              c1 = -(s (P B + K S2) + s^2 Gs) / M.
// Second-order MAML differentiates the support pass's backward once: this is that derivative,
// two passes over the activations where the composite's double backward makes some thirty.
// Statistics and reductions accumulate in double. Third order: fastmeta/ops/bn_relu_pool.py
// recomputes through differentiable torch ops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

namespace fastmeta {

bool bn_relu_pool_task_inner(const at::Tensor& x) {
  return x.dim() == 5 && !x.is_contiguous() && x.transpose(0, 1).is_contiguous();
}

at::Tensor bn_relu_pool_in_layout(const at::Tensor& t, bool task_inner) {
  if (!task_inner || t.dim() != 5) return t.contiguous();  // (a wrong rank fails the checks, named)
  return t.transpose(0, 1).contiguous().transpose(0, 1);
}

at::Tensor bn_relu_pool_empty(const BNReLUPoolDims& d, int64_t h, int64_t w, const at::TensorOptions& opts) {
  at::Tensor t = d.task_inner ? at::empty({d.N, d.T, d.C, h, w}, opts).transpose(0, 1)
                              : at::empty({d.T, d.N, d.C, h, w}, opts);
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

namespace {

BNReLUPoolDims check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 5, "bn_relu_pool: x must be [T, N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "bn_relu_pool: x must be float32 or float64, got ", x.scalar_type());
  const bool inner = bn_relu_pool_task_inner(x);
  TORCH_CHECK(inner || x.is_contiguous(), "bn_relu_pool: x ", x.sizes(), " with strides ", x.strides(),
              " must be contiguous or task-inner ([N, T, C, H, W] in memory)");
  BNReLUPoolDims d{x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), x.size(3) / 2, x.size(4) / 2, inner};
  TORCH_CHECK(d.N * d.H * d.W > 0, "bn_relu_pool: x ", x.sizes(), " has no elements per channel");
  for (const auto* p : {&weight, &bias}) {
    TORCH_CHECK(p->dim() == 2 && p->size(0) == d.T && p->size(1) == d.C && p->scalar_type() == x.scalar_type(),
                "bn_relu_pool: weight and bias must be [T=", d.T, ", C=", d.C, "] of x's dtype, got ", p->sizes());
    TORCH_CHECK(p->device() == x.device(), "bn_relu_pool: weight and bias must be on x's device ", x.device(),
                ", got ", p->device());
  }
  return d;
}

}  // namespace

BNReLUPoolForward bn_relu_pool_forward_prepare(const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& bias) {
  BNReLUPoolForward f;
  f.x = bn_relu_pool_in_layout(x, bn_relu_pool_task_inner(x));
  f.weight = weight.contiguous();
  f.bias = bias.contiguous();
  f.d = check(f.x, f.weight, f.bias);
  const BNReLUPoolDims& d = f.d;
  f.y = bn_relu_pool_empty(d, d.Ho, d.Wo, f.x.options());
  f.idx = bn_relu_pool_empty(d, d.Ho, d.Wo, f.x.options().dtype(at::kByte));
  f.mean = new_output({d.T, d.C}, f.x.options());
  f.invstd = new_output({d.T, d.C}, f.x.options());
  return f;
}

BNReLUPoolSaved bn_relu_pool_saved(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& idx, const at::Tensor& y, const at::Tensor& mean,
                                   const at::Tensor& invstd) {
  const bool inner = bn_relu_pool_task_inner(x);
  BNReLUPoolSaved s{bn_relu_pool_in_layout(gy, inner), bn_relu_pool_in_layout(x, inner), weight.contiguous(),
                    bn_relu_pool_in_layout(idx, inner), bn_relu_pool_in_layout(y, inner), mean.contiguous(),
                    invstd.contiguous(), {}};
  const BNReLUPoolDims d = s.d = check(s.x, s.weight, s.weight);
  TORCH_CHECK(s.gy.dim() == 5 && s.gy.sizes() == s.y.sizes() && s.idx.sizes() == s.y.sizes() && s.y.size(0) == d.T &&
                  s.y.size(1) == d.N && s.y.size(2) == d.C && s.y.size(3) == d.Ho && s.y.size(4) == d.Wo &&
                  s.idx.scalar_type() == at::kByte && s.gy.scalar_type() == s.x.scalar_type() &&
                  s.y.scalar_type() == s.x.scalar_type(),
              "bn_relu_pool_backward: gy ", s.gy.sizes(), ", idx ", s.idx.sizes(), " and y ", s.y.sizes(),
              " must be [T, N, C, H/2, W/2] for x ", s.x.sizes());
  for (const auto* t : {&s.gy, &s.idx, &s.y}) {
    TORCH_CHECK(t->device() == s.x.device(), "bn_relu_pool_backward: gy, idx and y must be on x's device ",
                s.x.device(), ", got ", t->device());
  }
  for (const auto* t : {&s.mean, &s.invstd}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == d.T && t->size(1) == d.C && t->scalar_type() == s.x.scalar_type() &&
                    t->device() == s.x.device(),
                "bn_relu_pool_backward: mean and invstd must be [T=", d.T, ", C=", d.C,
                "] of x's dtype and device (the forward's), got ", t->sizes(), " ", t->scalar_type(), " on ",
                t->device());
  }
  return s;
}

BNReLUPoolGrads bn_relu_pool_backward_outputs(const BNReLUPoolSaved& s) {
  const BNReLUPoolDims& d = s.d;
  return {bn_relu_pool_empty(d, d.H, d.W, s.x.options()), new_output({d.T, d.C}, s.x.options()),
          new_output({d.T, d.C}, s.x.options())};
}

BNReLUPoolDouble bn_relu_pool_double_prepare(const BNReLUPoolSaved& s, const c10::optional<at::Tensor>& ggx,
                                             const at::Tensor& ggw, const at::Tensor& ggb) {
  const BNReLUPoolDims& d = s.d;
  const at::Tensor& x = s.x;
  for (const auto* p : {&ggw, &ggb}) {
    TORCH_CHECK(p->dim() == 2 && p->size(0) == d.T && p->size(1) == d.C && p->scalar_type() == x.scalar_type() &&
                    p->device() == x.device(),
                "bn_relu_pool_double_backward: ggw and ggb must be [T=", d.T, ", C=", d.C, "] of x's dtype and device, got ",
                p->sizes(), " ", p->scalar_type(), " on ", p->device());
  }
  BNReLUPoolDouble o;
  if (ggx.has_value() && ggx->defined()) {
    TORCH_CHECK(ggx->sizes() == x.sizes() && ggx->scalar_type() == x.scalar_type() && ggx->device() == x.device(),
                "bn_relu_pool_double_backward: ggx ", ggx->sizes(), " ", ggx->scalar_type(), " must be like x ",
                x.sizes(), " ", x.scalar_type(), " on ", x.device());
    o.ggx = bn_relu_pool_in_layout(*ggx, d.task_inner);
  }
  o.ggw = ggw.contiguous();
  o.ggb = ggb.contiguous();
  o.g_gy = bn_relu_pool_empty(d, d.Ho, d.Wo, x.options());
  o.g_x = bn_relu_pool_empty(d, d.H, d.W, x.options());
  o.g_w = new_output({d.T, d.C}, x.options());
  return o;
}

namespace {

using Dims = BNReLUPoolDims;

// The n windows of one output row, over input rows r0 and r1 (of one plane of x). Generic form;
// the AVX-512 float form below does 16 windows a step (a conv4 row has 14, 7, 3 or 1 windows, too
// few for a compiler's vector loop over j).
template <typename T>
inline void pool_windows(const T* r0, const T* r1, int64_t n, T mean, T scale, T bias, T* yo, uint8_t* io) {
  for (int64_t j = 0; j < n; ++j) {
    int k;
    const T best = window_max<T>((r0[2 * j] - mean) * scale + bias, (r0[2 * j + 1] - mean) * scale + bias,
                                 (r1[2 * j] - mean) * scale + bias, (r1[2 * j + 1] - mean) * scale + bias, k);
    yo[j] = !(best <= T(0)) ? best : T(0);
    io[j] = static_cast<uint8_t>(k);
  }
}

// Backward sums of windows [0, n) of one output row: sum g_z and sum g_z (x - mean).
template <typename T>
inline void window_sums(const T* r0, const T* r1, int64_t n, const T* g, const T* yo, const uint8_t* io, T mean,
                        double& sg, double& sgx) {
  for (int64_t j = 0; j < n; ++j) {
    const int k = io[j];
    const T xv = k == 0 ? r0[2 * j] : k == 1 ? r0[2 * j + 1] : k == 2 ? r1[2 * j] : r1[2 * j + 1];
    const double gz = yo[j] > T(0) ? static_cast<double>(g[j]) : 0.0;
    sg += gz;
    sgx += gz * (static_cast<double>(xv) - static_cast<double>(mean));
  }
}

// dx rows q0, q1 += wi g_z at each window's maximum, windows [0, n) of one output row.
template <typename T>
inline void window_scatter(T* q0, T* q1, int64_t n, const T* g, const T* yo, const uint8_t* io, T wi) {
  for (int64_t j = 0; j < n; ++j) {
    const int k = io[j];
    (k < 2 ? q0 : q1)[2 * j + (k & 1)] += yo[j] > T(0) ? wi * g[j] : T(0);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// 16 windows a step: the even / odd columns of a row pair are split apart with two permutes.
struct Pairs {
  __m512 even, odd;
};

inline Pairs load_pairs(const float* r, int cnt) {  // columns [0, 2 cnt) of r, cnt <= 16
  const __mmask16 lo = cnt >= 8 ? 0xFFFF : static_cast<__mmask16>((1u << (2 * cnt)) - 1);
  const __mmask16 hi = cnt > 8 ? static_cast<__mmask16>((1u << (2 * cnt - 16)) - 1) : 0;
  const __m512 a = _mm512_maskz_loadu_ps(lo, r), b = _mm512_maskz_loadu_ps(hi, r + 16);
  const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return {_mm512_permutex2var_ps(a, ev, b), _mm512_permutex2var_ps(a, od, b)};
}

inline void store_pairs(float* r, int cnt, __m512 even, __m512 odd) {  // r[0, 2 cnt) = interleave
  const __mmask16 lo = cnt >= 8 ? 0xFFFF : static_cast<__mmask16>((1u << (2 * cnt)) - 1);
  const __mmask16 hi = cnt > 8 ? static_cast<__mmask16>((1u << (2 * cnt - 16)) - 1) : 0;
  const __m512i il = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i ih = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  _mm512_mask_storeu_ps(r, lo, _mm512_permutex2var_ps(even, il, odd));
  _mm512_mask_storeu_ps(r + 16, hi, _mm512_permutex2var_ps(even, ih, odd));
}

template <>
inline void pool_windows<float>(const float* r0, const float* r1, int64_t n, float mean, float scale, float bias,
                                float* yo, uint8_t* io) {
  const __m512 mv = _mm512_set1_ps(mean), sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(bias);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n - j0));
    const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1);
    const Pairs a = load_pairs(r0 + 2 * j0, cnt), b = load_pairs(r1 + 2 * j0, cnt);
    const __m512 z0 = _mm512_fmadd_ps(_mm512_sub_ps(a.even, mv), sc, sh);
    const __m512 z1 = _mm512_fmadd_ps(_mm512_sub_ps(a.odd, mv), sc, sh);
    const __m512 z2 = _mm512_fmadd_ps(_mm512_sub_ps(b.even, mv), sc, sh);
    const __m512 z3 = _mm512_fmadd_ps(_mm512_sub_ps(b.odd, mv), sc, sh);
    __mmask16 u = _mm512_cmp_ps_mask(z1, z0, _CMP_NLE_UQ);
    __m512 best = _mm512_mask_blend_ps(u, z0, z1);
    __m512i k = _mm512_maskz_set1_epi32(u, 1);
    u = _mm512_cmp_ps_mask(z2, best, _CMP_NLE_UQ);
    best = _mm512_mask_blend_ps(u, best, z2);
    k = _mm512_mask_set1_epi32(k, u, 2);
    u = _mm512_cmp_ps_mask(z3, best, _CMP_NLE_UQ);
    best = _mm512_mask_blend_ps(u, best, z3);
    k = _mm512_mask_set1_epi32(k, u, 3);
    const __mmask16 pos = _mm512_cmp_ps_mask(best, zero, _CMP_NLE_UQ);
    _mm512_mask_storeu_ps(yo + j0, m, _mm512_maskz_mov_ps(pos, best));
    _mm512_mask_cvtepi32_storeu_epi8(io + j0, m, k);
  }
}

// k (16 window indices), the mask of windows passing the ReLU and their gradients g_z
struct WindowGrad {
  __m512i k;
  __m512 gz;
};

inline WindowGrad window_grad(const float* g, const float* yo, const uint8_t* io, int cnt) {
  const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1);
  const __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, io));
  const __mmask16 pos = _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(m, yo), _mm512_setzero_ps(), _CMP_GT_OQ);
  return {k, _mm512_maskz_loadu_ps(pos, g)};
}

template <>
inline void window_sums<float>(const float* r0, const float* r1, int64_t n, const float* g, const float* yo,
                               const uint8_t* io, float mean, double& sg, double& sgx) {
  const __m512 mv = _mm512_set1_ps(mean);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n - j0));
    const WindowGrad w = window_grad(g + j0, yo + j0, io + j0, cnt);
    const Pairs a = load_pairs(r0 + 2 * j0, cnt), b = load_pairs(r1 + 2 * j0, cnt);
    __m512 xv = a.even;
    xv = _mm512_mask_mov_ps(xv, _mm512_cmpeq_epi32_mask(w.k, _mm512_set1_epi32(1)), a.odd);
    xv = _mm512_mask_mov_ps(xv, _mm512_cmpeq_epi32_mask(w.k, _mm512_set1_epi32(2)), b.even);
    xv = _mm512_mask_mov_ps(xv, _mm512_cmpeq_epi32_mask(w.k, _mm512_set1_epi32(3)), b.odd);
    const __m512 gx = _mm512_mul_ps(w.gz, _mm512_sub_ps(xv, mv));
    // in double: the two halves of each vector
    const __m512d g0 = _mm512_cvtps_pd(_mm512_castps512_ps256(w.gz));
    const __m512d g1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w.gz), 1)));
    const __m512d x0 = _mm512_cvtps_pd(_mm512_castps512_ps256(gx));
    const __m512d x1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(gx), 1)));
    sg += _mm512_reduce_add_pd(_mm512_add_pd(g0, g1));
    sgx += _mm512_reduce_add_pd(_mm512_add_pd(x0, x1));
  }
}

template <>
inline void window_scatter<float>(float* q0, float* q1, int64_t n, const float* g, const float* yo,
                                  const uint8_t* io, float wi) {
  const __m512 wv = _mm512_set1_ps(wi);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n - j0));
    const WindowGrad w = window_grad(g + j0, yo + j0, io + j0, cnt);
    const __m512 v = _mm512_mul_ps(w.gz, wv);
    __m512 add[4];
    for (int q = 0; q < 4; ++q) add[q] = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(w.k, _mm512_set1_epi32(q)), v);
    const Pairs a = load_pairs(q0 + 2 * j0, cnt), b = load_pairs(q1 + 2 * j0, cnt);
    store_pairs(q0 + 2 * j0, cnt, _mm512_add_ps(a.even, add[0]), _mm512_add_ps(a.odd, add[1]));
    store_pairs(q1 + 2 * j0, cnt, _mm512_add_ps(b.even, add[2]), _mm512_add_ps(b.odd, add[3]));
  }
}
#endif

template <typename T>
void forward_impl(const Dims& d, const T* x, const T* w, const T* b, double eps, T* y, uint8_t* idx, T* mean_out,
                  T* invstd_out) {
  const int64_t M = d.N * d.plane();
  at::parallel_for(0, d.T * d.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tc = begin; tc < end; ++tc) {
      const int64_t t = tc / d.C, c = tc % d.C;
      auto in_plane = [&](int64_t n) { return x + d.plane_of(t, n, c) * d.plane(); };
      double sum = 0;
      for (int64_t n = 0; n < d.N; ++n) {
        const T* p = in_plane(n);
        double s = 0;
        _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < d.plane(); ++i) s += p[i];
        sum += s;
      }
      const double mean = sum / static_cast<double>(M);
      double sq = 0;
      for (int64_t n = 0; n < d.N; ++n) {
        const T* p = in_plane(n);
        double s = 0;
        _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < d.plane(); ++i) {
          const double dv = static_cast<double>(p[i]) - mean;
          s += dv * dv;
        }
        sq += s;
      }
      const double invstd = 1.0 / std::sqrt(sq / static_cast<double>(M) + eps);
      mean_out[tc] = static_cast<T>(mean);
      invstd_out[tc] = static_cast<T>(invstd);
      const T scale = static_cast<T>(static_cast<double>(w[tc]) * invstd);
      const T mean_t = static_cast<T>(mean);
      for (int64_t n = 0; n < d.N; ++n) {
        const T* p = in_plane(n);
        const int64_t o = d.plane_of(t, n, c) * d.out_plane();
        for (int64_t i = 0; i < d.Ho; ++i) {
          const T* r0 = p + 2 * i * d.W;
          pool_windows<T>(r0, r0 + d.W, d.Wo, mean_t, scale, b[tc], y + o + i * d.Wo, idx + o + i * d.Wo);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const Dims& d, const T* gy, const T* x, const T* w, const uint8_t* idx, const T* y,
                   const T* mean_in, const T* invstd_in, T* dx, T* dw, T* db) {
  const int64_t M = d.N * d.plane();
  at::parallel_for(0, d.T * d.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tc = begin; tc < end; ++tc) {
      const int64_t t = tc / d.C, c = tc % d.C;
      const double mean = mean_in[tc], invstd = invstd_in[tc];
      // sums over the window maxima that pass the ReLU (g_z is zero elsewhere)
      double sum_g = 0, sum_gx = 0;
      for (int64_t n = 0; n < d.N; ++n) {
        const int64_t pl = d.plane_of(t, n, c);
        const T* p = x + pl * d.plane();
        const int64_t o = pl * d.out_plane();
        for (int64_t i = 0; i < d.Ho; ++i) {
          const T* r0 = p + 2 * i * d.W;
          const int64_t oi = o + i * d.Wo;
          double sg = 0, sgx = 0;
          window_sums<T>(r0, r0 + d.W, d.Wo, gy + oi, y + oi, idx + oi, static_cast<T>(mean), sg, sgx);
          sum_g += sg;
          sum_gx += sgx * invstd;
        }
      }
      db[tc] = static_cast<T>(sum_g);
      dw[tc] = static_cast<T>(sum_gx);
      const double wi = static_cast<double>(w[tc]) * invstd;
      // dx = wi * g_z - wi * (sum_g / M) - wi * xhat * (sum_gx / M), xhat = (x - mean) invstd
      const T a = static_cast<T>(-wi * invstd * sum_gx / static_cast<double>(M));  // per unit (x - mean)
      const T c0 = static_cast<T>(-wi * sum_g / static_cast<double>(M));
      const T m = static_cast<T>(mean), wiT = static_cast<T>(wi);
      for (int64_t n = 0; n < d.N; ++n) {
        const int64_t pl = d.plane_of(t, n, c);
        const T* p = x + pl * d.plane();
        T* q = dx + pl * d.plane();
        _Pragma("omp simd") for (int64_t i = 0; i < d.plane(); ++i) q[i] = c0 + a * (p[i] - m);
        const int64_t o = pl * d.out_plane();
        for (int64_t i = 0; i < d.Ho; ++i) {
          T* q0 = q + 2 * i * d.W;
          const int64_t oi = o + i * d.Wo;
          window_scatter<T>(q0, q0 + d.W, d.Wo, gy + oi, y + oi, idx + oi, wiT);
        }
      }
    }
  });
}

// The double backward (see the top of the file); ggx may be null (a zero cotangent), ggw and ggb
// are [T, C] (zeros where autograd gave none).
template <typename T>
void double_backward_impl(const Dims& d, const T* ggx, const T* ggw, const T* ggb, const T* gy, const T* x,
                          const T* w, const uint8_t* idx, const T* y, const T* mean_in, const T* invstd_in,
                          T* g_gy, T* g_x, T* g_w) {
  const int64_t M = d.N * d.plane();
  const double Md = static_cast<double>(M);
  at::parallel_for(0, d.T * d.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tc = begin; tc < end; ++tc) {
      const int64_t t = tc / d.C, c = tc % d.C;
      const double mean = mean_in[tc], s = invstd_in[tc], wv = w[tc];
      double S1 = 0, S2 = 0, A = 0, B = 0, S3 = 0;
      for (int64_t n = 0; n < d.N; ++n) {
        const int64_t pl = d.plane_of(t, n, c);
        const T* p = x + pl * d.plane();
        if (ggx != nullptr) {
          const T* q = ggx + pl * d.plane();
          double s1 = 0, s2 = 0;
          _Pragma("omp simd reduction(+ : s1, s2)") for (int64_t i = 0; i < d.plane(); ++i) {
            s1 += q[i];
            s2 += static_cast<double>(q[i]) * (static_cast<double>(p[i]) - mean);
          }
          S1 += s1;
          S2 += s2;
        }
        const int64_t o = pl * d.out_plane();
        for (int64_t i = 0; i < d.Ho; ++i) {
          for (int64_t j = 0; j < d.Wo; ++j) {
            const int64_t oi = o + i * d.Wo + j;
            if (!(y[oi] > T(0))) continue;
            const int k = idx[oi];
            const int64_t a = (2 * i + (k >> 1)) * d.W + 2 * j + (k & 1);
            const double g = gy[oi];
            A += g;
            B += g * (static_cast<double>(p[a]) - mean);
            if (ggx != nullptr) S3 += g * static_cast<double>(ggx[pl * d.plane() + a]);
          }
        }
      }
      S2 *= s;
      B *= s;
      const double gw = ggw[tc], gb = ggb[tc];
      g_w[tc] = static_cast<T>(s * (S3 - A * S1 / Md - B * S2 / Md));
      const double K = -wv * s * B / Md, P = gw - wv * s * S2 / Md;
      const double Gs = wv * S3 - wv * (A * S1 + B * S2) / Md;
      const double c0 = -s * (P * A + K * S1) / Md, c1 = -(s * (P * B + K * S2) + s * s * Gs) / Md;
      // per element: s K ggx + c0 + c1 s (x - mean); at a window's maximum (y > 0) also s P g
      const T sK = static_cast<T>(s * K), a0 = static_cast<T>(c0), a1 = static_cast<T>(c1 * s),
              m = static_cast<T>(mean), sP = static_cast<T>(s * P);
      // g_gy at a maximum: gb + gw xhat + w s (ggx - S1 / M - xhat S2 / M)
      const double r0 = gb - wv * s * S1 / Md, r1 = (gw - wv * s * S2 / Md) * s;  // r1 per unit (x - mean)
      const T ws = static_cast<T>(wv * s), r0T = static_cast<T>(r0), r1T = static_cast<T>(r1);
      for (int64_t n = 0; n < d.N; ++n) {
        const int64_t pl = d.plane_of(t, n, c);
        const T* p = x + pl * d.plane();
        const T* q = ggx != nullptr ? ggx + pl * d.plane() : nullptr;
        T* gx = g_x + pl * d.plane();
        if (q != nullptr) {
          _Pragma("omp simd") for (int64_t i = 0; i < d.plane(); ++i) gx[i] = sK * q[i] + a0 + a1 * (p[i] - m);
        } else {
          _Pragma("omp simd") for (int64_t i = 0; i < d.plane(); ++i) gx[i] = a0 + a1 * (p[i] - m);
        }
        const int64_t o = pl * d.out_plane();
        for (int64_t i = 0; i < d.Ho; ++i) {
          for (int64_t j = 0; j < d.Wo; ++j) {
            const int64_t oi = o + i * d.Wo + j;
            if (!(y[oi] > T(0))) {
              g_gy[oi] = T(0);
              continue;
            }
            const int k = idx[oi];
            const int64_t a = (2 * i + (k >> 1)) * d.W + 2 * j + (k & 1);
            gx[a] += sP * gy[oi];
            g_gy[oi] = r0T + r1T * (p[a] - m) + (q != nullptr ? ws * q[a] : T(0));
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_cpu(const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias, double eps) {
  const BNReLUPoolForward f = bn_relu_pool_forward_prepare(x, weight, bias);
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "bn_relu_pool_cpu", [&] {
    forward_impl<scalar_t>(f.d, f.x.data_ptr<scalar_t>(), f.weight.data_ptr<scalar_t>(), f.bias.data_ptr<scalar_t>(),
                           eps, f.y.data_ptr<scalar_t>(), f.idx.data_ptr<uint8_t>(), f.mean.data_ptr<scalar_t>(),
                           f.invstd.data_ptr<scalar_t>());
  });
  return {f.y, f.idx, f.mean, f.invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& invstd) {
  const BNReLUPoolSaved a = bn_relu_pool_saved(gy, x, weight, idx, y, mean, invstd);
  const BNReLUPoolGrads o = bn_relu_pool_backward_outputs(a);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "bn_relu_pool_backward_cpu", [&] {
    backward_impl<scalar_t>(a.d, a.gy.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), a.weight.data_ptr<scalar_t>(),
                            a.idx.data_ptr<uint8_t>(), a.y.data_ptr<scalar_t>(), a.mean.data_ptr<scalar_t>(),
                            a.invstd.data_ptr<scalar_t>(), o.dx.data_ptr<scalar_t>(), o.dw.data_ptr<scalar_t>(),
                            o.db.data_ptr<scalar_t>());
  });
  return {o.dx, o.dw, o.db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_double_backward_cpu(
    const c10::optional<at::Tensor>& ggx, const at::Tensor& ggw, const at::Tensor& ggb, const at::Tensor& gy,
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd) {
  const BNReLUPoolSaved a = bn_relu_pool_saved(gy, x, weight, idx, y, mean, invstd);
  const BNReLUPoolDouble o = bn_relu_pool_double_prepare(a, ggx, ggw, ggb);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "bn_relu_pool_double_backward_cpu", [&] {
    double_backward_impl<scalar_t>(a.d, o.ggx.defined() ? o.ggx.data_ptr<scalar_t>() : nullptr,
                                   o.ggw.data_ptr<scalar_t>(), o.ggb.data_ptr<scalar_t>(), a.gy.data_ptr<scalar_t>(),
                                   a.x.data_ptr<scalar_t>(), a.weight.data_ptr<scalar_t>(), a.idx.data_ptr<uint8_t>(),
                                   a.y.data_ptr<scalar_t>(), a.mean.data_ptr<scalar_t>(), a.invstd.data_ptr<scalar_t>(),
                                   o.g_gy.data_ptr<scalar_t>(), o.g_x.data_ptr<scalar_t>(), o.g_w.data_ptr<scalar_t>());
  });
  return {o.g_gy, o.g_x, o.g_w};
}

}  // namespace
}  // namespace fastmeta

TORCH_LIBRARY_FRAGMENT(fastmeta, m) {
  // [y [T, N, C, H/2, W/2], idx uint8 (same shape), mean [T, C], invstd [T, C]]
  m.def("bn_relu_pool(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // [dx, dweight [T, C], dbias [T, C]]
  m.def("bn_relu_pool_backward(Tensor gy, Tensor x, Tensor weight, Tensor idx, Tensor y, Tensor mean, "
        "Tensor invstd) -> (Tensor, Tensor, Tensor)");
  // [g_gy (y's shape), g_x (x's), g_weight [T, C]]: the backward's derivative contracted with the
  // cotangents of (dx, dweight, dbias); ggx None: zero
  m.def("bn_relu_pool_double_backward(Tensor? ggx, Tensor ggw, Tensor ggb, Tensor gy, Tensor x, Tensor weight, "
        "Tensor idx, Tensor y, Tensor mean, Tensor invstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("bn_relu_pool", &fastmeta::bn_relu_pool_cpu);
  m.impl("bn_relu_pool_backward", &fastmeta::bn_relu_pool_backward_cpu);
  m.impl("bn_relu_pool_double_backward", &fastmeta::bn_relu_pool_double_backward_cpu);
}
