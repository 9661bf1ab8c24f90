// fastmeta::mlp_forward: one MLP (Linear layers, each followed by an activation or none) on x [N,
// d_0], for the drop-in learners (fastmeta.MAML / MetaSGD), with its autograd in C++:
//
//   forward:          z_l = a_{l-1} W_l^T + b_l,  a_l = s_l(z_l)  (a_0 = x), returns a_L; one node
//   backward (MLPBackward, itself an op with a derivative): from G = dL/da_L,
//                     dz_l = s_l'(z_l) (.) da_l,  dW_l = dz_l^T a_{l-1},  db_l = sum_n dz_l,
//                     da_{l-1} = dz_l W_l  (dx = da_0 where x requires grad)
//   its derivative:   for cotangents (ux, UW_l, ub_l) of (dx, dW_l, db_l), Pearlmutter's R-operator
//                     on the stored activations, in the direction (x, W, b) -> (ux, UW, ub):
//                     Rz_l = Ra_{l-1} W_l^T + a_{l-1} UW_l^T + ub_l,  Ra_l = s_l'(z_l) (.) Rz_l,
//                     d/dG = Ra_L;  Rdz_l = s_l''(z_l) (.) Rz_l (.) da_l + s_l'(z_l) (.) Rda_l,
//                     d/dW_l = Rdz_l^T a_{l-1} + dz_l^T Ra_{l-1},  d/db_l = sum_n Rdz_l,
//                     Rda_{l-1} = Rdz_l W_l + dz_l UW_l  (d/dx = Rda_0),  Rda_L = 0.
//
// A per-task loop of second-order MAML then records one node per forward, one per inner-step
// gradient and computes each second-order product in one node, where autograd records each
// layer's linear, activation and their backward formulas as nodes of their own. A derivative of
// the derivative (third order: MLPBackward's backward taken with a graph) recomputes the
// backward from its inputs with recorded ATen ops and differentiates that, in its inputs' partial
// derivatives (exact to any order).
// Activation codes as fastmeta::mlp_inner_loop's: 0 none, 1 relu, 2 leaky relu, 3 tanh,
// 4 sigmoid. Any device: the formulas are ATen calls, except for a small MLP on the CPU, where the
// forward, its backward and that backward's derivative are plain loops (small_cpu below).
#include <ATen/TensorOperators.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/leaky_relu_backward.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>

