// The whole MAML inner loop of an MLP for T tasks, with the exact meta-gradient, CPU.
//
// Per task t (tasks run in parallel, one task's weights and activations in a per-thread workspace
// that is allocated once per chunk of tasks, never per step):
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
// 3 tanh, 4 sigmoid. loss: 0 mse (mean over all elements), 1 cross-entropy (mean over rows).
// Returns [loss [T], dparam_i [T, *shape_i] ..., (need_lr_grad) dlr_i [T, *shape_i] ...].
#include "common.h"

#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>

namespace fastmeta {
namespace {

enum Act : int64_t { kNone = 0, kRelu = 1, kLeaky = 2, kTanh = 3, kSigmoid = 4 };

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

struct Net {
  int64_t L;
  std::vector<int64_t> d;        // widths d_0..d_L
  std::vector<int64_t> offW, offb;  // offsets of W_l, b_l (l = 1..L, stored at l-1) in a flat vector
  std::vector<int64_t> acts;
  int64_t P;                     // total parameter count
  double slope;
};

// One step's stored activations for N rows: z_l, a_l, da_l, dz_l for l = 1..L (index l-1).
template <typename T>
struct Acts {
  std::vector<T*> z, a, da, dz;
};

template <typename T>
class Task {
 public:
  Task(const Net& net, int64_t K, int64_t Q, int64_t S) : net_(net), K_(K), S_(S) {
    int64_t sumd = 0;
    for (int64_t l = 1; l <= net.L; ++l) sumd += net.d[l];
    const int64_t per_step = 4 * K * sumd;
    const int64_t NQ = std::max(K, Q);
    dmax_ = *std::max_element(net.d.begin(), net.d.end());
    buf_.resize((S + 1) * net.P + S * net.P + S * per_step + 4 * NQ * sumd + 2 * K * sumd +
                2 * K * dmax_ + 4 * net.P);
    T* p = buf_.data();
    theta = p; p += (S + 1) * net.P;
    g = p; p += S * net.P;
    steps.resize(S);
    for (int64_t s = 0; s < S; ++s) p = carve(steps[s], K, p);
    p = carve(query, NQ, p);
    Rz.resize(net.L); Ra.resize(net.L);
    for (int64_t l = 1; l <= net.L; ++l) { Rz[l - 1] = p; p += K * net.d[l]; Ra[l - 1] = p; p += K * net.d[l]; }
    Rda = p; p += K * dmax_;
    Rdz = p; p += K * dmax_;
    v = p; p += net.P; u = p; p += net.P; h = p; p += net.P; dlr = p; p += net.P;
  }

  T *theta, *g, *v, *u, *h, *dlr;
  std::vector<Acts<T>> steps;
  Acts<T> query;

  // z_l, a_l for rows x [N, d_0] at parameters th.
  void forward(const T* th, const T* x, int64_t N, Acts<T>& A) const {
    for (int64_t l = 1; l <= net_.L; ++l) {
      const int64_t din = net_.d[l - 1], dout = net_.d[l];
      const T* W = th + net_.offW[l - 1];
      const T* b = th + net_.offb[l - 1];
      const T* ain = l == 1 ? x : A.a[l - 2];
      T* z = A.z[l - 1];
      T* a = A.a[l - 1];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < dout; ++o) z[n * dout + o] = b[o] + dot(ain + n * din, W + o * din, din);
      activate(net_.acts[l - 1], z, a, N * dout);
    }
  }

  void activate(int64_t act, const T* z, T* a, int64_t n) const {
    const T slope = static_cast<T>(net_.slope);
    switch (act) {
      case kRelu: for (int64_t i = 0; i < n; ++i) a[i] = z[i] > 0 ? z[i] : T(0); break;
      case kLeaky: for (int64_t i = 0; i < n; ++i) a[i] = z[i] > 0 ? z[i] : slope * z[i]; break;
      case kTanh: for (int64_t i = 0; i < n; ++i) a[i] = std::tanh(z[i]); break;
      case kSigmoid: for (int64_t i = 0; i < n; ++i) a[i] = T(1) / (T(1) + std::exp(-z[i])); break;
      default: std::copy(z, z + n, a);
    }
  }

