// The whole MAML inner loop of an MLP for T tasks, with the exact meta-gradient, CPU.
//
// Per task t (tasks run W at a time in SIMD lanes, groups of W tasks in parallel threads; each
// group's weights and activations live in a per-thread workspace allocated once per chunk of
// groups, never per step):
//   theta_0 = theta (the meta-parameters), for s < S:  g_s = grad L_sup(theta_s),
//   theta_{s+1} = theta_s - alpha (.) g_s;   loss_t = L_query(theta_S).
// Meta-gradient by a reverse pass over the steps (Finn et al. 2017, eq. 1; Li et al. 2017 for
// the learned alpha), with v_S = grad L_query(theta_S):
//   second order:  d alpha += -g_s (.) v_{s+1},  v_s = v_{s+1} - H_s (alpha (.) v_{s+1})
//   first order:   v_s = v_{s+1},                d alpha += -g_s (.) v_S
// H_s u, the Hessian of the support loss at theta_s times u, in closed form by Pearlmutter's
// R-operator (forward-over-reverse) on the stored activations of step s:
//   R-forward:  Rz_l = Ra_{l-1} W_l^T + a_{l-1} dW_l^T + db_l,   Ra_l = s'(z_l) Rz_l
//   loss:       Rd_L = (d2 loss / d a_L^2) Ra_L
//   R-backward: Rdz_l = s''(z_l) Rz_l da_l + s'(z_l) Rda_l,
//               hW_l = Rdz_l^T a_{l-1} + dz_l^T Ra_{l-1},  hb_l = sum_n Rdz_l,
//               Rda_{l-1} = Rdz_l W_l + dz_l dW_l
// where u = (dW_l, db_l), dz_l = s'(z_l) da_l, da_l the loss gradient w.r.t. a_l.
//
// Shapes: xs [T,K,I], xq [T,Q,I]; ys/yq [T,K,O] float (mse) or [T,K] int64 (cross-entropy);
// params = [W_1 [d_1,d_0], b_1 [d_1], ..., W_L, b_L] shared by all tasks; lrs empty (scalar lr) or
// one tensor per parameter of its shape (Meta-SGD). acts[l]: 0 none, 1 relu, 2 leaky relu,
// 3 tanh, 4 sigmoid, 5 gelu, 6 gelu (tanh form), 7 silu. loss: 0 mse (mean over all elements),
// 1 cross-entropy (mean over rows).
// Returns [loss [T], dtheta [T, P], dlr [T or 0, P]] with P the parameter count and each row the
// concatenation of a task's flattened [dW_1, db_1, ..., dW_L, db_L] (dlr only when need_lr_grad).
#include <ATen/ops/cat.h>
#include <ATen/ops/resolve_conj.h>
#include <ATen/ops/resolve_neg.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include "common.h"

#include <c10/util/irange.h>

#include <algorithm>
// The register tiles' instruction set: AVX-512, else AVX2 with FMA, else none (generic lane code).
#if defined(__AVX512F__)
#define FASTMETA_VEC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define FASTMETA_VEC_AVX2 1
#endif
#if defined(FASTMETA_VEC_AVX512) || defined(FASTMETA_VEC_AVX2)
#include <immintrin.h>
#endif
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <type_traits>

namespace fastmeta {
namespace {

// Tasks are processed W at a time, one task per SIMD lane: every per-task quantity is stored as
// [..., W] with the lane innermost, so each scalar operation of one task's inner loop becomes one
// vector operation over W tasks, with no horizontal reductions and no short-loop overhead.
//
// Register block shapes (MB x PB) of the products: the default (gemm), and by the shape of their
// operands the forward z = a W^T and the backward da = dz W (K = a layer's width), and the weight
// gradient dz^T a whose K is the row count N, short, so that each output's epilogue weighs more.
// AVX2 has 16 registers: 3 x 3 blocks (9 accumulators and their 6 operands).
#if defined(FASTMETA_VEC_AVX2)
constexpr int kVecBytes = 32;  // one AVX2 register of lanes
constexpr int kVecTileMB = 3, kVecTilePB = 3;
constexpr int kFwdMB = 3, kFwdPB = 3, kDaMB = 3, kDaPB = 3, kOuterMB = 3, kOuterPB = 3;
#else
constexpr int kVecBytes = 64;
constexpr int kVecTileMB = 5, kVecTilePB = 4;
constexpr int kFwdMB = 5, kFwdPB = 4, kDaMB = 5, kDaPB = 3, kOuterMB = 5, kOuterPB = 3;
#endif

#define FM_LANES _Pragma("omp simd") for (int l = 0; l < W; ++l)

enum Act : int64_t { kNone = 0, kRelu = 1, kLeaky = 2, kTanh = 3, kSigmoid = 4, kGelu = 5, kGeluTanh = 6, kSilu = 7 };
constexpr int64_t kActs = 8;

// The activations whose derivatives come from z, not from a = s(z): GELU (z Phi(z)), GELU's tanh
// form (z (1 + tanh(u)) / 2, u = c (z + 0.044715 z^3), c = sqrt(2 / pi), as PyTorch's
// approximate='tanh') and SiLU (z sigmoid(z)); s, s' and s'' of each.
inline bool from_z(int64_t act) { return act >= kGelu; }

template <typename T>
struct ZAct {
  static constexpr T kInvSqrt2 = T(0.70710678118654752440), kInvSqrt2Pi = T(0.39894228040143267794);
  static constexpr T kC = T(0.79788456080286535588), kK = T(0.044715);
  // For GELU's tanh form, t = tanh(u), 1 + t and 1 - t^2 from e = exp(-2|u|) without cancellation
  // where |t| is near 1: t = sign(u) (1 - e) / (1 + e), 1 + t = 2 / (1 + e) (u >= 0) or 2 e / (1 + e),
  // 1 - t^2 = 4 e / (1 + e)^2.
  struct Tanh {
    T t, one_plus_t, sech2;
    explicit Tanh(T u) {
      const T e = std::exp(T(-2) * std::abs(u)), inv = T(1) / (T(1) + e);
      t = std::copysign((T(1) - e) * inv, u);
      one_plus_t = (u >= T(0) ? T(2) : T(2) * e) * inv;
      sech2 = T(4) * e * inv * inv;
    }
  };
  static T u(T z) { return kC * (z + kK * z * z * z); }
  static T du(T z) { return kC * (T(1) + T(3) * kK * z * z); }
  static T s(int64_t act, T z) {
    if (act == kGelu) return z * T(0.5) * (T(1) + std::erf(z * kInvSqrt2));
    if (act == kGeluTanh) return T(0.5) * z * Tanh(u(z)).one_plus_t;
    return z / (T(1) + std::exp(-z));
  }
  static T d1(int64_t act, T z) {
    if (act == kGelu) return T(0.5) * (T(1) + std::erf(z * kInvSqrt2)) + z * kInvSqrt2Pi * std::exp(T(-0.5) * z * z);
    if (act == kGeluTanh) {
      const Tanh h(u(z));
      return T(0.5) * h.one_plus_t + T(0.5) * z * h.sech2 * du(z);
    }
    const T g = T(1) / (T(1) + std::exp(-z));
    return g * (T(1) + z * (T(1) - g));
  }
  static T d2(int64_t act, T z) {
    if (act == kGelu) return kInvSqrt2Pi * std::exp(T(-0.5) * z * z) * (T(2) - z * z);
    if (act == kGeluTanh) {
      const Tanh h(u(z));
      const T d = du(z), dd = kC * T(6) * kK * z;
      return h.sech2 * (d + T(0.5) * z * (dd - T(2) * h.t * d * d));
    }
    const T g = T(1) / (T(1) + std::exp(-z));
    return g * (T(1) - g) * (T(2) + z * (T(1) - T(2) * g));
  }
};

struct Net {
  int64_t L = 0;
  std::vector<int64_t> d;           // widths d_0..d_L
  std::vector<int64_t> offW, offb;  // offsets of W_l, b_l (stored at l-1) in a flat parameter vector
  std::vector<int64_t> acts;
  int64_t P = 0;                    // total parameter count
  double slope = 0.01;
};

// One forward/backward's stored activations: z_l, a_l, da_l, dz_l (l = 1..L at index l-1), each
// [N, d_l, W]; z_l is a_l's storage itself except where the layer keeps it apart (Group::keeps_z).
template <typename T>
struct Acts {
  std::vector<T*> z, a, da, dz;
};

// A per-thread workspace, kept between calls (threads of the pool persist), so that a call
// allocates and page-faults nothing in steady state.
std::atomic<int64_t> g_workspace_bytes{0};  // all threads' workspaces, for memory reports

inline void* workspace(size_t bytes) {
  struct Buf {
    void* p = nullptr;
    size_t n = 0;
    ~Buf() {
      std::free(p);
      g_workspace_bytes -= static_cast<int64_t>(n);
    }
  };
  thread_local Buf buf;
  if (buf.n < bytes) {
    std::free(buf.p);
    g_workspace_bytes -= static_cast<int64_t>(buf.n);
    buf.n = ((bytes + 4095) / 4096) * 4096;
    g_workspace_bytes += static_cast<int64_t>(buf.n);
    buf.p = std::aligned_alloc(64, buf.n);
    TORCH_CHECK(buf.p != nullptr, "mlp_inner_loop: cannot allocate a workspace of ", bytes, " bytes");
  }
  return buf.p;
}

// One product sum_k A(m, k) B(k, p) over lane vectors: element (i, j) of X lives at
// X + (i * s_i + j * s_j) * W.
template <typename T>
struct Prod {
  const T* A;
  int64_t sam, sak;
  const T* B;
  int64_t sbk, sbp, K;
};

// What a gemm does with its product acc at C[m, p] (lane vectors at C + (m * scm + p * scp) * W):
//   C = acc (+ init[p], a bias) by default;
//   C = base - rate * acc with base (laid out like C): an SGD step written by the kernel that
//   computes the gradient, rate the scalar alpha or, with rates, the per-entry (not per-lane)
//   rates[m * scm + p * scp].
//   With base and keep (laid out like C, not C itself), the same step, and the gradient acc kept:
//   keep = acc, or keep += acc with keep_add (the learned rates' gradients read every step's).
//   C = s'(gate) * acc with gate (laid out like C) the pre-activations z of a ReLU (leaky when
//   slope != 0) layer: a backward product written straight as that layer's dz.
//   With init and activate, a forward layer's output through a ReLU (leaky when slope != 0):
//   C = s(init + acc) or, with act_out (laid out like C), C = z = init + acc and act_out = s(z).
template <typename T>
struct Epi {
  const T* init = nullptr;
  const T* base = nullptr;
  T alpha = T(0);
  const T* rates = nullptr;
  const T* gate = nullptr;
  T slope = T(0);
  bool activate = false;
  T* act_out = nullptr;
  T* keep = nullptr;
  bool keep_add = false;
};

// One SIMD register of lanes, where the lanes fill an AVX-512 register (the product loop below is
// written with it so that each A and B vector is loaded once per k, not once per use).
template <typename T>
struct Vec;
#if defined(FASTMETA_VEC_AVX512)
template <>
struct Vec<float> {
  using R = __m512;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  // c + a b with both factors in registers: GCC would otherwise fold a load of a into every FMA
  // that uses it (PB loads of each A vector per k instead of one)
  static R fma_rr(R a, R b, R c) {
    asm("vfmadd231ps %2, %1, %0" : "+v"(c) : "v"(a), "v"(b));
    return c;
  }
  static R fnma(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  // v where z > 0, else slope * v; for slope 0 (ReLU) 0 where z <= 0, so that a NaN z passes
  // (relu(NaN) = NaN, and PyTorch's ReLU derivative there is 1)
  static R gate(R z, R v, float slope) {
    if (slope == float(0)) return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, zero(), _CMP_NLE_UQ), v);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, zero(), _CMP_GT_OQ), _mm512_mul_ps(set1(slope), v), v);
  }
  static float hsum(R a) { return _mm512_reduce_add_ps(a); }
  static R set1(float v) { return _mm512_set1_ps(v); }
};
template <>
struct Vec<double> {
  using R = __m512d;
  static R zero() { return _mm512_setzero_pd(); }
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static R fma_rr(R a, R b, R c) {
    asm("vfmadd231pd %2, %1, %0" : "+v"(c) : "v"(a), "v"(b));
    return c;
  }
  static R fnma(R a, R b, R c) { return _mm512_fnmadd_pd(a, b, c); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  // v where z > 0, else slope * v; for slope 0 (ReLU) 0 where z <= 0, so that a NaN z passes
  // (relu(NaN) = NaN, and PyTorch's ReLU derivative there is 1)
  static R gate(R z, R v, double slope) {
    if (slope == double(0)) return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(z, zero(), _CMP_NLE_UQ), v);
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(z, zero(), _CMP_GT_OQ), _mm512_mul_pd(set1(slope), v), v);
  }
  static double hsum(R a) { return _mm512_reduce_add_pd(a); }
  static R set1(double v) { return _mm512_set1_pd(v); }
};
constexpr bool kHaveVec = true;
#elif defined(FASTMETA_VEC_AVX2)
// The same register with AVX2 (8 float or 4 double lanes; 16 registers, so smaller tiles below).
template <>
struct Vec<float> {
  using R = __m256;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R fma_rr(R a, R b, R c) {
    asm("vfmadd231ps %2, %1, %0" : "+x"(c) : "x"(a), "x"(b));
    return c;
  }
  static R fnma(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  // v where z > 0, else slope * v; for slope 0 (ReLU) 0 where z <= 0, so that a NaN z passes
  static R gate(R z, R v, float slope) {
    if (slope == float(0)) return _mm256_and_ps(_mm256_cmp_ps(z, zero(), _CMP_NLE_UQ), v);
    return _mm256_blendv_ps(_mm256_mul_ps(set1(slope), v), v, _mm256_cmp_ps(z, zero(), _CMP_GT_OQ));
  }
  static float hsum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static R set1(float v) { return _mm256_set1_ps(v); }
};
template <>
struct Vec<double> {
  using R = __m256d;
  static R zero() { return _mm256_setzero_pd(); }
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static R fma_rr(R a, R b, R c) {
    asm("vfmadd231pd %2, %1, %0" : "+x"(c) : "x"(a), "x"(b));
    return c;
  }
  static R fnma(R a, R b, R c) { return _mm256_fnmadd_pd(a, b, c); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R gate(R z, R v, double slope) {
    if (slope == double(0)) return _mm256_and_pd(_mm256_cmp_pd(z, zero(), _CMP_NLE_UQ), v);
    return _mm256_blendv_pd(_mm256_mul_pd(set1(slope), v), v, _mm256_cmp_pd(z, zero(), _CMP_GT_OQ));
  }
  static double hsum(R a) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static R set1(double v) { return _mm256_set1_pd(v); }
};
constexpr bool kHaveVec = true;
#else
constexpr bool kHaveVec = false;
#endif

// float32 exp, sigmoid, tanh and erf over one register of lanes, for the smooth activations (the
// float64 kernels and the generic build call libm per element). exp: Cephes' expf (k = round(x /
// ln 2), a degree-6 polynomial of x - k ln 2, times 2^k), x clamped to [-87.3, 88] (2^k stays
// normal); tanh: Cephes' tanhf (an odd polynomial for |x| < 0.625, 1 - 2 / (exp(2|x|) + 1) above,
// with x's sign); erf: Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), the form of
// PyTorch's own vectorized CPU erf. NaN stays NaN (the clamps keep it: min / max return their
// second operand where one is NaN).
#if defined(FASTMETA_VEC_AVX512) || defined(FASTMETA_VEC_AVX2)
// Vec<float>'s register primitives (load, store, add, mul, fnma) and the rest they need.
struct VMath : Vec<float> {
  static R set(float v) { return set1(v); }
#if defined(FASTMETA_VEC_AVX512)
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }  // a b + c
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R round(R x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R scale2(R p, R k) { return _mm512_scalef_ps(p, k); }  // p 2^k
  static R abs(R x) { return _mm512_abs_ps(x); }
  static R with_sign_of(R mag, R x) {  // |mag| with x's sign
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(sign, _mm512_castps_si512(mag)),
                                               _mm512_and_si512(sign, _mm512_castps_si512(x))));
  }
  static R below(R x, R t, R a, R b) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, t, _CMP_LT_OQ), b, a); }