namespace fastmeta {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum : int64_t { kIdentity = 0, kRelu = 1, kLeaky = 2, kTanh = 3, kSigmoid = 4 };

at::Tensor act(int64_t code, const at::Tensor& z, double slope) {
  switch (code) {
    case kRelu: return at::relu(z);
    case kLeaky: return at::leaky_relu(z, slope);
    case kTanh: return at::tanh(z);
    case kSigmoid: return at::sigmoid(z);
    default: return z;
  }
}

// g (.) s'(z), by PyTorch's own backward kernel of the activation (one op; relu: 0 where a <= 0,
// so that a NaN passes as in threshold_backward; leaky relu: g where z > 0, else slope g).
at::Tensor times_d1(int64_t code, const at::Tensor& g, const at::Tensor& z, const at::Tensor& a, double slope) {
  switch (code) {
    case kRelu: return at::threshold_backward(g, a, 0);
    case kLeaky: return at::leaky_relu_backward(g, z, slope, false);
    case kTanh: return at::tanh_backward(g, a);
    case kSigmoid: return at::sigmoid_backward(g, a);
    default: return g;
  }
}

// g (.) s''(z) where s'' is not 0 (tanh: -2 a s'(z), sigmoid: s'(z) (1 - 2 a)), else undefined.
at::Tensor times_d2(int64_t code, const at::Tensor& g, const at::Tensor& a) {
  if (code == kTanh) return at::tanh_backward(g, a) * a * -2;
  if (code == kSigmoid) return at::sigmoid_backward(g, a) * (1 - 2 * a);
  return at::Tensor();
}

at::Tensor add_or(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// Small MLPs on the CPU (a learner's few rows through layers of tens of units: the sine MLP's 10 x
// (1, 40, 40, 1) is 17k multiply-adds) as plain loops over the contiguous operands, one pass a
// layer: there ATen's calls (a linear, an activation, and in the backward three products and a sum
// a layer) cost more in dispatch and BLAS set-up (~2-4 us each) than their arithmetic. Used outside
// a recording (grad mode off: the custom functions' own forward and backward) for float32 / float64
// CPU tensors with N * sum_l d_l d_{l-1} <= the threshold (fastmeta._C._mlp_forward_small_macs:
// 2^17, or FASTMETA_MLP_SMALL_MACS at load); larger ones, other devices and the recorded
// recomputation use ATen. The values are the ATen path's up to the order of summation.
std::atomic<int64_t> g_small_macs{env_threshold("FASTMETA_MLP_SMALL_MACS", int64_t(1) << 17)};

// Whether t is a plain dense CPU tensor whose data the loops may read: its dispatch keys among those
// of a tensor made by at::empty on the CPU (CPU, ADInplaceOrView, AutogradCPU, AutocastCPU; not a
// FakeTensor or other Python subclass, a functionalization or functorch wrapper, a negated or
// conjugated view, a sparse or quantized tensor).
bool plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet allowed = [] {
    c10::InferenceMode normal(false);  // (a tensor made under inference mode has no autograd keys)
    return at::empty({0}, at::kFloat).key_set();
  }();
  const c10::DispatchKeySet keys = t.key_set();
  return (keys & allowed) == keys && t.layout() == at::kStrided;
}

// How many calls of the loops (forward, backward, the backward's derivative) this process made
// (fastmeta._C._mlp_forward_small_calls: tests tell the paths apart by it).
std::atomic<int64_t> g_small_calls{0};

bool small_cpu(const at::Tensor& x, at::TensorList params) {
  if (at::GradMode::is_enabled() || !plain_cpu(x) || (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble))
    return false;
  int64_t macs = 0;
  for (size_t l = 0; l < params.size(); ++l) {
    if (!plain_cpu(params[l])) return false;
    if (l % 2 == 0) macs += params[l].numel();
  }
  return x.size(0) * macs <= g_small_macs.load(std::memory_order_relaxed);
}

// s(z) per element, as ATen's: relu(NaN) = NaN (0 only where z <= 0 fails for NaN: NaN passes).
template <typename T>
inline T act_value(int64_t code, T z, T slope) {
  switch (code) {
    case kRelu: return z > T(0) || z != z ? z : T(0);
    case kLeaky: return z > T(0) ? z : z * slope;
    case kTanh: return std::tanh(z);
    case kSigmoid: return T(1) / (T(1) + std::exp(-z));
    default: return z;
  }
}

// g s'(z) per element, as ATen's backward kernels: relu (threshold_backward on a): 0 where a <= 0,
// else g (a NaN a passes g); leaky relu: g where z > 0, else slope g; tanh: g (1 - a^2); sigmoid: g a (1 - a).
template <typename T>
inline T times_d1_value(int64_t code, T g, T z, T a, T slope) {
  switch (code) {
    case kRelu: return a <= T(0) ? T(0) : g;
    case kLeaky: return z > T(0) ? g : g * slope;
    case kTanh: return g * (T(1) - a * a);
    case kSigmoid: return g * (T(1) - a) * a;
    default: return g;
  }
}

// g s''(z) per element where s'' is not 0 (times_d2's formulas: tanh -2 a s'(z), sigmoid s'(z) (1 - 2 a)),
// else 0.
template <typename T>
inline T times_d2_value(int64_t code, T g, T a) {
  if (code == kTanh) return g * (T(1) - a * a) * a * T(-2);
  if (code == kSigmoid) return g * (T(1) - a) * a * (T(1) - T(2) * a);
  return T(0);
}

// The forward's activations: z_l and a_l (l = 1..L at l - 1); z_l is a_l where the layer has no
// activation.
struct Forward {
  std::vector<at::Tensor> z, a;
};

// The small path's products on contiguous row-major operands, each added into C:
//   nt: C [N, O] += A [N, I] B [O, I]^T  (dot products of rows: 2 rows of A by 4 of B at a time, so
//       that each loaded element serves 2 or 4 multiply-adds)
//   tn: C [O, I] += A [N, O]^T B [N, I]  (rows of B scaled into a row of C, 4 at a time)
//   nn: C [N, I] += A [N, O] B [O, I]    (the same with B's rows)
template <typename T>
void add_nt(const T* A, const T* B, T* C, int64_t N, int64_t O, int64_t I) {
  int64_t n = 0;
  for (; n + 2 <= N; n += 2) {
    const T *a0 = A + n * I, *a1 = a0 + I;
    int64_t o = 0;
    for (; o + 4 <= O; o += 4) {
      const T *b0 = B + o * I, *b1 = b0 + I, *b2 = b1 + I, *b3 = b2 + I;
      T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
      _Pragma("omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)") for (int64_t i = 0; i < I; ++i) {
        s00 += a0[i] * b0[i];
        s01 += a0[i] * b1[i];
        s02 += a0[i] * b2[i];
        s03 += a0[i] * b3[i];
        s10 += a1[i] * b0[i];
        s11 += a1[i] * b1[i];
        s12 += a1[i] * b2[i];
        s13 += a1[i] * b3[i];
      }
      T *c0 = C + n * O + o, *c1 = c0 + O;
      c0[0] += s00, c0[1] += s01, c0[2] += s02, c0[3] += s03;
      c1[0] += s10, c1[1] += s11, c1[2] += s12, c1[3] += s13;
    }
    for (; o < O; ++o) {
      const T* bo = B + o * I;
      T s0 = 0, s1 = 0;
      _Pragma("omp simd reduction(+ : s0, s1)") for (int64_t i = 0; i < I; ++i) {
        s0 += a0[i] * bo[i];
        s1 += a1[i] * bo[i];
      }
      C[n * O + o] += s0;
      C[(n + 1) * O + o] += s1;
    }
  }
  for (; n < N; ++n) {
    const T* an = A + n * I;
    for (int64_t o = 0; o < O; ++o) {
      const T* bo = B + o * I;
      T acc = T(0);
      _Pragma("omp simd reduction(+ : acc)") for (int64_t i = 0; i < I; ++i) acc += an[i] * bo[i];
      C[n * O + o] += acc;
    }
  }
}

// row [I] += sum_k c[k * cs] rows[k] [I] over K rows of B starting at b (rows I apart), 4 at a time.
template <typename T>
inline void add_rows(T* row, const T* c, int64_t cs, const T* b, int64_t K, int64_t I) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const T c0 = c[k * cs], c1 = c[(k + 1) * cs], c2 = c[(k + 2) * cs], c3 = c[(k + 3) * cs];
    const T *b0 = b + k * I, *b1 = b0 + I, *b2 = b1 + I, *b3 = b2 + I;
    _Pragma("omp simd") for (int64_t i = 0; i < I; ++i) row[i] += c0 * b0[i] + c1 * b1[i] + c2 * b2[i] + c3 * b3[i];
  }
  for (; k < K; ++k) {
    const T ck = c[k * cs];
    const T* bk = b + k * I;
    _Pragma("omp simd") for (int64_t i = 0; i < I; ++i) row[i] += ck * bk[i];
  }
}