  // s'(z) and s''(z) of activation act, from z and a = s(z).
  inline T d1(int64_t act, T z, T a) const {
    switch (act) {
      case kRelu: return z > 0 ? T(1) : T(0);
      case kLeaky: return z > 0 ? T(1) : static_cast<T>(net_.slope);
      case kTanh: return T(1) - a * a;
      case kSigmoid: return a * (T(1) - a);
      default: return T(1);
    }
  }
  inline T d2(int64_t act, T a) const {
    switch (act) {
      case kTanh: return T(-2) * a * (T(1) - a * a);
      case kSigmoid: return a * (T(1) - a) * (T(1) - T(2) * a);
      default: return T(0);
    }
  }

  // Loss of a_L against y and its gradient into A.da[L-1]. yf float targets or yl labels.
  T loss_grad(Acts<T>& A, int64_t N, const T* yf, const int64_t* yl, int64_t loss) const {
    const int64_t D = net_.d[net_.L];
    const T* a = A.a[net_.L - 1];
    T* da = A.da[net_.L - 1];
    T total = 0;
    if (loss == 0) {
      const T scale = T(2) / static_cast<T>(N * D);
      for (int64_t i = 0; i < N * D; ++i) {
        const T diff = a[i] - yf[i];
        total += diff * diff;
        da[i] = scale * diff;
      }
      return total / static_cast<T>(N * D);
    }
    const T invN = T(1) / static_cast<T>(N);
    for (int64_t n = 0; n < N; ++n) {
      const T* row = a + n * D;
      T* drow = da + n * D;
      const T m = *std::max_element(row, row + D);
      T sum = 0;
      for (int64_t c = 0; c < D; ++c) { drow[c] = std::exp(row[c] - m); sum += drow[c]; }
      const T inv = T(1) / sum;
      for (int64_t c = 0; c < D; ++c) drow[c] *= inv * invN;
      drow[yl[n]] -= invN;
      total += std::log(sum) + m - row[yl[n]];
    }
    return total * invN;
  }

  // Backward from A.da[L-1]: fills dz_l, da_l (l < L) and the gradient gr (flat, P).
  void backward(const T* th, const T* x, int64_t N, Acts<T>& A, T* gr) const {
    std::fill(gr, gr + net_.P, T(0));
    for (int64_t l = net_.L; l >= 1; --l) {
      const int64_t din = net_.d[l - 1], dout = net_.d[l], act = net_.acts[l - 1];
      const T* W = th + net_.offW[l - 1];
      const T* ain = l == 1 ? x : A.a[l - 2];
      const T *z = A.z[l - 1], *a = A.a[l - 1], *da = A.da[l - 1];
      T* dz = A.dz[l - 1];
      for (int64_t i = 0; i < N * dout; ++i) dz[i] = d1(act, z[i], a[i]) * da[i];
      T* gW = gr + net_.offW[l - 1];
      T* gb = gr + net_.offb[l - 1];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < dout; ++o) {
          const T dzo = dz[n * dout + o];
          gb[o] += dzo;
          axpy(dzo, ain + n * din, gW + o * din, din);
        }
      if (l > 1) {
        T* dprev = A.da[l - 2];
        std::fill(dprev, dprev + N * din, T(0));
        for (int64_t n = 0; n < N; ++n)
          for (int64_t o = 0; o < dout; ++o) axpy(dz[n * dout + o], W + o * din, dprev + n * din, din);
      }
    }
  }