#else
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R min(R a, R b) { return _mm256_min_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R round(R x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R scale2(R p, R k) {  // p 2^k for integral k in [-126, 127]
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static R abs(R x) { return _mm256_andnot_ps(set(-0.0f), x); }
  static R with_sign_of(R mag, R x) { return _mm256_or_ps(abs(mag), _mm256_and_ps(set(-0.0f), x)); }
  static R below(R x, R t, R a, R b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, t, _CMP_LT_OQ)); }
#endif
  static R exp(R x) {
    x = max(set(-87.3f), min(set(88.0f), x));
    const R k = round(mul(x, set(1.44269504088896341f)));
    R r = fnma(k, set(0.693359375f), x);
    r = fnma(k, set(-2.12194440e-4f), r);
    R p = set(1.9875691500e-4f);
    p = fma(p, r, set(1.3981999507e-3f));
    p = fma(p, r, set(8.3334519073e-3f));
    p = fma(p, r, set(4.1665795894e-2f));
    p = fma(p, r, set(1.6666665459e-1f));
    p = fma(p, r, set(5.0000001201e-1f));
    p = fma(p, mul(r, r), add(r, set(1.0f)));
    return scale2(p, k);
  }
  static R sigmoid(R x) { return div(set(1.0f), add(set(1.0f), exp(sub(set(0.0f), x)))); }
  static R tanh(R x) {
    const R ax = abs(x), x2 = mul(x, x);
    R p = set(-5.70498872745e-3f);
    p = fma(p, x2, set(2.06390887954e-2f));
    p = fma(p, x2, set(-5.37397155531e-2f));
    p = fma(p, x2, set(1.33314422036e-1f));
    p = fma(p, x2, set(-3.33332819422e-1f));
    const R small = fma(mul(p, x2), x, x);
    const R large = with_sign_of(sub(set(1.0f), div(set(2.0f), add(exp(add(ax, ax)), set(1.0f)))), x);
    return below(ax, set(0.625f), small, large);
  }
  static R erf(R x) {
    const R ax = abs(x);
    const R t = div(set(1.0f), fma(set(0.3275911f), ax, set(1.0f)));
    R p = set(1.061405429f);
    p = fma(p, t, set(-1.453152027f));
    p = fma(p, t, set(1.421413741f));
    p = fma(p, t, set(-0.284496736f));
    p = fma(p, t, set(0.254829592f));
    const R y = fnma(mul(p, t), exp(sub(set(0.0f), mul(ax, ax))), set(1.0f));
    return with_sign_of(y, x);
  }
};

// s, s' and s'' of the smooth activations on a register of float lanes (as ZAct for one element).
struct VAct {
  using M = VMath;
  using R = M::R;
  static constexpr float kInvSqrt2 = 0.70710678118654752440f, kInvSqrt2Pi = 0.39894228040143267794f;
  static constexpr float kC = 0.79788456080286535588f, kK = 0.044715f;
  // t = tanh(u), 1 + t, 1 - t^2 for GELU's tanh form, as ZAct::Tanh (no cancellation near |t| = 1)
  struct Tanh {
    R t, one_plus_t, sech2;
    explicit Tanh(R u) {
      const R e = M::exp(M::mul(M::set(-2.0f), M::abs(u))), inv = M::div(M::set(1.0f), M::add(M::set(1.0f), e));
      t = M::with_sign_of(M::mul(M::sub(M::set(1.0f), e), inv), u);
      one_plus_t = M::mul(M::below(u, M::set(0.0f), M::add(e, e), M::set(2.0f)), inv);
      sech2 = M::mul(M::mul(M::set(4.0f), e), M::mul(inv, inv));
    }
  };
  static R u(R z) { return M::mul(M::set(kC), M::fma(M::mul(M::set(kK), M::mul(z, z)), z, z)); }
  static R du(R z) { return M::mul(M::set(kC), M::fma(M::set(3.0f * kK), M::mul(z, z), M::set(1.0f))); }
  static R pdf(R z) { return M::mul(M::set(kInvSqrt2Pi), M::exp(M::mul(M::set(-0.5f), M::mul(z, z)))); }
  static R cdf(R z) { return M::mul(M::set(0.5f), M::add(M::set(1.0f), M::erf(M::mul(z, M::set(kInvSqrt2))))); }
  static R s(int64_t act, R z) {
    switch (act) {
      case kTanh: return M::tanh(z);
      case kSigmoid: return M::sigmoid(z);
      case kGelu: return M::mul(z, cdf(z));
      case kGeluTanh: return M::mul(M::mul(M::set(0.5f), z), Tanh(u(z)).one_plus_t);
      default: return M::mul(z, M::sigmoid(z));  // kSilu
    }
  }
  static R d1(int64_t act, R z) {
    if (act == kGelu) return M::fma(z, pdf(z), cdf(z));
    if (act == kGeluTanh) {
      const Tanh h(u(z));
      const R half = M::set(0.5f);
      return M::fma(M::mul(M::mul(half, z), h.sech2), du(z), M::mul(half, h.one_plus_t));
    }
    const R g = M::sigmoid(z), one = M::set(1.0f);  // kSilu
    return M::mul(g, M::fma(z, M::sub(one, g), one));
  }
  static R d2(int64_t act, R z) {
    const R one = M::set(1.0f), two = M::set(2.0f);
    if (act == kGelu) return M::mul(pdf(z), M::fnma(z, z, two));
    if (act == kGeluTanh) {
      const Tanh h(u(z));
      const R d = du(z), dd = M::mul(M::set(kC * 6.0f * kK), z);
      const R inner = M::fnma(M::mul(two, h.t), M::mul(d, d), dd);
      return M::mul(h.sech2, M::fma(M::mul(M::set(0.5f), z), inner, d));
    }
    const R g = M::sigmoid(z);  // kSilu
    return M::mul(M::mul(g, M::sub(one, g)), M::fma(z, M::fnma(two, g, one), two));
  }
};
constexpr int kVecFloats = static_cast<int>(sizeof(VMath::R) / sizeof(float));
#endif

// The smooth activations over m elements, on whole registers of float lanes where the build has
// them (VMath), else per element: a = s(z) (tanh, sigmoid, GELU, SiLU); out = s'(z) in and
// acc += s''(z) r d for those whose derivatives are functions of z (from_z).
template <typename T>
void smooth_values(int64_t act, const T* z, T* a, int64_t m) {
  int64_t i = 0;
#if defined(FASTMETA_VEC_AVX512) || defined(FASTMETA_VEC_AVX2)
  if constexpr (std::is_same_v<T, float>)
    for (; i + kVecFloats <= m; i += kVecFloats) VMath::store(a + i, VAct::s(act, VMath::load(z + i)));
#endif
  if (act == kTanh) {
    for (; i < m; ++i) a[i] = std::tanh(z[i]);
  } else if (act == kSigmoid) {
    for (; i < m; ++i) a[i] = T(1) / (T(1) + std::exp(-z[i]));
  } else {
    for (; i < m; ++i) a[i] = ZAct<T>::s(act, z[i]);
  }
}