template <typename T>
void add_tn(const T* A, const T* B, T* C, int64_t N, int64_t O, int64_t I) {
  for (int64_t o = 0; o < O; ++o) add_rows(C + o * I, A + o, O, B, N, I);  // row o: sum_n A[n, o] B[n]
}

template <typename T>
void add_nn(const T* A, const T* B, T* C, int64_t N, int64_t O, int64_t I) {
  for (int64_t n = 0; n < N; ++n) add_rows(C + n * I, A + n * O, 1, B, O, I);  // row n: sum_o A[n, o] B[o]
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

// A new contiguous tensor of zeros, filled here (at::zeros is two dispatched calls).
template <typename T>
at::Tensor zeros(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  std::fill_n(t.data_ptr<T>(), t.numel(), T(0));
  return t;
}

Forward small_forward(const at::Tensor& x, at::TensorList params, at::IntArrayRef acts, double slope) {
  g_small_calls.fetch_add(1, std::memory_order_relaxed);
  Forward f;
  const int64_t N = x.size(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_forward", [&] {
    using T = scalar_t;
    const T sl = static_cast<T>(slope);
    at::Tensor in = x.contiguous();
    for (size_t l = 0; l < acts.size(); ++l) {
      const at::Tensor W = params[2 * l].contiguous(), b = params[2 * l + 1].contiguous();
      const int64_t O = W.size(0), I = W.size(1);
      at::Tensor z = new_output({N, O}, x.options());
      T* Z = z.data_ptr<T>();
      const T* bp = ptr<T>(b);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < O; ++o) Z[n * O + o] = bp[o];
      add_nt(ptr<T>(in), ptr<T>(W), Z, N, O, I);
      at::Tensor a = z;
      if (acts[l] != kIdentity) {
        a = new_output({N, O}, x.options());
        T* Ap = a.data_ptr<T>();
        const int64_t code = acts[l];
        for (int64_t k = 0; k < N * O; ++k) Ap[k] = act_value<T>(code, Z[k], sl);
      }
      f.z.push_back(z);
      f.a.push_back(a);
      in = a;
    }
  });
  return f;
}