  // hv = H u: Hessian of the support loss at th (activations A of that step) times u.
  void hvp(const T* th, const T* x, const Acts<T>& A, const T* du, int64_t loss, T* hv) {
    const int64_t N = K_, L = net_.L;
    std::fill(hv, hv + net_.P, T(0));
    for (int64_t l = 1; l <= L; ++l) {  // R-forward
      const int64_t din = net_.d[l - 1], dout = net_.d[l], act = net_.acts[l - 1];
      const T* W = th + net_.offW[l - 1];
      const T* dW = du + net_.offW[l - 1];
      const T* db = du + net_.offb[l - 1];
      const T* ain = l == 1 ? x : A.a[l - 2];
      const T *z = A.z[l - 1], *a = A.a[l - 1];
      T* rz = Rz[l - 1];
      T* ra = Ra[l - 1];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < dout; ++o) {
          T acc = db[o] + dot(ain + n * din, dW + o * din, din);
          if (l > 1) acc += dot(Ra[l - 2] + n * din, W + o * din, din);
          rz[n * dout + o] = acc;
        }
      for (int64_t i = 0; i < N * dout; ++i) ra[i] = d1(act, z[i], a[i]) * rz[i];
    }
    const int64_t D = net_.d[L];
    const T* raL = Ra[L - 1];
    if (loss == 0) {
      const T scale = T(2) / static_cast<T>(N * D);
      for (int64_t i = 0; i < N * D; ++i) Rda[i] = scale * raL[i];
    } else {
      const T invN = T(1) / static_cast<T>(N);
      for (int64_t n = 0; n < N; ++n) {
        // p = softmax(a_L[n]) recovered from the stored gradient: da = (p - onehot) / N.
        const T* row = A.a[L - 1] + n * D;
        const T m = *std::max_element(row, row + D);
        T sum = 0;
        for (int64_t c = 0; c < D; ++c) { Rdz[c] = std::exp(row[c] - m); sum += Rdz[c]; }
        T pr = 0;
        for (int64_t c = 0; c < D; ++c) { Rdz[c] /= sum; pr += Rdz[c] * raL[n * D + c]; }
        for (int64_t c = 0; c < D; ++c) Rda[n * D + c] = Rdz[c] * (raL[n * D + c] - pr) * invN;
      }
    }
    for (int64_t l = L; l >= 1; --l) {  // R-backward
      const int64_t din = net_.d[l - 1], dout = net_.d[l], act = net_.acts[l - 1];
      const T* W = th + net_.offW[l - 1];
      const T* dW = du + net_.offW[l - 1];
      const T* ain = l == 1 ? x : A.a[l - 2];
      const T *z = A.z[l - 1], *a = A.a[l - 1], *da = A.da[l - 1], *dz = A.dz[l - 1];
      const T* rz = Rz[l - 1];
      for (int64_t i = 0; i < N * dout; ++i)
        Rdz[i] = d2(act, a[i]) * rz[i] * da[i] + d1(act, z[i], a[i]) * Rda[i];
      T* hW = hv + net_.offW[l - 1];
      T* hb = hv + net_.offb[l - 1];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < dout; ++o) {
          hb[o] += Rdz[n * dout + o];
          axpy(Rdz[n * dout + o], ain + n * din, hW + o * din, din);
          if (l > 1) axpy(dz[n * dout + o], Ra[l - 2] + n * din, hW + o * din, din);
        }
      if (l > 1) {
        std::fill(Rda, Rda + N * din, T(0));
        for (int64_t n = 0; n < N; ++n)
          for (int64_t o = 0; o < dout; ++o) {
            axpy(Rdz[n * dout + o], W + o * din, Rda + n * din, din);
            axpy(dz[n * dout + o], dW + o * din, Rda + n * din, din);
          }
      }
    }
  }

 private:
  T* carve(Acts<T>& A, int64_t N, T* p) {
    for (auto* vec : {&A.z, &A.a, &A.da, &A.dz}) {
      vec->resize(net_.L);
      for (int64_t l = 1; l <= net_.L; ++l) { (*vec)[l - 1] = p; p += N * net_.d[l]; }
    }
    return p;
  }

  const Net& net_;
  int64_t K_, S_, dmax_;
  std::vector<T> buf_;
  std::vector<T*> Rz, Ra;
  T *Rda, *Rdz;
};