template <typename T>
void from_z_d1(int64_t act, const T* z, const T* in, T* out, int64_t m) {
  int64_t i = 0;
#if defined(FASTMETA_VEC_AVX512) || defined(FASTMETA_VEC_AVX2)
  if constexpr (std::is_same_v<T, float>)
    for (; i + kVecFloats <= m; i += kVecFloats)
      VMath::store(out + i, VMath::mul(VAct::d1(act, VMath::load(z + i)), VMath::load(in + i)));
#endif
  for (; i < m; ++i) out[i] = ZAct<T>::d1(act, z[i]) * in[i];
}

template <typename T>
void from_z_d2(int64_t act, const T* z, const T* r, const T* d, T* acc, int64_t m) {
  int64_t i = 0;
#if defined(FASTMETA_VEC_AVX512) || defined(FASTMETA_VEC_AVX2)
  if constexpr (std::is_same_v<T, float>)
    for (; i + kVecFloats <= m; i += kVecFloats)
      VMath::store(acc + i, VMath::fma(VMath::mul(VAct::d2(act, VMath::load(z + i)), VMath::load(r + i)),
                                       VMath::load(d + i), VMath::load(acc + i)));
#endif
  for (; i < m; ++i) acc[i] += ZAct<T>::d2(act, z[i]) * r[i] * d[i];
}

// The kinds of epilogue (see Epi), a template parameter of the register blocks: each block then
// holds one epilogue only, small enough for the compiler to keep its accumulators in registers
// (with all of them behind run-time tests it spilled them to the stack on every k).
enum class Ep { kStore, kInit, kAct, kActOut, kGate, kSgd, kSgdRates, kSgdKeep, kInitGate };

template <typename T>
Ep epilogue_kind(const Epi<T>& e) {
  if (e.base != nullptr) return e.keep != nullptr ? Ep::kSgdKeep : e.rates != nullptr ? Ep::kSgdRates : Ep::kSgd;
  if (e.gate != nullptr) return e.init != nullptr ? Ep::kInitGate : Ep::kGate;
  if (e.activate) return e.act_out != nullptr ? Ep::kActOut : Ep::kAct;
  return e.init != nullptr ? Ep::kInit : Ep::kStore;
}

// Epilogue K of one output: C's entry at (lane vectors at C + at * W) from the product acc, in
// column p (for init).
template <typename T, int W, Ep K>
inline void put(const Epi<T>& e, typename Vec<T>::R alpha, T* C, int64_t at, int64_t p, typename Vec<T>::R acc) {
  using V = Vec<T>;
  using R = typename V::R;
  T* c = C + at * W;
  if constexpr (K == Ep::kSgdKeep) {
    const R rate = e.rates != nullptr ? V::set1(e.rates[at]) : alpha;
    V::store(c, V::fnma(rate, acc, V::load(e.base + at * W)));
    T* k = e.keep + at * W;
    V::store(k, e.keep_add ? V::add(V::load(k), acc) : acc);
  } else if constexpr (K == Ep::kSgdRates) {
    V::store(c, V::fnma(V::set1(e.rates[at]), acc, V::load(e.base + at * W)));
  } else if constexpr (K == Ep::kSgd) {
    V::store(c, V::fnma(alpha, acc, V::load(e.base + at * W)));
  } else if constexpr (K == Ep::kGate) {
    V::store(c, V::gate(V::load(e.gate + at * W), acc, e.slope));
  } else if constexpr (K == Ep::kStore) {
    V::store(c, acc);
  } else if constexpr (K == Ep::kInitGate) {
    V::store(c, V::gate(V::load(e.gate + at * W), V::add(V::load(e.init + p * W), acc), e.slope));
  } else {
    const R z = V::add(V::load(e.init + p * W), acc);
    if constexpr (K == Ep::kInit) {
      V::store(c, z);
    } else if constexpr (K == Ep::kAct) {
      V::store(c, V::gate(z, z, e.slope));
    } else {
      V::store(c, z);
      V::store(e.act_out + at * W, V::gate(z, z, e.slope));
    }
  }
}

#if defined(FASTMETA_VEC_AVX512)
// A product with K = 1 (x [M] times y [Pn], the first layer's forward on one input feature, the
// backward into a one-output layer): 8 columns of y held in registers over all M rows, each output
// one multiply and its epilogue, instead of register blocks that each reload their inputs for one
// FMA per accumulator.
template <typename T, int W, Ep K>
void rank1(int64_t M, int64_t Pn, const Prod<T>& x, T* C, int64_t scm, int64_t scp, const Epi<T>& e_in) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int PB = 8;
  // (a local copy: C's stores cannot alias it, so the epilogue's pointers and slope stay in
  // registers instead of being read again after every store)
  const Epi<T> e = e_in;
  const R alpha = V::set1(e.alpha);
  int64_t p = 0;
  for (; p + PB <= Pn; p += PB) {
    R b[PB];
#pragma GCC unroll 8
    for (int j = 0; j < PB; ++j) b[j] = V::load(x.B + (p + j) * x.sbp * W);
    for (int64_t m = 0; m < M; ++m) {
      const R a = V::load(x.A + m * x.sam * W);
#pragma GCC unroll 8
      for (int j = 0; j < PB; ++j) put<T, W, K>(e, alpha, C, m * scm + (p + j) * scp, p + j, V::mul(a, b[j]));
    }
  }
  for (; p < Pn; ++p) {
    const R b = V::load(x.B + p * x.sbp * W);
    for (int64_t m = 0; m < M; ++m)
      put<T, W, K>(e, alpha, C, m * scm + p * scp, p, V::mul(V::load(x.A + m * x.sam * W), b));
  }
}
#endif

// C[m, p] for an MB x PB register block: MB * PB independent accumulator chains hide the FMA
// latency and each loaded A/B vector is used PB/MB times. With Two, x2 adds a second product
// into the same accumulators (pairs such as dz^T a + dz'^T a' of the second-order pass).
template <typename T, int W, int MB, int PB, Ep K, bool Two>
inline void gemm_block(const Prod<T>& x, const Prod<T>* x2, int64_t m, int64_t p, T* C, int64_t scm,
                       int64_t scp, const Epi<T>& e) {
  if constexpr (kHaveVec && W * sizeof(T) == kVecBytes) {
    using V = Vec<T>;
    using R = typename V::R;
    R r[MB][PB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < PB; ++j) r[i][j] = V::zero();
#pragma GCC unroll 2
    for (int t = 0; t < (Two ? 2 : 1); ++t) {
      const Prod<T>& q = t == 0 ? x : *x2;
      const T* __restrict A = q.A + m * q.sam * W;
      const T* __restrict B = q.B + p * q.sbp * W;
      for (int64_t k = 0; k < q.K; ++k) {
        R a[MB], b[PB];
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i) a[i] = V::load(A + (i * q.sam + k * q.sak) * W);
#pragma GCC unroll 8
        for (int j = 0; j < PB; ++j) b[j] = V::load(B + (k * q.sbk + j * q.sbp) * W);
#pragma GCC unroll 8
        for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
          for (int j = 0; j < PB; ++j) r[i][j] = V::fma_rr(a[i], b[j], r[i][j]);
      }
    }
    const R alpha = V::set1(e.alpha);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < PB; ++j) put<T, W, K>(e, alpha, C, (m + i) * scm + (p + j) * scp, p + j, r[i][j]);
    return;
  }
  T acc[MB][PB][W];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < PB; ++j) FM_LANES acc[i][j][l] = T(0);
  for (int t = 0; t < (Two ? 2 : 1); ++t) {
    const Prod<T>& q = t == 0 ? x : *x2;
    const T* __restrict A = q.A + m * q.sam * W;
    const T* __restrict B = q.B + p * q.sbp * W;
    for (int64_t k = 0; k < q.K; ++k) {
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const T* a = A + (i * q.sam + k * q.sak) * W;
#pragma GCC unroll 8
        for (int j = 0; j < PB; ++j) {
          const T* b = B + (k * q.sbk + j * q.sbp) * W;
          FM_LANES acc[i][j][l] += a[l] * b[l];
        }
      }
    }
  }
  // (ReLU: 0 where z <= 0, so that a NaN z passes, as Vec::gate)
  auto gate = [&](T z, T v) { return e.slope == T(0) ? (z <= T(0) ? T(0) : v) : (z > T(0) ? v : e.slope * v); };
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < PB; ++j) {
      const int64_t at = (m + i) * scm + (p + j) * scp;
      T* c = C + at * W;
      const T* ac = acc[i][j];
      if constexpr (K == Ep::kSgd || K == Ep::kSgdRates || K == Ep::kSgdKeep) {
        const T rate = e.rates != nullptr ? e.rates[at] : e.alpha;
        const T* bs = e.base + at * W;
        FM_LANES c[l] = bs[l] - rate * ac[l];
        if constexpr (K == Ep::kSgdKeep) {
          T* k = e.keep + at * W;
          if (e.keep_add) {
            FM_LANES k[l] += ac[l];
          } else {
            FM_LANES k[l] = ac[l];
          }
        }
      } else if constexpr (K == Ep::kGate) {
        const T* g = e.gate + at * W;
        FM_LANES c[l] = gate(g[l], ac[l]);
      } else if constexpr (K == Ep::kStore) {
        FM_LANES c[l] = ac[l];
      } else if constexpr (K == Ep::kInitGate) {
        const T* g = e.gate + at * W;
        const T* in = e.init + (p + j) * W;
        FM_LANES c[l] = gate(g[l], in[l] + ac[l]);
      } else {
        const T* in = e.init + (p + j) * W;
        T* a = K == Ep::kActOut ? e.act_out + at * W : c;
        FM_LANES {
          const T z = in[l] + ac[l];
          if (K != Ep::kAct) c[l] = z;
          if (K != Ep::kInit) a[l] = gate(z, z);
        }
      }
    }
}

// Lane FMAs of one product from which a product of a lone group is shared among the threads
// (gemm_kind): from 2^18 (about 50 us of one core) the split paid in the runs of
// benchmarks/wide_mlp.py (a 15 x 96 x 96 pair of products 1.25-1.47x); at 2^17 it cost more than it
// saved (an MLP of 10 x 128 x 128 first-order products 0.78x).
constexpr int64_t kSplitFmas = int64_t(1) << 18;

// B's size (all lanes) above which gemm_kind sweeps column panels outermost (see there): 4 MB, or
// FASTMETA_MLP_PANEL_BYTES at load (an integer; anything else keeps 4 MB), or
// fastmeta._C._mlp_panel_bytes(n) (0: always; -1: never). At 2 MB (a 256 x 256 weight, 8 float
// lanes) the row-block order was as fast (0.94-1.04x) on a 32 MB L3; at 4.7 MB (384 x 384) the
// panel order 1.26-1.44x faster in second order, 0.96-1.00x in first (benchmarks/RESULTS.md).
std::atomic<int64_t> g_panel_bytes{env_threshold("FASTMETA_MLP_PANEL_BYTES", int64_t(4) << 20)};