Forward run_forward(const at::Tensor& x, at::TensorList params, at::IntArrayRef acts, double slope) {
  if (small_cpu(x, params)) return small_forward(x, params, acts, slope);
  Forward f;
  at::Tensor a = x;
  for (size_t l = 0; l < acts.size(); ++l) {
    at::Tensor z = at::linear(a, params[2 * l], params[2 * l + 1]);
    a = act(acts[l], z, slope);
    f.z.push_back(z);
    f.a.push_back(a);
  }
  return f;
}

// The backward pass's quantities: dx (undefined unless need_dx), the gradients [dW_1, db_1, ...],
// and per layer da_l (the gradient w.r.t. a_l) and dz_l.
struct Backward {
  at::Tensor dx;
  std::vector<at::Tensor> grads, da, dz;
};

Backward small_backward(const at::Tensor& G, const at::Tensor& x, at::TensorList params, at::IntArrayRef acts,
                        double slope, const std::vector<at::Tensor>& z, const std::vector<at::Tensor>& a,
                        bool need_dx) {
  g_small_calls.fetch_add(1, std::memory_order_relaxed);
  const size_t L = acts.size();
  const int64_t N = x.size(0);
  Backward b;
  b.grads.resize(2 * L);
  b.da.resize(L);
  b.dz.resize(L);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_forward_backward", [&] {
    using T = scalar_t;
    const T sl = static_cast<T>(slope);
    at::Tensor da = G.contiguous();
    for (size_t i = L; i-- > 0;) {
      const at::Tensor in = (i == 0 ? x : a[i - 1]).contiguous();
      const at::Tensor W = params[2 * i].contiguous();
      const int64_t O = W.size(0), I = W.size(1);
      at::Tensor dz = da;
      if (acts[i] != kIdentity) {
        dz = new_output({N, O}, x.options());
        const at::Tensor zc = z[i].contiguous(), ac = a[i].contiguous();
        const T *D = ptr<T>(da), *Zp = ptr<T>(zc), *Ap = ptr<T>(ac);
        T* out = dz.data_ptr<T>();
        const int64_t code = acts[i];
        for (int64_t k = 0; k < N * O; ++k) out[k] = times_d1_value<T>(code, D[k], Zp[k], Ap[k], sl);
      }
      b.da[i] = da;
      b.dz[i] = dz;
      const T* Dz = ptr<T>(dz);
      at::Tensor dW = zeros<T>({O, I}, x.options()), db = zeros<T>({O}, x.options());
      add_tn(Dz, ptr<T>(in), dW.data_ptr<T>(), N, O, I);
      T* gb = db.data_ptr<T>();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < O; ++o) gb[o] += Dz[n * O + o];
      b.grads[2 * i] = dW;
      b.grads[2 * i + 1] = db;
      if (i > 0 || need_dx) {
        at::Tensor next = zeros<T>({N, I}, x.options());
        add_nn(Dz, ptr<T>(W), next.data_ptr<T>(), N, O, I);
        da = next;
      }
    }
    if (need_dx) b.dx = da;
  });
  return b;
}