template <typename T>
void run(const Net& net, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
         const at::Tensor& yq, const std::vector<at::Tensor>& params, const T* lrflat, T lr,
         int64_t S, int64_t loss, bool first_order, bool need_lr_grad, T* loss_out, T* dtheta_out,
         T* dlr_out) {
  const int64_t Tn = xs.size(0), K = xs.size(1), Q = xq.size(1), I = net.d[0], D = net.d[net.L];
  const int64_t ystride = loss == 0 ? K * D : K, yqstride = loss == 0 ? Q * D : Q;
  const T* xsp = xs.data_ptr<T>();
  const T* xqp = xq.data_ptr<T>();
  const T* ysf = loss == 0 ? ys.data_ptr<T>() : nullptr;
  const T* yqf = loss == 0 ? yq.data_ptr<T>() : nullptr;
  const int64_t* ysl = loss == 1 ? ys.data_ptr<int64_t>() : nullptr;
  const int64_t* yql = loss == 1 ? yq.data_ptr<int64_t>() : nullptr;
  std::vector<T> theta0(net.P);
  for (int64_t l = 1; l <= net.L; ++l) {
    const auto& W = params[2 * (l - 1)];
    const auto& b = params[2 * (l - 1) + 1];
    std::copy(W.data_ptr<T>(), W.data_ptr<T>() + W.numel(), theta0.begin() + net.offW[l - 1]);
    std::copy(b.data_ptr<T>(), b.data_ptr<T>() + b.numel(), theta0.begin() + net.offb[l - 1]);
  }
  at::parallel_for(0, Tn, 1, [&](int64_t begin, int64_t end) {
    Task<T> tk(net, K, Q, S);
    const int64_t P = net.P;
    for (int64_t t = begin; t < end; ++t) {
      const T* x = xsp + t * K * I;
      const T* y = ysf ? ysf + t * ystride : nullptr;
      const int64_t* yl = ysl ? ysl + t * ystride : nullptr;
      std::copy(theta0.begin(), theta0.end(), tk.theta);
      for (int64_t s = 0; s < S; ++s) {
        const T* th = tk.theta + s * P;
        T* gs = tk.g + s * P;
        tk.forward(th, x, K, tk.steps[s]);
        tk.loss_grad(tk.steps[s], K, y, yl, loss);
        tk.backward(th, x, K, tk.steps[s], gs);
        T* next = tk.theta + (s + 1) * P;
        if (lrflat) for (int64_t j = 0; j < P; ++j) next[j] = th[j] - lrflat[j] * gs[j];
        else for (int64_t j = 0; j < P; ++j) next[j] = th[j] - lr * gs[j];
      }
      const T* xqt = xqp + t * Q * I;
      const T* thS = tk.theta + S * P;
      tk.forward(thS, xqt, Q, tk.query);
      loss_out[t] = tk.loss_grad(tk.query, Q, yqf ? yqf + t * yqstride : nullptr,
                                 yql ? yql + t * yqstride : nullptr, loss);
      tk.backward(thS, xqt, Q, tk.query, tk.v);
      std::fill(tk.dlr, tk.dlr + P, T(0));
      for (int64_t s = S - 1; s >= 0; --s) {
        const T* gs = tk.g + s * P;
        if (need_lr_grad) for (int64_t j = 0; j < P; ++j) tk.dlr[j] -= gs[j] * tk.v[j];
        if (first_order) continue;
        if (lrflat) for (int64_t j = 0; j < P; ++j) tk.u[j] = lrflat[j] * tk.v[j];
        else for (int64_t j = 0; j < P; ++j) tk.u[j] = lr * tk.v[j];
        tk.hvp(tk.theta + s * P, x, tk.steps[s], tk.u, loss, tk.h);
        for (int64_t j = 0; j < P; ++j) tk.v[j] -= tk.h[j];
      }
      std::copy(tk.v, tk.v + P, dtheta_out + t * P);
      if (need_lr_grad) std::copy(tk.dlr, tk.dlr + P, dlr_out + t * P);
    }
  });
}

}  // namespace