// Columns [p0, p1) of C (p0 a multiple of PB; p1 = Pn or a multiple of PB).
template <typename T, int W, int MB, int PB, Ep K, bool Two>
void gemm_cols(int64_t M, int64_t p0, int64_t p1, const Prod<T>& x, const Prod<T>* x2, T* C, int64_t scm,
               int64_t scp, const Epi<T>& e, bool panels) {
  if (panels) {
    int64_t p = p0;
    for (; p + PB <= p1; p += PB) {
      int64_t m = 0;
      for (; m + MB <= M; m += MB) gemm_block<T, W, MB, PB, K, Two>(x, x2, m, p, C, scm, scp, e);
      for (; m < M; ++m) gemm_block<T, W, 1, PB, K, Two>(x, x2, m, p, C, scm, scp, e);
    }
    for (; p < p1; ++p) {
      int64_t m = 0;
      for (; m + MB <= M; m += MB) gemm_block<T, W, MB, 1, K, Two>(x, x2, m, p, C, scm, scp, e);
      for (; m < M; ++m) gemm_block<T, W, 1, 1, K, Two>(x, x2, m, p, C, scm, scp, e);
    }
    return;
  }
  int64_t m = 0;
  for (; m + MB <= M; m += MB) {
    int64_t p = p0;
    for (; p + PB <= p1; p += PB) gemm_block<T, W, MB, PB, K, Two>(x, x2, m, p, C, scm, scp, e);
    for (; p < p1; ++p) gemm_block<T, W, MB, 1, K, Two>(x, x2, m, p, C, scm, scp, e);
  }
  for (; m < M; ++m) {
    int64_t p = p0;
    for (; p + PB <= p1; p += PB) gemm_block<T, W, 1, PB, K, Two>(x, x2, m, p, C, scm, scp, e);
    for (; p < p1; ++p) gemm_block<T, W, 1, 1, K, Two>(x, x2, m, p, C, scm, scp, e);
  }
}

template <typename T, int W, int MB, int PB, Ep K, bool Two>
void gemm_kind(int64_t M, int64_t Pn, const Prod<T>& x, const Prod<T>* x2, T* C, int64_t scm, int64_t scp,
               const Epi<T>& e) {
#if defined(FASTMETA_VEC_AVX512)
  if constexpr (!Two && W * sizeof(T) == kVecBytes) {
    if (x.K == 1) return rank1<T, W, K>(M, Pn, x, C, scm, scp, e);
  }
#endif
  // Row blocks outer: each row block of A stays in L1 while the whole of B streams past it. Where
  // B outgrows the cache (wide layers: a 512 x 512 weight is 8 MB for 8 float lanes) that streams
  // it from memory once per row block, so there the order turns: each column panel of B (PB
  // columns of K entries) stays in cache while all of A's rows stream past it from L2.
  const int64_t depth = x.K + (Two ? x2->K : 0);
  const int64_t b_bytes = depth * Pn * W * static_cast<int64_t>(sizeof(T));
  const int64_t panel_bytes = g_panel_bytes.load(std::memory_order_relaxed);
  const bool panels = panel_bytes >= 0 && b_bytes > panel_bytes && M > MB;
  // Outside a parallel region (one group of tasks, run on the calling thread: a meta-batch that
  // fills one group's lanes) a large product's column panels are shared among the threads, which
  // the groups would otherwise occupy; each thread writes its own columns of C.
  const int64_t panels_n = Pn / PB;
  if (M * Pn * depth >= kSplitFmas && panels_n >= 2 && !at::in_parallel_region() && at::get_num_threads() > 1) {
    at::parallel_for(0, panels_n, 1, [&](int64_t b, int64_t end) {
      gemm_cols<T, W, MB, PB, K, Two>(M, b * PB, end == panels_n ? Pn : end * PB, x, x2, C, scm, scp, e, panels);
    });
    return;
  }
  gemm_cols<T, W, MB, PB, K, Two>(M, 0, Pn, x, x2, C, scm, scp, e, panels);
}

template <typename T, int W, int MB, int PB, bool Two>
void gemm_two(int64_t M, int64_t Pn, const Prod<T>& x, const Prod<T>* x2, T* C, int64_t scm, int64_t scp,
              const Epi<T>& e) {
  switch (epilogue_kind(e)) {
    case Ep::kStore: return gemm_kind<T, W, MB, PB, Ep::kStore, Two>(M, Pn, x, x2, C, scm, scp, e);
    case Ep::kInit: return gemm_kind<T, W, MB, PB, Ep::kInit, Two>(M, Pn, x, x2, C, scm, scp, e);
    case Ep::kAct: return gemm_kind<T, W, MB, PB, Ep::kAct, Two>(M, Pn, x, x2, C, scm, scp, e);
    case Ep::kActOut: return gemm_kind<T, W, MB, PB, Ep::kActOut, Two>(M, Pn, x, x2, C, scm, scp, e);
    case Ep::kGate: return gemm_kind<T, W, MB, PB, Ep::kGate, Two>(M, Pn, x, x2, C, scm, scp, e);
    case Ep::kSgd: return gemm_kind<T, W, MB, PB, Ep::kSgd, Two>(M, Pn, x, x2, C, scm, scp, e);
    case Ep::kSgdRates: return gemm_kind<T, W, MB, PB, Ep::kSgdRates, Two>(M, Pn, x, x2, C, scm, scp, e);
    case Ep::kSgdKeep: return gemm_kind<T, W, MB, PB, Ep::kSgdKeep, Two>(M, Pn, x, x2, C, scm, scp, e);
    case Ep::kInitGate: return gemm_kind<T, W, MB, PB, Ep::kInitGate, Two>(M, Pn, x, x2, C, scm, scp, e);
  }
}

// C [M, Pn] (entry (m, p) at C + (m * scm + p * scp) * W) = the product x (+ x2), in MB x PB
// register blocks (the rest of M and Pn in MB x 1, 1 x PB and 1 x 1 blocks), through e's epilogue.
template <typename T, int W, int MB = kVecTileMB, int PB = kVecTilePB>
void gemm(int64_t M, int64_t Pn, const Prod<T>& x, const Prod<T>* x2, T* C, int64_t scm, int64_t scp,
          const Epi<T>& e = Epi<T>()) {
  if (x2 != nullptr)
    gemm_two<T, W, MB, PB, true>(M, Pn, x, x2, C, scm, scp, e);
  else
    gemm_two<T, W, MB, PB, false>(M, Pn, x, x2, C, scm, scp, e);
}

// Where a backward pass writes a parameter-shaped result r [P, W] (a gradient or a Hessian-vector
// product): out = r, or with base out = base - rate (.) r (rate the scalar alpha or rates[P]);
// out may be base itself (in place). With base and keep, r is also written to keep (added to it
// with keep_add), the gradient a learned rate's gradient needs.
template <typename T>
struct Sink {
  T* out;
  const T* base = nullptr;
  T alpha = T(0);
  const T* rates = nullptr;
  T* keep = nullptr;
  bool keep_add = false;
};

template <typename T, int W>
class Group {
 public:
  // Slots: first order keeps one parameter set (each step's update is written over it: the
  // backward pass reads a layer's weights before it writes their update), or every step's where
  // the query losses after earlier steps count too (all_thetas), and one step's activations; the
  // per-step gradients are kept only when the learned rates need them, and the rates' gradient
  // has one set a step (lr_sets) where the rates are per step.
  Group(const Net& net, int64_t K, int64_t Q, int64_t S, bool first_order, bool keep_grads, bool all_thetas,
        int64_t lr_sets)
      : net_(net), K_(K), Q_(Q), S_(S), fo_(first_order), one_theta_(first_order && !all_thetas), keep_g_(keep_grads) {
    int64_t sumd = 0, sumd_z = 0;  // widths, and those of the layers that keep z apart
    for (int64_t l = 1; l <= net.L; ++l) {
      sumd += net.d[l];
      if (keeps_z(net.acts[l - 1])) sumd_z += net.d[l];
    }
    const int64_t acts_per_row = 3 * sumd + sumd_z;  // a, da, dz (and z) of one row, all layers
    const int64_t NQ = std::max(K, Q), P = net.P;
    dmax_ = *std::max_element(net.d.begin(), net.d.end());
    const int64_t I = net.d[0], D = net.d[net.L];
    const int64_t n_theta = one_theta_ ? 1 : S + 1, n_g = keep_grads ? S : 0;
    const int64_t n_steps = first_order ? std::min<int64_t>(S, 1) : S;
    const int64_t n = n_theta * P + n_g * P + (n_steps * K + NQ) * acts_per_row + 2 * K * sumd +
                      2 * K * dmax_ + (2 + lr_sets) * P + K * I + Q * I + (K + Q) * D + K * D + dmax_;
    T* p = static_cast<T*>(workspace(static_cast<size_t>(n) * W * sizeof(T)));
    auto take = [&](int64_t count) { T* q = p; p += count * W; return q; };
    theta = take(n_theta * P);
    g = take(n_g * P);
    steps.resize(n_steps);
    for (int64_t s = 0; s < n_steps; ++s) carve(steps[s], K, take);
    carve(query, NQ, take);
    Rz.resize(net.L); Ra.resize(net.L);
    for (int64_t l = 1; l <= net.L; ++l) { Rz[l - 1] = take(K * net.d[l]); Ra[l - 1] = take(K * net.d[l]); }
    Rda = take(K * dmax_); Rdz = take(K * dmax_);
    v = take(P); u = take(P); dlr = take(lr_sets * P);
    xs = take(K * I); xq = take(Q * I); ys = take(K * D); yq = take(Q * D); scratch = take(K * D);
    bsum = take(dmax_);
  }
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  T *theta, *g, *v, *u, *dlr, *xs, *xq, *ys, *yq, *scratch, *bsum;
  // Where step s keeps its parameters theta_s [P, W], gradient g_s and activations.
  T* theta_at(int64_t s) const { return theta + (one_theta_ ? 0 : s) * net_.P * W; }
  T* g_at(int64_t s) const { return g + (keep_g_ ? s : 0) * net_.P * W; }
  Acts<T>& acts_at(int64_t s) { return steps[fo_ ? 0 : s]; }
  std::vector<Acts<T>> steps;
  Acts<T> query;

  // z_l = a_{l-1} W_l^T + b_l, a_l = act(z_l) for rows x [N, d_0, W] at parameters th [P, W].
  void forward(const T* th, const T* x, int64_t N, Acts<T>& A) const {
    for (int64_t l = 1; l <= net_.L; ++l) {
      const int64_t din = net_.d[l - 1], dout = net_.d[l];
      const T* Wl = th + net_.offW[l - 1] * W;
      const T* b = th + net_.offb[l - 1] * W;
      const T* ain = l == 1 ? x : A.a[l - 2];
      // z[n, o] = b[o] + sum_i ain[n, i] W[o, i], written as a = s(z) by the product's epilogue
      // (ReLU, leaky ReLU, linear) or then in place (tanh, sigmoid); z kept apart only where a's
      // sign is not z's (see keeps_z)
      const int64_t act = net_.acts[l - 1];
      Epi<T> e;
      e.init = b;
      if (act == kRelu || act == kLeaky) {
        e.activate = true;
        e.slope = act == kLeaky ? static_cast<T>(net_.slope) : T(0);
        if (keeps_z(act)) e.act_out = A.a[l - 1];
      }
      T* out = keeps_z(act) ? A.z[l - 1] : A.a[l - 1];
      gemm<T, W, kFwdMB, kFwdPB>(N, dout, Prod<T>{ain, din, 1, Wl, 1, din, din}, nullptr, out, dout, 1, e);
      if (!piecewise_linear(act)) activate(act, out, A.a[l - 1], N * dout);
    }
  }