// MLPBackward's derivative (the R-operator above) on the small path, from the cotangents u (ux
// read only with need_dx; any of them may be undefined: a zero) and the saved z, a, da, dz:
// [d/dG, d/dx (undefined unless want_x), d/dW_1, d/db_1, ...]. Undefined R quantities are skipped
// as in the ATen formulas.
std::vector<at::Tensor> small_rop(const variable_list& u, const at::Tensor& x, const std::vector<at::Tensor>& params,
                                  const std::vector<int64_t>& acts, double slope, const std::vector<at::Tensor>& z,
                                  const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& da,
                                  const std::vector<at::Tensor>& dz, bool need_dx, bool want_x) {
  g_small_calls.fetch_add(1, std::memory_order_relaxed);
  const size_t L = acts.size();
  const int64_t N = x.size(0);
  std::vector<at::Tensor> out(2 + 2 * L);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_forward_double_backward", [&] {
    using T = scalar_t;
    const T sl = static_cast<T>(slope);
    std::vector<int64_t> d{x.size(1)};
    std::vector<at::Tensor> W(L), in(L), zc(L), ac(L), dac(L), dzc(L), UW(L), ub(L);
    for (size_t l = 0; l < L; ++l) {
      W[l] = params[2 * l].contiguous();
      d.push_back(W[l].size(0));
      in[l] = (l == 0 ? x : a[l - 1]).contiguous();
      zc[l] = z[l].contiguous();
      ac[l] = a[l].contiguous();
      dac[l] = da[l].contiguous();
      dzc[l] = dz[l].contiguous();
      if (u[1 + 2 * l].defined()) UW[l] = u[1 + 2 * l].contiguous();
      if (u[2 + 2 * l].defined()) ub[l] = u[2 + 2 * l].contiguous();
    }
    auto d1 = [&](size_t l, const std::vector<T>& g) {  // g (.) s_l'(z_l)
      std::vector<T> r(g.size());
      const T *Zp = ptr<T>(zc[l]), *Ap = ptr<T>(ac[l]);
      for (size_t k = 0; k < g.size(); ++k) r[k] = times_d1_value<T>(acts[l], g[k], Zp[k], Ap[k], sl);
      return r;
    };
    // R-forward: Ra[l] the R of layer l's input (empty: undefined), Rz[l] of its pre-activation
    std::vector<std::vector<T>> Rz(L), Ra(L + 1);
    if (need_dx && u[0].defined()) {
      const at::Tensor ux = u[0].contiguous();
      Ra[0].assign(ptr<T>(ux), ptr<T>(ux) + ux.numel());
    }
    for (size_t l = 0; l < L; ++l) {
      const int64_t I = d[l], O = d[l + 1];
      if (Ra[l].empty() && !UW[l].defined() && !ub[l].defined()) continue;
      std::vector<T> r(N * O, T(0));
      if (ub[l].defined()) {
        const T* bp = ptr<T>(ub[l]);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t o = 0; o < O; ++o) r[n * O + o] = bp[o];
      }
      if (!Ra[l].empty()) add_nt(Ra[l].data(), ptr<T>(W[l]), r.data(), N, O, I);
      if (UW[l].defined()) add_nt(ptr<T>(in[l]), ptr<T>(UW[l]), r.data(), N, O, I);
      Ra[l + 1] = d1(l, r);
      Rz[l] = std::move(r);
    }
    at::Tensor dG = zeros<T>({N, d[L]}, x.options());
    if (!Ra[L].empty()) std::copy(Ra[L].begin(), Ra[L].end(), dG.data_ptr<T>());
    out[0] = dG;
    // R-backward (R of G is 0)
    std::vector<T> Rda;
    for (size_t i = L; i-- > 0;) {
      const int64_t I = d[i], O = d[i + 1];
      std::vector<T> Rdz;
      if (!Rda.empty()) Rdz = d1(i, Rda);
      if (!Rz[i].empty() && (acts[i] == kTanh || acts[i] == kSigmoid)) {
        if (Rdz.empty()) Rdz.assign(N * O, T(0));
        const T *Ap = ptr<T>(ac[i]), *Dp = ptr<T>(dac[i]);
        for (int64_t k = 0; k < N * O; ++k) Rdz[k] += times_d2_value<T>(acts[i], Rz[i][k] * Dp[k], Ap[k]);
      }
      at::Tensor gW = zeros<T>({O, I}, x.options()), gb = zeros<T>({O}, x.options());
      if (!Rdz.empty()) {
        add_tn(Rdz.data(), ptr<T>(in[i]), gW.data_ptr<T>(), N, O, I);
        T* bp = gb.data_ptr<T>();
        for (int64_t n = 0; n < N; ++n)
          for (int64_t o = 0; o < O; ++o) bp[o] += Rdz[n * O + o];
      }
      if (!Ra[i].empty()) add_tn(ptr<T>(dzc[i]), Ra[i].data(), gW.data_ptr<T>(), N, O, I);
      out[2 + 2 * i] = gW;
      out[3 + 2 * i] = gb;
      if (i > 0 || want_x) {
        std::vector<T> r;
        if (!Rdz.empty() || UW[i].defined()) r.assign(N * I, T(0));
        if (!Rdz.empty()) add_nn(Rdz.data(), ptr<T>(W[i]), r.data(), N, O, I);
        if (UW[i].defined()) add_nn(ptr<T>(dzc[i]), ptr<T>(UW[i]), r.data(), N, O, I);
        Rda = std::move(r);
      }
    }
    if (want_x) {
      at::Tensor dx = zeros<T>({N, d[0]}, x.options());
      if (!Rda.empty()) std::copy(Rda.begin(), Rda.end(), dx.data_ptr<T>());
      out[1] = dx;
    }
  });
  return out;
}