std::vector<at::Tensor> mlp_inner_loop_cpu(
    const at::Tensor& xs_, const at::Tensor& ys_, const at::Tensor& xq_, const at::Tensor& yq_,
    at::TensorList params_, at::TensorList lrs_, double lr, int64_t steps, at::IntArrayRef acts,
    double negative_slope, int64_t loss, bool first_order, bool need_lr_grad) {
  TORCH_CHECK(params_.size() % 2 == 0 && !params_.empty(), "mlp_inner_loop: params must be [W_1, b_1, ...]");
  const int64_t L = static_cast<int64_t>(params_.size() / 2);
  TORCH_CHECK(static_cast<int64_t>(acts.size()) == L, "mlp_inner_loop: one activation per layer");
  TORCH_CHECK(lrs_.empty() || lrs_.size() == params_.size(), "mlp_inner_loop: lrs must be empty or one per param");
  TORCH_CHECK(loss == 0 || loss == 1, "mlp_inner_loop: loss must be 0 (mse) or 1 (cross-entropy)");
  TORCH_CHECK(steps >= 0, "mlp_inner_loop: steps must be >= 0");
  const auto dtype = xs_.scalar_type();
  Net net;
  net.L = L;
  net.slope = negative_slope;
  net.acts.assign(acts.begin(), acts.end());
  net.d.push_back(params_[0].size(1));
  int64_t off = 0;
  std::vector<at::Tensor> params;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor W = params_[2 * l].contiguous(), b = params_[2 * l + 1].contiguous();
    TORCH_CHECK(W.dim() == 2 && b.dim() == 1 && b.size(0) == W.size(0) && W.size(1) == net.d.back(),
                "mlp_inner_loop: layer ", l, " has W ", W.sizes(), " and b ", b.sizes());
    net.d.push_back(W.size(0));
    net.offW.push_back(off); off += W.numel();
    net.offb.push_back(off); off += b.numel();
    params.push_back(W); params.push_back(b);
  }
  net.P = off;
  const at::Tensor xs = xs_.contiguous(), xq = xq_.contiguous();
  const at::Tensor ys = ys_.contiguous(), yq = yq_.contiguous();
  const int64_t Tn = xs.size(0);
  auto opts = xs.options();
  at::Tensor loss_out = new_output({Tn}, opts);
  at::Tensor dtheta = new_output({Tn, net.P}, opts);
  at::Tensor dlr = new_output({need_lr_grad ? Tn : 0, net.P}, opts);
  at::Tensor lrflat;
  if (!lrs_.empty()) {
    std::vector<at::Tensor> flat;
    for (const auto& t : lrs_) flat.push_back(t.to(dtype).contiguous().reshape({-1}));
    lrflat = at::cat(flat);
    TORCH_CHECK(lrflat.numel() == net.P, "mlp_inner_loop: lrs must match the params' shapes");
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "mlp_inner_loop_cpu", [&] {
    run<scalar_t>(net, xs, ys, xq, yq, params, lrflat.defined() ? lrflat.data_ptr<scalar_t>() : nullptr,
                  static_cast<scalar_t>(lr), steps, loss, first_order, need_lr_grad,
                  loss_out.data_ptr<scalar_t>(), dtheta.data_ptr<scalar_t>(),
                  need_lr_grad ? dlr.data_ptr<scalar_t>() : nullptr);
  });
  std::vector<at::Tensor> outs{loss_out};
  auto split = [&](const at::Tensor& flat) {
    for (int64_t l = 0; l < L; ++l) {
      outs.push_back(flat.narrow(1, net.offW[l], params[2 * l].numel())
                         .clone(at::MemoryFormat::Contiguous).view({Tn, net.d[l + 1], net.d[l]}));
      outs.push_back(flat.narrow(1, net.offb[l], net.d[l + 1]).clone(at::MemoryFormat::Contiguous));
    }
  };
  split(dtheta);
  if (need_lr_grad) split(dlr);
  return outs;
}

}  // namespace fastmeta