  void activate(int64_t act, const T* z, T* a, int64_t n) const {
    const T slope = static_cast<T>(net_.slope);
    const int64_t m = n * W;
    switch (act) {
      case kRelu:
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) { const T v = z[i]; a[i] = v <= T(0) ? T(0) : v; }  // relu(NaN) = NaN
        break;
      case kLeaky:
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) { const T v = z[i]; a[i] = v > T(0) ? v : slope * v; }
        break;
      case kTanh: case kSigmoid: case kGelu: case kGeluTanh: case kSilu: smooth_values(act, z, a, m); break;
      default: std::copy(z, z + m, a);
    }
  }

  // out = s'(z) * in elementwise over m lanes-elements; s' from z and a = s(z). The piecewise
  // cases read `in` unconditionally: written as `z > 0 ? in[i] : 0` GCC emits a masked load whose
  // merge operand it spills to the stack every iteration.
  void mul_d1(int64_t act, const T* z, const T* a, const T* in, T* out, int64_t n) const {
    const T slope = static_cast<T>(net_.slope);
    const int64_t m = n * W;
    switch (act) {
      case kRelu:
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) { const T v = in[i]; out[i] = z[i] <= T(0) ? T(0) : v; }
        break;
      case kLeaky:
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) { const T v = in[i]; out[i] = z[i] > T(0) ? v : slope * v; }
        break;
      case kTanh:
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) out[i] = (T(1) - a[i] * a[i]) * in[i];
        break;
      case kSigmoid:
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) out[i] = a[i] * (T(1) - a[i]) * in[i];
        break;
      case kGelu: case kGeluTanh: case kSilu: from_z_d1(act, z, in, out, m); break;
      default: std::copy(in, in + m, out);
    }
  }

  // Loss of a_L against targets y [N, D, W] (mse) or labels (cross-entropy, as T values in y) and
  // its gradient into A.da[L-1]; returns the per-lane loss in loss_out[W].
  // The loss gradient is scaled by `scale` (a step's weight in the multi-step loss); the loss is not.
  void loss_grad(Acts<T>& A, int64_t N, const T* y, int64_t loss, T* loss_out, T scale = T(1)) const {
    const int64_t D = net_.d[net_.L];
    const T* a = A.a[net_.L - 1];
    T* da = A.da[net_.L - 1];
    T total[W];
    FM_LANES total[l] = T(0);
    if (loss == 0) {
      const T factor = scale * T(2) / static_cast<T>(N * D);
      for (int64_t i = 0; i < N * D; ++i) {
        FM_LANES {
          const T diff = a[i * W + l] - y[i * W + l];
          total[l] += diff * diff;
          da[i * W + l] = factor * diff;
        }
      }
      FM_LANES loss_out[l] = total[l] / static_cast<T>(N * D);
      return;
    }
    const T invN = T(1) / static_cast<T>(N);
    for (int64_t n = 0; n < N; ++n) {
      const T* row = a + n * D * W;
      T* drow = da + n * D * W;
      T m[W], sum[W];
      FM_LANES { m[l] = row[l]; sum[l] = T(0); }
      for (int64_t c = 1; c < D; ++c) FM_LANES m[l] = std::max(m[l], row[c * W + l]);
      for (int64_t c = 0; c < D; ++c)
        for (int l = 0; l < W; ++l) { drow[c * W + l] = std::exp(row[c * W + l] - m[l]); sum[l] += drow[c * W + l]; }
      for (int64_t c = 0; c < D; ++c) FM_LANES drow[c * W + l] *= scale * invN / sum[l];
      for (int l = 0; l < W; ++l) {
        const int64_t label = static_cast<int64_t>(y[n * W + l]);
        drow[label * W + l] -= scale * invN;
        total[l] += std::log(sum[l]) + m[l] - row[label * W + l];
      }
    }
    FM_LANES loss_out[l] = total[l] * invN;
  }

  // Backward from A.da[L-1]: dz_l, da_l (l < L) and the gradient, written to sink (e.g. as the
  // SGD step theta - alpha (.) gradient).
  // Below the top layer, a ReLU / leaky ReLU / linear layer's dz is written by the product that
  // gives its da (s' applied in the gemm's epilogue, one pass less over the activations); its da
  // is then not stored (only the second derivative terms of the smooth activations read it).
  void backward(const T* th, const T* x, int64_t N, Acts<T>& A, const Sink<T>& sink) const {
    for (int64_t l = net_.L; l >= 1; --l) {
      const int64_t din = net_.d[l - 1], dout = net_.d[l];
      const T* Wl = th + net_.offW[l - 1] * W;
      const T* ain = l == 1 ? x : A.a[l - 2];
      T* dz = A.dz[l - 1];
      if (l == net_.L || !piecewise_linear(net_.acts[l - 1]))
        mul_d1(net_.acts[l - 1], A.z[l - 1], A.a[l - 1], A.da[l - 1], dz, N * dout);
      if (l > 1) {
        const int64_t below = net_.acts[l - 2];
        Epi<T> e;
        T* out = A.da[l - 2];
        if (piecewise_linear(below)) {
          out = A.dz[l - 2];
          gate_by(e, below, A.z[l - 2]);
        }
        gemm<T, W, kDaMB, kDaPB>(N, din, Prod<T>{dz, dout, 1, Wl, din, 1, dout}, nullptr, out, din, 1, e);
      }
      outer(Prod<T>{dz, 1, dout, ain, din, 1, N}, nullptr, l, sink);
    }
  }

  static bool piecewise_linear(int64_t act) { return act == kNone || act == kRelu || act == kLeaky; }

  // e's epilogue multiplies by s'(z) of a piecewise-linear act (ReLU / leaky ReLU: gated by z's
  // sign; linear: nothing to apply), as mul_d1 would in a pass of its own.
  void gate_by(Epi<T>& e, int64_t act, const T* z) const {
    if (act == kNone) return;
    e.gate = z;
    e.slope = act == kLeaky ? static_cast<T>(net_.slope) : T(0);
  }

  // Whether a layer keeps its pre-activations z apart from a = s(z). Only the sign of z is read
  // (ReLU and leaky ReLU derivatives) and tanh / sigmoid derivatives come from a, so z shares a's
  // storage except under a leaky ReLU of negative slope, where a > 0 does not mean z > 0, and
  // under GELU and SiLU, whose derivatives are functions of z (from_z).
  bool keeps_z(int64_t act) const { return (act == kLeaky && net_.slope < 0) || from_z(act); }

  // Layer l's part of a parameter-shaped result: W_l [dout, din] = the product x (+ x2) over the
  // N rows, b_l = sum over rows of x's A (dz [N, dout]), written to sink.
  void outer(const Prod<T>& x, const Prod<T>* x2, int64_t l, const Sink<T>& sink) const {
    const int64_t din = net_.d[l - 1], dout = net_.d[l], N = x.K;
    const int64_t oW = net_.offW[l - 1], ob = net_.offb[l - 1];
    Epi<T> e;
    e.base = sink.base != nullptr ? sink.base + oW * W : nullptr;
    e.alpha = sink.alpha;
    e.rates = sink.rates != nullptr ? sink.rates + oW : nullptr;
    e.keep = sink.keep != nullptr && sink.base != nullptr ? sink.keep + oW * W : nullptr;
    e.keep_add = sink.keep_add;
    if (x2 != nullptr)
      gemm<T, W>(dout, din, x, x2, sink.out + oW * W, din, 1, e);
    else
      gemm<T, W, kOuterMB, kOuterPB>(dout, din, x, nullptr, sink.out + oW * W, din, 1, e);
    bias_sums(x.A, N, dout, ob, sink);
  }

  // b_l's part: the column sums of dz [N, dout] (lane vectors), written to sink at offset ob.
  void bias_sums(const T* dz, int64_t N, int64_t dout, int64_t ob, const Sink<T>& sink) const {
    auto put = [&](int64_t o, const T* accb) {
      T* out = sink.out + (ob + o) * W;
      if (sink.base != nullptr) {
        const T r = sink.rates != nullptr ? sink.rates[ob + o] : sink.alpha;
        const T* bs = sink.base + (ob + o) * W;
        FM_LANES out[l] = bs[l] - r * accb[l];
        if (sink.keep != nullptr) {
          T* k = sink.keep + (ob + o) * W;
          if (sink.keep_add) {
            FM_LANES k[l] += accb[l];
          } else {
            FM_LANES k[l] = accb[l];
          }
        }
      } else {
        FM_LANES out[l] = accb[l];
      }
    };
    int64_t o = 0;
    if constexpr (kHaveVec && W * sizeof(T) == kVecBytes) {  // 8 columns at a time in registers
      using V = Vec<T>;
      constexpr int CB = 8;
      for (; o + CB <= dout; o += CB) {
        typename V::R r[CB];
#pragma GCC unroll 8
        for (int j = 0; j < CB; ++j) r[j] = V::zero();
        for (int64_t n = 0; n < N; ++n) {
#pragma GCC unroll 8
          for (int j = 0; j < CB; ++j) r[j] = V::add(r[j], V::load(dz + (n * dout + o + j) * W));
        }
        alignas(64) T acc[CB * W];
#pragma GCC unroll 8
        for (int j = 0; j < CB; ++j) V::store(acc + j * W, r[j]);
        for (int j = 0; j < CB; ++j) put(o + j, acc + j * W);
      }
    }
    // the rest row by row (independent sums over the lanes, no dependency chain per entry)
    const int64_t m = (dout - o) * W;
    if (m == 0) return;
    std::fill(bsum, bsum + m, T(0));
    for (int64_t n = 0; n < N; ++n) {
      const T* row = dz + (n * dout + o) * W;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) bsum[i] += row[i];
    }
    for (int64_t j = 0; o + j < dout; ++j) put(o + j, bsum + j * W);
  }

  // H u, the Hessian of the support loss at th (activations A of that step) times u, written to
  // sink; sink may write over u itself (each layer's part of u is read before it is written).
  void hvp(const T* th, const T* x, const Acts<T>& A, const T* du, int64_t loss, const Sink<T>& sink) {
    const int64_t N = K_, L = net_.L;
    for (int64_t l = 1; l <= L; ++l) {  // R-forward
      const int64_t din = net_.d[l - 1], dout = net_.d[l];
      const T* Wl = th + net_.offW[l - 1] * W;
      const T* dW = du + net_.offW[l - 1] * W;
      const T* db = du + net_.offb[l - 1] * W;
      const T* ain = l == 1 ? x : A.a[l - 2];
      const T* rain = l == 1 ? nullptr : Ra[l - 2];
      const int64_t act = net_.acts[l - 1];
      Epi<T> e;
      e.init = db;
      // a ReLU / leaky ReLU / linear layer's Ra = s'(z) Rz is written by the product's epilogue
      // (its Rz is not stored: only the smooth activations' second-derivative terms read it)
      T* out = Rz[l - 1];
      if (piecewise_linear(act)) {
        out = Ra[l - 1];
        gate_by(e, act, A.z[l - 1]);
      }
      const Prod<T> x2{rain, din, 1, Wl, 1, din, din};
      gemm<T, W>(N, dout, Prod<T>{ain, din, 1, dW, 1, din, din}, rain != nullptr ? &x2 : nullptr, out, dout, 1, e);
      if (!piecewise_linear(act)) mul_d1(act, A.z[l - 1], A.a[l - 1], out, Ra[l - 1], N * dout);
    }
    const int64_t D = net_.d[L];
    const T* raL = Ra[L - 1];
    if (loss == 0) {
      const T scale = T(2) / static_cast<T>(N * D);
#pragma omp simd
      for (int64_t i = 0; i < N * D * W; ++i) Rda[i] = scale * raL[i];
    } else {
      // Rd = (diag(p) - p p^T) Ra / N per row, p = softmax(a_L) = N * da + onehot.
      const T invN = T(1) / static_cast<T>(N);
      const T* aL = A.a[L - 1];
      for (int64_t n = 0; n < N; ++n) {
        T m[W], sum[W], pr[W];
        FM_LANES { m[l] = aL[n * D * W + l]; sum[l] = T(0); pr[l] = T(0); }
        for (int64_t c = 1; c < D; ++c) FM_LANES m[l] = std::max(m[l], aL[(n * D + c) * W + l]);
        for (int64_t c = 0; c < D; ++c)
          for (int l = 0; l < W; ++l) { scratch[c * W + l] = std::exp(aL[(n * D + c) * W + l] - m[l]); sum[l] += scratch[c * W + l]; }
        for (int64_t c = 0; c < D; ++c)
          FM_LANES { scratch[c * W + l] /= sum[l]; pr[l] += scratch[c * W + l] * raL[(n * D + c) * W + l]; }
        for (int64_t c = 0; c < D; ++c)
          FM_LANES Rda[(n * D + c) * W + l] = scratch[c * W + l] * (raL[(n * D + c) * W + l] - pr[l]) * invN;
      }
    }
    // Rda_l and Rdz_l in two buffers whose roles swap where the product of layer l + 1 writes
    // Rdz_l itself (gated: a ReLU / leaky ReLU / linear layer below it, as in backward)
    T *rda = Rda, *rdz = Rdz;
    bool gated = false;
    for (int64_t l = L; l >= 1; --l) {  // R-backward
      const int64_t din = net_.d[l - 1], dout = net_.d[l], act = net_.acts[l - 1];
      const T* Wl = th + net_.offW[l - 1] * W;
      const T* dW = du + net_.offW[l - 1] * W;
      const T* ain = l == 1 ? x : A.a[l - 2];
      const T *z = A.z[l - 1], *a = A.a[l - 1], *da = A.da[l - 1], *dz = A.dz[l - 1];
      const T* rz = Rz[l - 1];
      if (!gated) {  // (gated: written by layer l + 1's product; piecewise linear, no s'' terms)
        mul_d1(act, z, a, rda, rdz, N * dout);
        if (from_z(act)) {  // + s''(z) Rz da
          from_z_d2(act, z, rz, da, rdz, N * dout * W);
        } else if (act == kTanh || act == kSigmoid) {
          const int64_t m = N * dout * W;
          if (act == kTanh) {
#pragma omp simd
            for (int64_t i = 0; i < m; ++i) rdz[i] += T(-2) * a[i] * (T(1) - a[i] * a[i]) * rz[i] * da[i];
          } else {
#pragma omp simd
            for (int64_t i = 0; i < m; ++i) rdz[i] += a[i] * (T(1) - a[i]) * (T(1) - T(2) * a[i]) * rz[i] * da[i];
          }
        }
      }
      if (l > 1) {  // Rda_{l-1} = Rdz W_l + dz dW_l, before the sink may overwrite dW_l
        const int64_t below = net_.acts[l - 2];
        Epi<T> e;
        gated = piecewise_linear(below);
        if (gated) gate_by(e, below, A.z[l - 2]);  // written as Rdz_{l-1} = s'(z_{l-1}) Rda_{l-1}
        const Prod<T> x2{dz, dout, 1, dW, din, 1, dout};
        gemm<T, W>(N, din, Prod<T>{rdz, dout, 1, Wl, din, 1, dout}, &x2, rda, din, 1, e);
        const Prod<T> h2{dz, 1, dout, Ra[l - 2], din, 1, N};
        outer(Prod<T>{rdz, 1, dout, ain, din, 1, N}, &h2, l, sink);
        if (gated) std::swap(rda, rdz);  // (rda's buffer now holds Rdz_{l-1})
      } else {
        outer(Prod<T>{rdz, 1, dout, ain, din, 1, N}, nullptr, l, sink);
      }
    }
  }

 private:
  template <typename Take>
  void carve(Acts<T>& A, int64_t N, Take& take) {
    for (auto* vec : {&A.a, &A.da, &A.dz}) {
      vec->resize(net_.L);
      for (int64_t l = 1; l <= net_.L; ++l) (*vec)[l - 1] = take(N * net_.d[l]);
    }
    A.z.resize(net_.L);
    for (int64_t l = 1; l <= net_.L; ++l)
      A.z[l - 1] = keeps_z(net_.acts[l - 1]) ? take(N * net_.d[l]) : A.a[l - 1];
  }

  const Net& net_;
  int64_t K_, Q_, S_, dmax_;
  bool fo_, one_theta_, keep_g_;
  std::vector<T*> Rz, Ra;
  T *Rda, *Rdz;
};