Backward run_backward(const at::Tensor& G, const at::Tensor& x, at::TensorList params, at::IntArrayRef acts,
                      double slope, const std::vector<at::Tensor>& z, const std::vector<at::Tensor>& a,
                      bool need_dx) {
  if (small_cpu(x, params) && plain_cpu(G)) return small_backward(G, x, params, acts, slope, z, a, need_dx);
  const size_t L = acts.size();
  Backward b;
  b.grads.resize(2 * L);
  b.da.resize(L);
  b.dz.resize(L);
  at::Tensor da = G;
  for (size_t i = L; i-- > 0;) {
    const at::Tensor& in = i == 0 ? x : a[i - 1];
    at::Tensor dz = times_d1(acts[i], da, z[i], a[i], slope);
    b.da[i] = da;
    b.dz[i] = dz;
    b.grads[2 * i] = dz.t().mm(in);
    b.grads[2 * i + 1] = dz.sum(0);
    if (i > 0 || need_dx) da = dz.mm(params[2 * i]);
  }
  if (need_dx) b.dx = da;
  return b;
}

// The backward recomputed from (G, x, params) with every ATen call recorded (a derivative of it
// taken with a graph: third order and up).
Backward recorded_backward(const at::Tensor& G, const at::Tensor& x, at::TensorList params, at::IntArrayRef acts,
                           double slope, bool need_dx) {
  Forward f = run_forward(x, params, acts, slope);
  return run_backward(G, x, params, acts, slope, f.z, f.a, need_dx);
}