// Copies rows src[t] ([n] values each) of the group's tasks into dst [n, W] (lane = task).
template <typename T, int W, typename S>
void gather(const S* src, int64_t n, const int64_t* tasks, T* dst) {
  for (int l = 0; l < W; ++l) {
    const S* row = src + tasks[l] * n;
    for (int64_t i = 0; i < n; ++i) dst[i * W + l] = static_cast<T>(row[i]);
  }
}

// Where run() writes its results: per task (loss [T], dtheta [T, P], dlr [T, P]) or, with
// per_group, the sums over each group's tasks (loss [G], dtheta [G, P], dlr [G, P]) for a caller
// that wants only the task mean (mlp_meta_grad); dlr is null unless need_lr_grad.
template <typename T>
struct Out {
  bool per_group;
  T *loss, *dtheta, *dlr;
};

#if defined(FASTMETA_VEC_AVX512)
// The 16 lane sums of 16 vectors v[0..15] (at src, one after another) as one vector: a tree of 15
// pairwise steps (two shuffles and an add each) instead of a horizontal reduction per vector.
inline __m512 sums16(const float* src, __mmask16 keep) {
  __m512 s[8], u[4], w[2];
  for (int i = 0; i < 8; ++i) {  // pairs within each 128-bit lane: [a0+a2 b0+b2 a1+a3 b1+b3]
    const __m512 a = _mm512_maskz_loadu_ps(keep, src + (2 * i) * 16);
    const __m512 b = _mm512_maskz_loadu_ps(keep, src + (2 * i + 1) * 16);
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i)  // [a b c d] per 128-bit lane
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // the 128-bit lanes pairwise
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}
#endif

// dst[j] = sum_l src[j, l] mask[l] for src [n, W] (mask 0 or 1 per lane).
template <typename T, int W>
void lane_sums(const T* src, int64_t n, const T* mask, T* dst) {
  int64_t j = 0;
#if defined(FASTMETA_VEC_AVX512)
  if constexpr (std::is_same_v<T, float> && W == 16) {  // 16 entries at a time
    __mmask16 keep = 0;
    for (int l = 0; l < W; ++l) keep |= static_cast<__mmask16>(mask[l] != T(0)) << l;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(dst + j, sums16(src + j * W, keep));
  }
#endif
  if constexpr (kHaveVec && W * sizeof(T) == kVecBytes) {  // one in-register reduction per entry
    using V = Vec<T>;
    const typename V::R m = V::load(mask);
    for (; j < n; ++j) dst[j] = V::hsum(V::mul(V::load(src + j * W), m));
    return;
  }
  for (; j < n; ++j) {
    T s = T(0);
#pragma omp simd reduction(+ : s)
    for (int l = 0; l < W; ++l) s += src[j * W + l] * mask[l];
    dst[j] = s;
  }
}

// The meta-parameters [W_1, b_1, ...] as one flat vector in the net's layout.
template <typename T>
std::vector<T> flat_params(const Net& net, const std::vector<at::Tensor>& params) {
  std::vector<T> theta0(net.P);
  for (int64_t l = 1; l <= net.L; ++l) {
    const auto& Wt = params[2 * (l - 1)];
    const auto& b = params[2 * (l - 1) + 1];
    std::copy(Wt.data_ptr<T>(), Wt.data_ptr<T>() + Wt.numel(), theta0.begin() + net.offW[l - 1]);
    std::copy(b.data_ptr<T>(), b.data_ptr<T>() + b.numel(), theta0.begin() + net.offb[l - 1]);
  }
  return theta0;
}

// A set's rows (inputs x [T, N, I]; targets y [T, N, D] for mse, labels [T, N] for cross-entropy)
// of the group's tasks into the group's lane buffers.
template <typename T, int W>
void gather_set(const at::Tensor& x, const at::Tensor& y, int64_t N, int64_t I, int64_t D, int64_t loss,
                const int64_t* tasks, T* xdst, T* ydst) {
  gather<T, W>(x.data_ptr<T>(), N * I, tasks, xdst);
  if (loss == 0)
    gather<T, W>(y.data_ptr<T>(), N * D, tasks, ydst);
  else
    gather<T, W>(y.data_ptr<int64_t>(), N, tasks, ydst);
}

// work(claim) on up to the pool's threads (each with its own workspace), claim() giving the next
// group of tasks to run (>= groups: none left). Threads claim groups one at a time (each writes
// only its groups' outputs, so the result does not depend on which thread ran which): a thread
// that starts late, or is descheduled on a shared machine, leaves its groups to the others
// instead of holding up the call. A lone group runs here, outside a parallel region, so that its
// large products can share the threads (gemm_kind).
template <typename Work>
void over_groups(int64_t groups, const Work& work) {
  const int64_t workers = std::min<int64_t>(groups, at::get_num_threads());
  std::atomic<int64_t> next_group{0};
  const auto body = [&](int64_t, int64_t) { work([&] { return next_group++; }); };
  if (workers <= 1)
    body(0, 1);
  else
    at::parallel_for(0, workers, 1, body);
}