class MLPBackward : public torch::autograd::Function<MLPBackward> {
 public:
  // Returns [dx (an empty tensor where x needs no gradient), dW_1, db_1, ..., dW_L, db_L]. saved:
  // the forward's z_1..z_L, a_1..a_L (values; not differentiated).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& G, const at::Tensor& x, at::TensorList params,
                               at::TensorList saved, at::IntArrayRef acts, double slope, bool need_dx) {
    const size_t L = acts.size();
    std::vector<at::Tensor> z(saved.begin(), saved.begin() + L), a(saved.begin() + L, saved.end());
    Backward b = run_backward(G, x, params, acts, slope, z, a, need_dx);
    std::vector<at::Tensor> keep{G, x};
    keep.insert(keep.end(), params.begin(), params.end());
    for (size_t l = 0; l < L; ++l) {
      keep.push_back(z[l]);
      keep.push_back(a[l]);
      keep.push_back(b.da[l]);
      keep.push_back(b.dz[l]);
    }
    ctx->save_for_backward(keep);
    ctx->saved_data["acts"] = acts.vec();
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["need_dx"] = need_dx;
    variable_list out{need_dx ? b.dx : at::empty({0}, x.options())};
    out.insert(out.end(), b.grads.begin(), b.grads.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list u) {
    const std::vector<int64_t> acts = ctx->saved_data["acts"].toIntVector();
    const double slope = ctx->saved_data["slope"].toDouble();
    const bool need_dx = ctx->saved_data["need_dx"].toBool();
    const size_t L = acts.size();
    variable_list s = ctx->get_saved_variables();
    const at::Tensor &G = s[0], &x = s[1];
    std::vector<at::Tensor> params(s.begin() + 2, s.begin() + 2 + 2 * L);
    const bool want_x = ctx->needs_input_grad(1);
    const at::Tensor ux = need_dx ? u[0] : at::Tensor();
    variable_list grads;  // G, x, the params, then the saved activations and the 3 non-tensors
    if (at::GradMode::is_enabled()) {
      // a derivative of this one will be taken: the backward recomputed from its inputs with a
      // graph, and differentiated with one (every path from the inputs recorded)
      // The inputs enter the recomputation as aliases (a view of each), so that the gradients
      // w.r.t. them are the partial derivatives: G itself depends on the parameters in a loss's
      // graph, and a gradient w.r.t. the parameters would otherwise also follow that path.
      std::vector<at::Tensor> ins{G.view_as(G), x.view_as(x)};
      for (const auto& p : params) ins.push_back(p.view_as(p));
      Backward b = recorded_backward(ins[0], ins[1], at::TensorList(ins).slice(2), acts, slope, need_dx);
      std::vector<at::Tensor> outs, cots;
      auto take = [&](const at::Tensor& out, const at::Tensor& cot) {
        if (cot.defined() && out.requires_grad()) {
          outs.push_back(out);
          cots.push_back(cot);
        }
      };
      if (need_dx) take(b.dx, ux);
      for (size_t k = 0; k < 2 * L; ++k) take(b.grads[k], u[1 + k]);
      std::vector<at::Tensor> wrt;
      std::vector<size_t> at_input;
      for (size_t i = 0; i < ins.size(); ++i)
        if (ctx->needs_input_grad(i) && ins[i].requires_grad()) {
          wrt.push_back(ins[i]);
          at_input.push_back(i);
        }
      variable_list grads(ins.size());
      if (!outs.empty() && !wrt.empty()) {
        variable_list got = torch::autograd::grad(outs, wrt, cots, /*retain_graph=*/true, /*create_graph=*/true,
                                                  /*allow_unused=*/true);
        for (size_t k = 0; k < got.size(); ++k) grads[at_input[k]] = got[k];
      }
      grads.resize(ins.size() + 2 * L + 3);  // the saved activations (z, a) and the 3 non-tensors: none
      return grads;
    }
    std::vector<at::Tensor> z(L), a(L), da(L), dz(L);
    for (size_t l = 0; l < L; ++l) {
      z[l] = s[2 + 2 * L + 4 * l];
      a[l] = s[2 + 2 * L + 4 * l + 1];
      da[l] = s[2 + 2 * L + 4 * l + 2];
      dz[l] = s[2 + 2 * L + 4 * l + 3];
    }
    const auto plain = [](const std::vector<at::Tensor>& ts) {
      return std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return !t.defined() || plain_cpu(t); });
    };
    if (small_cpu(x, params) && plain(u) && plain(z) && plain(a) && plain(da) && plain(dz)) {
      grads = small_rop(u, x, params, acts, slope, z, a, da, dz, need_dx, want_x);
      grads.resize(grads.size() + 2 * L + 3);
      return grads;
    }
    // R-forward
    std::vector<at::Tensor> Rz(L), Ra(L + 1);  // Ra[l]: R of layer l's input (Ra[0] = ux)
    Ra[0] = ux;
    for (size_t l = 0; l < L; ++l) {
      const at::Tensor& in = l == 0 ? x : a[l - 1];
      const at::Tensor &UW = u[1 + 2 * l], &ub = u[2 + 2 * l];
      at::Tensor r;
      if (Ra[l].defined()) r = Ra[l].mm(params[2 * l].t());
      if (UW.defined()) r = add_or(r, in.mm(UW.t()));
      if (ub.defined()) r = r.defined() ? r + ub : ub.expand({in.size(0), ub.size(0)});
      Rz[l] = r;
      Ra[l + 1] = r.defined() ? times_d1(acts[l], r, z[l], a[l], slope) : r;
    }
    grads.push_back(Ra[L].defined() ? Ra[L] : at::zeros_like(G));
    // R-backward (R of G is 0)
    std::vector<at::Tensor> gp(2 * L);
    at::Tensor Rda;
    for (size_t i = L; i-- > 0;) {
      const at::Tensor& in = i == 0 ? x : a[i - 1];
      at::Tensor Rdz;
      if (Rda.defined()) Rdz = times_d1(acts[i], Rda, z[i], a[i], slope);
      if (Rz[i].defined() && (acts[i] == kTanh || acts[i] == kSigmoid))
        Rdz = add_or(Rdz, times_d2(acts[i], Rz[i] * da[i], a[i]));
      at::Tensor gW;
      if (Rdz.defined()) gW = Rdz.t().mm(in);
      if (Ra[i].defined()) gW = add_or(gW, dz[i].t().mm(Ra[i]));
      gp[2 * i] = gW.defined() ? gW : at::zeros_like(params[2 * i]);
      gp[2 * i + 1] = Rdz.defined() ? Rdz.sum(0) : at::zeros_like(params[2 * i + 1]);
      if (i > 0 || want_x) {
        at::Tensor r;
        if (Rdz.defined()) r = Rdz.mm(params[2 * i]);
        const at::Tensor& UW = u[1 + 2 * i];
        if (UW.defined()) r = add_or(r, dz[i].mm(UW));
        Rda = r;
      }
    }
    grads.push_back(want_x ? (Rda.defined() ? Rda : at::zeros_like(x)) : at::Tensor());
    grads.insert(grads.end(), gp.begin(), gp.end());
    grads.resize(grads.size() + 2 * L + 3);
    return grads;
  }
};

class MLPForward : public torch::autograd::Function<MLPForward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList params, at::IntArrayRef acts,
                            double slope) {
    Forward f = run_forward(x, params, acts, slope);
    std::vector<at::Tensor> keep{x};
    keep.insert(keep.end(), params.begin(), params.end());
    keep.insert(keep.end(), f.z.begin(), f.z.end());
    keep.insert(keep.end(), f.a.begin(), f.a.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["acts"] = acts.vec();
    ctx->saved_data["slope"] = slope;
    return f.a.back();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const std::vector<int64_t> acts = ctx->saved_data["acts"].toIntVector();
    const double slope = ctx->saved_data["slope"].toDouble();
    const size_t L = acts.size();
    variable_list s = ctx->get_saved_variables();
    const at::Tensor& x = s[0];
    std::vector<at::Tensor> params(s.begin() + 1, s.begin() + 1 + 2 * L);
    std::vector<at::Tensor> z(s.begin() + 1 + 2 * L, s.begin() + 1 + 3 * L), a(s.begin() + 1 + 3 * L, s.end());
    const bool need_dx = ctx->needs_input_grad(0);
    const at::Tensor& G = grad_out[0];
    variable_list grads;
    if (at::GradMode::is_enabled()) {  // create_graph: the backward as a differentiable op
      std::vector<at::Tensor> saved(z);
      saved.insert(saved.end(), a.begin(), a.end());
      variable_list out = MLPBackward::apply(G, x, at::TensorList(params), at::TensorList(saved),
                                             at::IntArrayRef(acts), slope, need_dx);
      grads.push_back(need_dx ? out[0] : at::Tensor());
      grads.insert(grads.end(), out.begin() + 1, out.end());
    } else {
      Backward b = run_backward(G, x, params, acts, slope, z, a, need_dx);
      grads.push_back(b.dx);
      grads.insert(grads.end(), b.grads.begin(), b.grads.end());
    }
    grads.resize(grads.size() + 2);  // acts, slope
    return grads;
  }
};

}  // namespace

int64_t mlp_forward_small_macs(int64_t macs) {
  return macs < -1 ? g_small_macs.load() : g_small_macs.exchange(macs);
}

int64_t mlp_forward_small_calls() {
  return g_small_calls.load();
}

at::Tensor mlp_forward(const at::Tensor& x, at::TensorList params, at::IntArrayRef acts, double slope) {
  TORCH_CHECK(x.dim() == 2, "fastmeta::mlp_forward: x must be [N, d_0], got ", x.sizes());
  TORCH_CHECK(params.size() == 2 * acts.size() && !acts.empty(),
              "fastmeta::mlp_forward: params must be [W_1, b_1, ..., W_L, b_L] for the ", acts.size(),
              " activation codes, got ", params.size(), " tensors");
  int64_t width = x.size(1);
  for (size_t l = 0; l < acts.size(); ++l) {
    const at::Tensor &W = params[2 * l], &b = params[2 * l + 1];
    TORCH_CHECK(acts[l] >= kIdentity && acts[l] <= kSigmoid, "fastmeta::mlp_forward: activation code ", acts[l],
                " of layer ", l + 1, " (0 none, 1 relu, 2 leaky relu, 3 tanh, 4 sigmoid)");
    TORCH_CHECK(W.dim() == 2 && W.size(1) == width && b.dim() == 1 && b.size(0) == W.size(0),
                "fastmeta::mlp_forward: layer ", l + 1, " takes ", width, " features: W must be [out, ", width,
                "] and b [out], got W ", W.sizes(), " and b ", b.sizes());
    TORCH_CHECK(W.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type() &&
                    W.device() == x.device() && b.device() == x.device(),
                "fastmeta::mlp_forward: layer ", l + 1, "'s W and b must have x's dtype and device");
    width = W.size(0);
  }
  return MLPForward::apply(x, params, acts, slope);
}

}  // namespace fastmeta

TORCH_LIBRARY_FRAGMENT(fastmeta, m) {
  // One MLP on x [N, d_0] with its autograd in C++ (csrc/mlp_forward.cpp): the drop-in learners'
  // forward.
  m.def("mlp_forward(Tensor x, Tensor[] params, int[] acts, float negative_slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmeta, CompositeImplicitAutograd, m) {
  m.impl("mlp_forward", &fastmeta::mlp_forward);
}