// lrflat: null (the scalar lr), P rates (the same at every step) or S * P (step s's at s * P, with
// per_step_lr). weights: null (the query loss after the last step), or S weights, w[s] that of
// the query loss at theta_{s+1}; a weight of 0 is not evaluated.
template <typename T, int W>
void run(const Net& net, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
         const at::Tensor& yq, const std::vector<at::Tensor>& params, const T* lrflat, bool per_step_lr, T lr,
         const T* weights, int64_t S, int64_t loss, bool first_order, bool need_lr_grad, const Out<T>& out) {
  const int64_t Tn = xs.size(0), K = xs.size(1), Q = xq.size(1), I = net.d[0], D = net.d[net.L];
  const int64_t P = net.P;
  const int64_t lr_sets = per_step_lr ? S : 1, Plr = lr_sets * P;
  auto rates_at = [&](int64_t s) { return lrflat == nullptr ? nullptr : lrflat + (per_step_lr ? s * P : 0); };
  // the weight of the query loss at theta_s (s = 1..S)
  auto weight_at = [&](int64_t s) { return weights == nullptr ? T(s == S ? 1 : 0) : weights[s - 1]; };
  const std::vector<T> theta0 = flat_params<T>(net, params);
  const int64_t groups = (Tn + W - 1) / W;
  // First order with the query loss after the last step alone: every step's rate gradient is
  // -g_s (.) v with the same v (the query gradient at theta_S), so the steps' gradients go straight
  // into the rates' gradient buffer (their sum, or with per-step rates one slot a step), scaled by
  // -v at the end, and no gradient is kept apart.
  const bool grads_in_dlr = need_lr_grad && first_order && weights == nullptr;
  over_groups(groups, [&](const auto& claim) {
    Group<T, W> gp(net, K, Q, S, first_order, need_lr_grad && !grads_in_dlr, weights != nullptr, lr_sets);
    for (int64_t grp = claim(); grp < groups; grp = claim()) {
      int64_t tasks[W];
      for (int l = 0; l < W; ++l) tasks[l] = std::min(grp * W + l, Tn - 1);  // pad with the last task
      gather_set<T, W>(xs, ys, K, I, D, loss, tasks, gp.xs, gp.ys);
      gather_set<T, W>(xq, yq, Q, I, D, loss, tasks, gp.xq, gp.yq);
      for (int64_t j = 0; j < P; ++j) FM_LANES gp.theta[j * W + l] = theta0[j];
      T lane_loss[W], step_loss[W];
      if (need_lr_grad) std::fill(gp.dlr, gp.dlr + Plr * W, T(0));
      for (int64_t s = 0; s < S; ++s) {
        const T* th = gp.theta_at(s);
        T* next = gp.theta_at(s + 1);
        const T* rates = rates_at(s);
        gp.forward(th, gp.xs, K, gp.acts_at(s));
        gp.loss_grad(gp.acts_at(s), K, gp.ys, loss, lane_loss);
        // the backward pass writes theta_{s+1} = theta_s - alpha (.) g_s directly; the learned
        // rates' gradient needs every g_s too: kept (in the rates' buffer where it suffices)
        Sink<T> step{next, th, lr, rates};
        if (grads_in_dlr) {
          step.keep = gp.dlr + (per_step_lr ? s * P * W : 0);
          step.keep_add = !per_step_lr;
        } else if (need_lr_grad) {
          step.keep = gp.g_at(s);
        }
        gp.backward(th, gp.xs, K, gp.acts_at(s), step);
      }
      // v_S: the weighted query gradient at theta_S (0 for a weight of 0, not evaluated)
      FM_LANES lane_loss[l] = T(0);
      const T wS = weight_at(S);
      if (wS != T(0)) {
        const T* thS = gp.theta_at(S);
        gp.forward(thS, gp.xq, Q, gp.query);
        gp.loss_grad(gp.query, Q, gp.yq, loss, step_loss, wS);
        gp.backward(thS, gp.xq, Q, gp.query, Sink<T>{gp.v});
        FM_LANES lane_loss[l] = weights == nullptr ? step_loss[l] : wS * step_loss[l];
      } else {
        std::fill(gp.v, gp.v + P * W, T(0));
      }
      if (grads_in_dlr) {  // dlr = -(sum of the g_s) (.) v, or per step -g_s (.) v
        for (int64_t s = 0; s < lr_sets; ++s) {
          T* dlr = gp.dlr + s * P * W;
#pragma omp simd
          for (int64_t j = 0; j < P * W; ++j) dlr[j] = -dlr[j] * gp.v[j];
        }
      }
      for (int64_t s = S - 1; s >= 0; --s) {
        const T* rates = rates_at(s);
        if (need_lr_grad && !grads_in_dlr) {
          const T* gs = gp.g_at(s);
          T* dlr = gp.dlr + (per_step_lr ? s * P * W : 0);
#pragma omp simd
          for (int64_t j = 0; j < P * W; ++j) dlr[j] -= gs[j] * gp.v[j];
        }
        if (!first_order) {
          // v_s = v_{s+1} - H_s (alpha (.) v_{s+1}), in place: with a scalar alpha H_s is applied to
          // v itself and scaled by alpha as it is subtracted; Meta-SGD first forms u = alpha (.) v.
          if (rates) {
            for (int64_t j = 0; j < P; ++j) FM_LANES gp.u[j * W + l] = rates[j] * gp.v[j * W + l];
            gp.hvp(gp.theta_at(s), gp.xs, gp.acts_at(s), gp.u, loss, Sink<T>{gp.v, gp.v, T(1)});
          } else {
            gp.hvp(gp.theta_at(s), gp.xs, gp.acts_at(s), gp.v, loss, Sink<T>{gp.v, gp.v, lr});
          }
        }
        // the query loss at theta_s (the multi-step loss): v_s += w_s grad L_query(theta_s)
        const T ws = s > 0 ? weight_at(s) : T(0);
        if (ws != T(0)) {
          const T* ths = gp.theta_at(s);
          gp.forward(ths, gp.xq, Q, gp.query);
          gp.loss_grad(gp.query, Q, gp.yq, loss, step_loss, ws);
          gp.backward(ths, gp.xq, Q, gp.query, Sink<T>{gp.v, gp.v, T(-1)});
          FM_LANES lane_loss[l] += ws * step_loss[l];
        }
      }
      const int valid = static_cast<int>(std::min<int64_t>(W, Tn - grp * W));
      if (out.per_group) {  // sums over the group's real tasks (padding lanes masked out)
        T mask[W];
        FM_LANES mask[l] = l < valid ? T(1) : T(0);
        T total = T(0);
        for (int l = 0; l < valid; ++l) total += lane_loss[l];
        out.loss[grp] = total;
        lane_sums<T, W>(gp.v, P, mask, out.dtheta + grp * P);
        if (need_lr_grad) lane_sums<T, W>(gp.dlr, Plr, mask, out.dlr + grp * Plr);
      } else {
        for (int l = 0; l < valid; ++l) {
          const int64_t t = grp * W + l;
          out.loss[t] = lane_loss[l];
          for (int64_t j = 0; j < P; ++j) out.dtheta[t * P + j] = gp.v[j * W + l];
          if (need_lr_grad)
            for (int64_t j = 0; j < Plr; ++j) out.dlr[t * Plr + j] = gp.dlr[j * W + l];
        }
      }
    }
  });
}

// The inner loop alone (no query, no meta-gradient): for each task theta_S after S steps from the
// meta-parameters and the support loss at theta_0 (Reptile's update and loss; adapt's values).
// Outputs theta_out [T, P] (each row a task's flat parameters) and loss_out [T].
template <typename T, int W>
void adapt_run(const Net& net, const at::Tensor& xs, const at::Tensor& ys, const std::vector<at::Tensor>& params,
               const T* lrflat, bool per_step_lr, T lr, int64_t S, int64_t loss, T* theta_out, T* loss_out) {
  const int64_t Tn = xs.size(0), K = xs.size(1), I = net.d[0], D = net.d[net.L], P = net.P;
  const std::vector<T> theta0 = flat_params<T>(net, params);
  const int64_t groups = (Tn + W - 1) / W;
  over_groups(groups, [&](const auto& claim) {
    // one parameter set, updated in place by each step's backward pass (first order's slots)
    Group<T, W> gp(net, K, /*Q=*/0, std::max<int64_t>(S, 1), /*first_order=*/true, /*keep_grads=*/false,
                   /*all_thetas=*/false, 1);
    for (int64_t grp = claim(); grp < groups; grp = claim()) {
      int64_t tasks[W];
      for (int l = 0; l < W; ++l) tasks[l] = std::min(grp * W + l, Tn - 1);  // pad with the last task
      gather_set<T, W>(xs, ys, K, I, D, loss, tasks, gp.xs, gp.ys);
      for (int64_t j = 0; j < P; ++j) FM_LANES gp.theta[j * W + l] = theta0[j];
      T first_loss[W], lane_loss[W];
      for (int64_t s = 0; s < std::max<int64_t>(S, 1); ++s) {
        T* th = gp.theta_at(0);
        gp.forward(th, gp.xs, K, gp.acts_at(0));
        gp.loss_grad(gp.acts_at(0), K, gp.ys, loss, s == 0 ? first_loss : lane_loss);
        if (S == 0) break;  // (the loss at theta_0 only)
        const T* rates = lrflat == nullptr ? nullptr : lrflat + (per_step_lr ? s * P : 0);
        gp.backward(th, gp.xs, K, gp.acts_at(0), Sink<T>{th, th, lr, rates});
      }
      const int valid = static_cast<int>(std::min<int64_t>(W, Tn - grp * W));
      for (int l = 0; l < valid; ++l) {
        const int64_t t = grp * W + l;
        loss_out[t] = first_loss[l];
        for (int64_t j = 0; j < P; ++j) theta_out[t * P + j] = gp.theta[j * W + l];
      }
    }
  });
}

}  // namespace

at::Tensor rate_rows_in_op_order(const at::Tensor& rows, at::TensorList params, int64_t steps) {
  const int64_t T = rows.size(0);
  int64_t P = 0;
  for (const auto& p : params) P += p.numel();
  const at::Tensor by_step = rows.view({T, steps, P});
  std::vector<at::Tensor> parts;
  int64_t off = 0;
  for (const auto& p : params) {
    parts.push_back(by_step.narrow(2, off, p.numel()).reshape({T, steps * p.numel()}));
    off += p.numel();
  }
  return at::cat(parts, 1);
}

bool mlp_rates_per_step(at::TensorList params, at::TensorList lrs) {
  return !lrs.empty() && lrs[0].dim() == params[0].dim() + 1;
}

void check_step_weights(at::ArrayRef<double> step_weights, int64_t steps) {
  TORCH_CHECK(step_weights.empty() || static_cast<int64_t>(step_weights.size()) == steps,
              "mlp_inner_loop: step_weights must be empty or one weight a step, got ", step_weights.size(),
              " for steps=", steps);
  for (double w : step_weights)
    TORCH_CHECK(std::isfinite(w), "mlp_inner_loop: step_weights must be finite, got ", step_weights);
}

void check_mlp_args(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
                    at::TensorList params, at::TensorList lrs, int64_t steps, int64_t loss) {
  TORCH_CHECK(params.size() % 2 == 0 && !params.empty(), "mlp_inner_loop: params must be [W_1, b_1, ...], got ",
              params.size(), " tensors");
  TORCH_CHECK(loss == 0 || loss == 1, "mlp_inner_loop: loss must be 0 (mse) or 1 (cross-entropy)");
  TORCH_CHECK(steps >= 0, "mlp_inner_loop: steps must be >= 0, got ", steps);
  TORCH_CHECK(xs.dim() == 3 && xs.is_floating_point(), "mlp_inner_loop: xs must be a floating [T, K, d_0] tensor, got ",
              xs.sizes(), " (", xs.scalar_type(), ")");
  const int64_t T = xs.size(0), K = xs.size(1);
  int64_t width = xs.size(2);
  for (size_t l = 0; l < params.size() / 2; ++l) {
    const at::Tensor &W = params[2 * l], &b = params[2 * l + 1];
    TORCH_CHECK(W.dim() == 2 && b.dim() == 1 && W.size(1) == width && b.size(0) == W.size(0),
                "mlp_inner_loop: layer ", l, " has W ", W.sizes(), " and b ", b.sizes(), "; expected W [O, ", width,
                "] and b [O]");
    for (const at::Tensor* p : {&W, &b}) {
      TORCH_CHECK(p->device() == xs.device() && p->scalar_type() == xs.scalar_type(), "mlp_inner_loop: params[",
                  2 * l + (p == &b), "] is ", p->scalar_type(), " on ", p->device(), " but xs is ", xs.scalar_type(),
                  " on ", xs.device());
    }
    width = W.size(0);
  }
  TORCH_CHECK(lrs.empty() || lrs.size() == params.size(), "mlp_inner_loop: lrs must be empty or one per param, got ",
              lrs.size(), " for ", params.size());
  const bool per_step = mlp_rates_per_step(params, lrs);
  for (size_t i = 0; i < lrs.size(); ++i) {
    std::vector<int64_t> want(params[i].sizes().begin(), params[i].sizes().end());
    if (per_step) want.insert(want.begin(), steps);
    TORCH_CHECK(lrs[i].sizes() == at::IntArrayRef(want) && lrs[i].device() == xs.device(), "mlp_inner_loop: lrs[", i,
                "] ", lrs[i].sizes(), " on ", lrs[i].device(), " must be ", at::IntArrayRef(want),
                per_step ? " (one rate set per step for params[" : " (like params[", i, "] ", params[i].sizes(),
                ") on ", params[i].device());
  }
  TORCH_CHECK(xq.dim() == 3 && xq.size(0) == T && xq.size(2) == xs.size(2) && xq.device() == xs.device() &&
                  xq.scalar_type() == xs.scalar_type(),
              "mlp_inner_loop: xq ", xq.sizes(), " (", xq.scalar_type(), ", ", xq.device(), ") must be [T=", T,
              ", Q, ", xs.size(2), "] like xs ", xs.sizes(), " (", xs.scalar_type(), ", ", xs.device(), ")");
  const int64_t Q = xq.size(1);
  TORCH_CHECK(K > 0 || steps == 0, "mlp_inner_loop: xs ", xs.sizes(), " has no support rows for ", steps, " steps");
  TORCH_CHECK(Q > 0, "mlp_inner_loop: xq ", xq.sizes(), " has no query rows");
  const char* names[] = {"ys", "yq"};
  const at::Tensor* ts[] = {&ys, &yq};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& y = *ts[i];
    const int64_t n = i == 0 ? K : Q;
    if (loss == 0) {
      TORCH_CHECK(y.dim() == 3 && y.size(0) == T && y.size(1) == n && y.size(2) == width &&
                      y.scalar_type() == xs.scalar_type() && y.device() == xs.device(),
                  "mlp_inner_loop: ", names[i], " ", y.sizes(), " (", y.scalar_type(), ", ", y.device(),
                  ") must be [", T, ", ", n, ", ", width, "] mse targets (", xs.scalar_type(), ", ", xs.device(), ")");
    } else {
      TORCH_CHECK(y.dim() == 2 && y.size(0) == T && y.size(1) == n && y.scalar_type() == at::kLong &&
                      y.device() == xs.device(),
                  "mlp_inner_loop: ", names[i], " ", y.sizes(), " (", y.scalar_type(), ", ", y.device(),
                  ") must be [", T, ", ", n, "] int64 class labels on ", xs.device());
    }
  }
}

namespace {

// The arguments of one call, checked and made contiguous, shared by the two entry points.
struct Call {
  Net net;
  std::vector<at::Tensor> params;
  at::Tensor xs, ys, xq, yq, lrflat;
  bool per_step_lr = false;
  std::vector<double> weights;
};

// t's values as a contiguous tensor whose data the kernel can read: a negated or conjugated view
// materialized (what the dispatcher's fallbacks do before a kernel; the direct calls, from Python's
// bindings and csrc/bound_call.cpp, do not pass through them).
at::Tensor readable(const at::Tensor& t) {
  return (t.is_neg() || t.is_conj() ? t.resolve_conj().resolve_neg() : t).contiguous();
}

Call prepare(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
             at::TensorList params, at::TensorList lrs, int64_t steps, at::IntArrayRef acts,
             double negative_slope, int64_t loss, at::ArrayRef<double> step_weights) {
  check_mlp_args(xs, ys, xq, yq, params, lrs, steps, loss);
  check_step_weights(step_weights, steps);
  const int64_t L = static_cast<int64_t>(params.size() / 2);
  TORCH_CHECK(static_cast<int64_t>(acts.size()) == L, "mlp_inner_loop: one activation per layer");
  for (const int64_t a : acts)
    TORCH_CHECK(a >= 0 && a < kActs, "mlp_inner_loop: activation code ", a, " is not one of 0..", kActs - 1);
  Call c;
  Net& net = c.net;
  net.L = L;
  net.slope = negative_slope;
  net.acts.assign(acts.begin(), acts.end());
  net.d.push_back(params[0].size(1));
  int64_t off = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor W = readable(params[2 * l]), b = readable(params[2 * l + 1]);  // (checked above)
    net.d.push_back(W.size(0));
    net.offW.push_back(off); off += W.numel();
    net.offb.push_back(off); off += b.numel();
    c.params.push_back(W); c.params.push_back(b);
  }
  net.P = off;
  c.xs = readable(xs); c.xq = readable(xq);
  c.ys = readable(ys); c.yq = readable(yq);
  if (!lrs.empty()) {
    std::vector<at::Tensor> flat;
    for (const auto& t : lrs)  // (no .to() for a rate of the right dtype: an op must not return its input)
      flat.push_back(readable(t.scalar_type() == xs.scalar_type() ? t : t.to(xs.scalar_type())).reshape({-1}));
    c.per_step_lr = mlp_rates_per_step(params, lrs);
    if (c.per_step_lr) {  // [S, P]: step s's rates of every parameter, in the parameters' order
      for (auto& f : flat) f = f.view({steps, f.numel() / std::max<int64_t>(steps, 1)});
      c.lrflat = at::cat(flat, 1).reshape({-1});
    } else {
      c.lrflat = at::cat(flat);
    }
    TORCH_CHECK(c.lrflat.numel() == (c.per_step_lr ? steps : 1) * net.P,
                "mlp_inner_loop: lrs must match the params' shapes");
  }
  c.weights.assign(step_weights.begin(), step_weights.end());
  return c;
}

template <typename T>
void dispatch_run(const Call& c, double lr, int64_t steps, int64_t loss, bool first_order, bool need_lr_grad,
                  const Out<T>& out) {
  constexpr int W = kVecBytes / static_cast<int>(sizeof(T));
  std::vector<T> weights(c.weights.begin(), c.weights.end());
  run<T, W>(c.net, c.xs, c.ys, c.xq, c.yq, c.params, c.lrflat.defined() ? c.lrflat.data_ptr<T>() : nullptr,
            c.per_step_lr, static_cast<T>(lr), weights.empty() ? nullptr : weights.data(), steps, loss, first_order,
            need_lr_grad, out);
}

// The rates' entries (P, or S * P per step): the width of the rate gradient's rows.
int64_t rate_entries(const Call& c, int64_t steps) { return (c.per_step_lr ? steps : 1) * c.net.P; }

}  // namespace

int64_t workspace_bytes() { return g_workspace_bytes.load(); }

at::Tensor activation_values(const at::Tensor& z, int64_t act, int64_t order) {
  TORCH_CHECK(z.is_cpu() && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              "_activation_values: z must be a float32 or float64 CPU tensor, got ", z.scalar_type(), " on ",
              z.device());
  TORCH_CHECK(act >= kTanh && act < kActs && (order == 0 || (order <= 2 && from_z(act))), "_activation_values: "
              "order 0 of activation codes 3..7, orders 1 and 2 of codes 5..7; got code ", act, " order ", order);
  const at::Tensor x = z.contiguous();
  at::Tensor out = order == 2 ? at::zeros_like(x) : at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_activation_values", [&] {
    const scalar_t* zp = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t m = x.numel();
    if (order == 0) {
      smooth_values(act, zp, o, m);
    } else {
      const std::vector<scalar_t> ones(m, scalar_t(1));
      if (order == 1)
        from_z_d1(act, zp, ones.data(), o, m);
      else
        from_z_d2(act, zp, ones.data(), ones.data(), o, m);
    }
  });
  return out;
}

int64_t mlp_panel_bytes(int64_t bytes) {
  return bytes < -1 ? g_panel_bytes.load() : g_panel_bytes.exchange(bytes);
}

int64_t mlp_lanes(int64_t itemsize) {
  TORCH_CHECK(itemsize == 4 || itemsize == 8, "_mlp_lanes: itemsize must be 4 (float32) or 8 (float64), got ",
              itemsize);
  return kVecBytes / itemsize;
}

std::vector<at::Tensor> mlp_inner_loop_cpu(
    const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList params, at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
    double negative_slope, int64_t loss, bool first_order, bool need_lr_grad, at::ArrayRef<double> step_weights) {
  const Call c = prepare(xs, ys, xq, yq, params, lrs, steps, acts, negative_slope, loss, step_weights);
  const int64_t Tn = c.xs.size(0), P = c.net.P, Plr = rate_entries(c, steps);
  auto opts = c.xs.options();
  at::Tensor loss_out = new_output({Tn}, opts);
  at::Tensor dtheta = new_output({Tn, P}, opts);
  at::Tensor dlr = new_output({need_lr_grad ? Tn : 0, Plr}, opts);
  AT_DISPATCH_FLOATING_TYPES(c.xs.scalar_type(), "mlp_inner_loop_cpu", [&] {
    dispatch_run<scalar_t>(c, lr, steps, loss, first_order, need_lr_grad,
                           Out<scalar_t>{false, loss_out.data_ptr<scalar_t>(), dtheta.data_ptr<scalar_t>(),
                                         need_lr_grad ? dlr.data_ptr<scalar_t>() : nullptr});
  });
  if (c.per_step_lr && need_lr_grad) dlr = rate_rows_in_op_order(dlr, params, steps);
  return {loss_out, dtheta, dlr};
}

std::vector<at::Tensor> mlp_meta_grad_cpu(
    const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList params, at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
    double negative_slope, int64_t loss, bool first_order, bool need_lr_grad, at::ArrayRef<double> step_weights) {
  const Call c = prepare(xs, ys, xq, yq, params, lrs, steps, acts, negative_slope, loss, step_weights);
  const int64_t Tn = c.xs.size(0), P = c.net.P, Plr = rate_entries(c, steps);
  const int64_t sets = c.per_step_lr ? steps : 1;  // a rate tensor's step rows
  TORCH_CHECK(Tn > 0, "mlp_meta_loss: needs at least one task, got xs ", xs.sizes());
  const int copies = need_lr_grad ? 2 : 1;
  auto opts = c.xs.options();
  // [loss, one tensor per parameter shaped like it, then one per rate shaped like it]
  std::vector<at::Tensor> result{at::empty({}, opts)};
  for (const auto& p : params) result.push_back(at::empty(p.sizes(), opts));
  if (need_lr_grad)
    for (const auto& r : lrs) result.push_back(at::empty(r.sizes(), opts));
  AT_DISPATCH_FLOATING_TYPES(c.xs.scalar_type(), "mlp_meta_grad_cpu", [&] {
    constexpr int W = kVecBytes / static_cast<int>(sizeof(scalar_t));
    const int64_t G = (Tn + W - 1) / W;
    // per-group sums, then their sum in group order (the result does not depend on threads)
    std::vector<scalar_t> part((1 + P + (need_lr_grad ? Plr : 0)) * G);
    scalar_t* pl = part.data();
    scalar_t* pg = pl + G;
    scalar_t* pd = need_lr_grad ? pg + G * P : nullptr;
    dispatch_run<scalar_t>(c, lr, steps, loss, first_order, need_lr_grad, Out<scalar_t>{true, pl, pg, pd});
    const scalar_t inv_t = scalar_t(1) / static_cast<scalar_t>(Tn);
    scalar_t total = 0;
    for (int64_t g = 0; g < G; ++g) total += pl[g];
    *result[0].data_ptr<scalar_t>() = total * inv_t;
    // entries [j0, j0 + n) of groups' rows of `width` at src into dst
    auto reduce = [&](const scalar_t* src, int64_t width, int64_t j0, int64_t n, scalar_t* dst) {
      src += j0;
      std::copy(src, src + n, dst);
      for (int64_t g = 1; g < G; ++g) {
        for (int64_t j = 0; j < n; ++j) dst[j] += src[g * width + j];
      }
      for (int64_t j = 0; j < n; ++j) dst[j] *= inv_t;
    };
    size_t i = 1;
    for (int k = 0; k < copies; ++k) {
      int64_t j0 = 0;
      for (const auto& p : params) {
        scalar_t* dst = result[i++].data_ptr<scalar_t>();
        if (k == 0) {
          reduce(pg, P, j0, p.numel(), dst);
        } else {  // the rate rows are [sets, P]: step s of this rate at s * P + j0
          for (int64_t s = 0; s < sets; ++s) reduce(pd, Plr, s * P + j0, p.numel(), dst + s * p.numel());
        }
        j0 += p.numel();
      }
    }
  });
  return result;
}

std::vector<at::Tensor> mlp_adapt_cpu(const at::Tensor& xs, const at::Tensor& ys, at::TensorList params,
                                     at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
                                     double negative_slope, int64_t loss) {
  // (the support set stands in for the query set in the shared checks)
  const Call c = prepare(xs, ys, xs, ys, params, lrs, steps, acts, negative_slope, loss, {});
  const int64_t Tn = c.xs.size(0), P = c.net.P;
  auto opts = c.xs.options();
  at::Tensor theta = new_output({Tn, P}, opts);
  at::Tensor loss_out = new_output({Tn}, opts);
  AT_DISPATCH_FLOATING_TYPES(c.xs.scalar_type(), "mlp_adapt_cpu", [&] {
    constexpr int W = kVecBytes / static_cast<int>(sizeof(scalar_t));
    adapt_run<scalar_t, W>(c.net, c.xs, c.ys, c.params, c.lrflat.defined() ? c.lrflat.data_ptr<scalar_t>() : nullptr,
                           c.per_step_lr, static_cast<scalar_t>(lr), steps, loss, theta.data_ptr<scalar_t>(),
                           loss_out.data_ptr<scalar_t>());
  });
  return {theta, loss_out};
}

}  // namespace fastmeta
