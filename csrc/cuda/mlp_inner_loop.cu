// The whole MAML inner loop of an MLP on CUDA, one thread block per task, with the exact
// meta-gradient. Same math and contract as csrc/mlp_inner_loop.cpp (see its header): S steps
// theta_{s+1} = theta_s - lr (.) g_s, the query loss at theta_S, and the reverse pass
// v_s = v_{s+1} - H_s (lr (.) v_{s+1}) with Hessian-vector products in closed form (R-operator
// forward-over-reverse on the stored activations of step s). Rates may be per step, and with
// step weights the task's loss is sum_s w_s L_query(theta_s): the reverse pass adds
// w_s grad L_query(theta_s) to v at each step (first order then keeps each step's parameters too).
//
// Every small product of a phase is one call of `gemm`: each thread computes a 2 x 2 tile of outputs,
// the threads of a warp consecutive columns (so B's loads are consecutive or odd-strided in shared
// memory and A's are broadcast), and the products of one phase share the block's threads. (4 x 4
// tiles, half the loads a multiply-add, were slower at every size and block count timed on an
// H200: fewer threads a product, more registers a thread.) Epilogues
// do the elementwise work (bias, activation and its derivatives, MSE's loss gradient and its
// R-operator, the SGD update of each parameter as its gradient element is made, the update of v),
// so a forward layer, a backward layer and an R-operator layer are one phase each, phases
// separated by __syncthreads(). A task's working set is in shared memory where it fits (several blocks share an
// SM), its history (what second order keeps of each step) in shared memory when one wave of blocks
// holds all tasks with it, else in global memory: MLPArgs::placement, chosen by the binding. Index
// math within a task is 32-bit (the binding checks that a task's slots fit).
#include "kernels.cuh"

namespace fastmeta {
namespace cuda {
namespace {

enum : int { kNone = 0, kRelu = 1, kLeaky = 2, kTanh = 3, kSigmoid = 4, kGelu = 5, kGeluTanh = 6, kSilu = 7 };

// GELU (z Phi(z)), its tanh form (z (1 + tanh(u)) / 2, u = c (z + 0.044715 z^3), c = sqrt(2 / pi):
// PyTorch's approximate='tanh') and SiLU (z sigmoid(z)): s, s', s'' as functions of z.
template <typename T>
__device__ __forceinline__ T gelu_u(T z) { return T(0.79788456080286535588) * (z + T(0.044715) * z * z * z); }
template <typename T>
__device__ __forceinline__ T gelu_du(T z) { return T(0.79788456080286535588) * (T(1) + T(3) * T(0.044715) * z * z); }
template <typename T>
__device__ __forceinline__ T normal_pdf(T z) { return T(0.39894228040143267794) * exp(T(-0.5) * z * z); }
// t = tanh(u), 1 + t and 1 - t^2 from e = exp(-2|u|), without cancellation where |t| is near 1
template <typename T>
struct TanhParts {
  T t, one_plus_t, sech2;
  __device__ __forceinline__ explicit TanhParts(T u) {
    const T e = exp(T(-2) * fabs(u)), inv = T(1) / (T(1) + e);
    t = copysign((T(1) - e) * inv, u);
    one_plus_t = (u >= T(0) ? T(2) : T(2) * e) * inv;
    sech2 = T(4) * e * inv * inv;
  }
};

template <typename T>
__device__ __forceinline__ T act_fwd(int act, T z, T slope) {
  switch (act) {
    case kRelu: return z <= T(0) ? T(0) : z;  // relu(NaN) = NaN, as PyTorch's
    case kLeaky: return z > T(0) ? z : slope * z;
    case kTanh: return tanh(z);
    case kSigmoid: return T(1) / (T(1) + exp(-z));
    case kGelu: return z * T(0.5) * (T(1) + erf(z * T(0.70710678118654752440)));
    case kGeluTanh: return T(0.5) * z * TanhParts<T>(gelu_u(z)).one_plus_t;
    case kSilu: return z / (T(1) + exp(-z));
    default: return z;
  }
}

template <typename T>
__device__ __forceinline__ T act_d1(int act, T z, T a, T slope) {
  switch (act) {
    case kRelu: return z <= T(0) ? T(0) : T(1);  // 1 at NaN, as PyTorch's ReLU derivative
    case kLeaky: return z > T(0) ? T(1) : slope;
    case kTanh: return T(1) - a * a;
    case kSigmoid: return a * (T(1) - a);
    case kGelu: return T(0.5) * (T(1) + erf(z * T(0.70710678118654752440))) + z * normal_pdf(z);
    case kGeluTanh: {
      const TanhParts<T> h(gelu_u(z));
      return T(0.5) * h.one_plus_t + T(0.5) * z * h.sech2 * gelu_du(z);
    }
    case kSilu: {
      const T g = T(1) / (T(1) + exp(-z));
      return g * (T(1) + z * (T(1) - g));
    }
    default: return T(1);
  }
}

// Whether the activation has a second derivative (all but the piecewise-linear ones).
__device__ __forceinline__ bool has_d2(int act) { return act >= kTanh; }

template <typename T>
__device__ __forceinline__ T act_d2(int act, T z, T a) {
  switch (act) {
    case kTanh: return T(-2) * a * (T(1) - a * a);
    case kSigmoid: return a * (T(1) - a) * (T(1) - T(2) * a);
    case kGelu: return normal_pdf(z) * (T(2) - z * z);
    case kGeluTanh: {
      const TanhParts<T> h(gelu_u(z));
      const T du = gelu_du(z), ddu = T(0.79788456080286535588) * T(6) * T(0.044715) * z;
      return h.sech2 * (du + T(0.5) * z * (ddu - T(2) * h.t * du * du));
    }
    case kSilu: {
      const T g = T(1) / (T(1) + exp(-z));
      return g * (T(1) - g) * (T(2) + z * (T(1) - T(2) * g));
    }
    default: return T(0);
  }
}

// The softmax of one row of D logits: p(c) = exp(row[c] - m) / sum, m the largest logit.
template <typename T>
struct Softmax {
  const T* row;
  T m, sum;
  __device__ Softmax(const T* r, int D) : row(r), m(r[0]), sum(0) {
    for (int c = 1; c < D; ++c) m = max(m, row[c]);
    for (int c = 0; c < D; ++c) sum += exp(row[c] - m);
  }
  __device__ T p(int c) const { return exp(row[c] - m) / sum; }
};

// Operand X(r, k) = p[r * sr + k * sk] of a product (r: the output row or column it feeds).
template <typename T>
struct Op {
  const T* p;
  int sr, sk;
};

// acc[r][c] += sum_k a(m[r], k) b(n[c], k) for the thread's R rows m and R columns n.
template <int R, typename T>
__device__ __forceinline__ void mac(const Op<T>& a, const Op<T>& b, int K, const int (&m)[R], const int (&n)[R],
                                    T (&acc)[R][R]) {
  const T* ap[R];
  const T* bp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    ap[r] = a.p + m[r] * a.sr;
    bp[r] = b.p + n[r] * b.sr;
  }
  // (the pointers advanced, not indexed by k: where a stride is 1 the unrolled loads take
  // immediate offsets and each pointer one add a group of iterations)
#pragma unroll(8 / R)
  for (int k = 0; k < K; ++k) {
    T x[R], y[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      x[r] = *ap[r];
      y[r] = *bp[r];
      ap[r] += a.sk;
      bp[r] += b.sk;
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < R; ++c) acc[r][c] += x[r] * y[c];
  }
}

// C [M, N] = A1 B1^T (+ A2 B2^T when K2 > 0), epi(m, n, c) for each element, in R x R tiles: the
// thread grid is ceil(M/R) x ceil(N/R), thread (i, j) computing rows i + r ceil(M/R) and columns
// j + c ceil(N/R) (r, c < R; those past the edge are computed on row i / column j and dropped);
// `first` is the number of tiles earlier products of the same phase handed out, so that this one
// starts on the threads they left idle. Returns first plus this product's tiles.
template <int R, typename T, typename Epi>
__device__ __forceinline__ int gemm_tiles(int first, int M, int N, const Op<T>& a1, const Op<T>& b1, int K1,
                                          const Op<T>& a2, const Op<T>& b2, int K2, Epi& epi) {
  const int tm = (M + R - 1) / R, tn = (N + R - 1) / R, tiles = tm * tn;
  const int nt = static_cast<int>(blockDim.x);
  int start = static_cast<int>(threadIdx.x) - first % nt;
  if (start < 0) start += nt;
  // tile t = i tn + j, (i, j) stepped by the block's stride (one division a call, not one a tile)
  const int di = nt / tn, dj = nt - di * tn;
  int i = start / tn, j = start - i * tn;
  for (int t = start; t < tiles; t += nt) {
    int m[R], n[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      m[r] = i + r * tm < M ? i + r * tm : i;
      n[r] = j + r * tn < N ? j + r * tn : j;
    }
    T acc[R][R];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < R; ++c) acc[r][c] = T(0);
    mac<R>(a1, b1, K1, m, n, acc);
    if (K2 > 0) mac<R>(a2, b2, K2, m, n, acc);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < R; ++c)
        if ((r == 0 || m[r] != i) && (c == 0 || n[c] != j)) epi(m[r], n[c], acc[r][c]);
    i += di;
    j += dj;
    if (j >= tn) {
      j -= tn;
      ++i;
    }
  }
  return first + tiles;
}

// Per-layer activation buffers of one pass: z, a, da, dz (which = 0..3), each [rows, d_l]
// (l = 1..L), at base; with 2 sections (MLPArgs::act_sections) z is a's storage and da is dz's.
template <typename T>
struct Acts {
  T* base;
  int rows, sumd, sections;
  __device__ T* at(const MLPArgs<T>& A, int which, int l) const {  // l: 0-based layer
    int off = 0;
    for (int j = 0; j < l; ++j) off += rows * A.dims[j + 1];
    return base + (sections == 4 ? which : which >> 1) * rows * sumd + off;
  }
};

// The second-derivative term act''(z) R(z) da of an R-operator backward, read only for the
// activations that have one (so never from a da that shares dz's storage).
template <typename T>
__device__ __forceinline__ T d2_term(int act, const T* z, const T* a, const T* rz, const T* da, int e) {
  return has_d2(act) ? act_d2(act, z[e], a[e]) * rz[e] * da[e] : T(0);
}

// One parameter element: its padded index j, its flat index jf, and where it is in the caller's
// per-layer tensors (layer l, element k of W_l, or of b_l when bias).
struct Param {
  int j, jf, l, k;
  bool bias;
};

// f(Param) for every parameter element this thread owns (the same elements in every call, so
// per-element state needs no barrier between calls).
template <typename T, typename F>
__device__ __forceinline__ void for_params(const MLPArgs<T>& A, F f) {
  for (int l = 0; l < A.L; ++l) {
    const int din = A.dims[l], dout = A.dims[l + 1], nw = dout * din;
    const int pw = static_cast<int>(A.pw[l]), pb = static_cast<int>(A.pb[l]), ow = static_cast<int>(A.off_w[l]);
    const int ld = A.ldw[l], nt = static_cast<int>(blockDim.x);
    // W's element idx = o din + i, (o, i) stepped by the block's stride (two divisions a layer,
    // not one an element)
    const int dq = nt / din, dr = nt - dq * din;
    int o = static_cast<int>(threadIdx.x) / din, i = static_cast<int>(threadIdx.x) - o * din;
    for (int idx = threadIdx.x; idx < nw + dout; idx += nt) {
      if (idx < nw) {
        f(Param{pw + o * ld + i, ow + idx, l, idx, false});
        o += dq;
        i += dr;
        if (i >= din) {
          i -= din;
          ++o;
        }
      } else {
        f(Param{pb + idx - nw, ow + idx, l, idx - nw, true});
      }
    }
  }
}

// The element of per-layer tensors (W_l, b_l) at p.
template <typename T>
__device__ __forceinline__ T layer_elem(const T* const (&w)[kMaxLayers], const T* const (&b)[kMaxLayers],
                                        const Param& p) {
  return p.bias ? b[p.l][p.k] : w[p.l][p.k];
}

template <typename T>
struct Ctx {
  const MLPArgs<T>& A;
  T slope;
  // The products of a phase in 2 x 2 tiles.
  template <typename Epi>
  __device__ int gemm(int first, int M, int N, const Op<T>& a1, const Op<T>& b1, int K1, const Op<T>& a2,
                      const Op<T>& b2, int K2, Epi epi) const {
    return gemm_tiles<2>(first, M, N, a1, b1, K1, a2, b2, K2, epi);
  }
  template <typename Epi>
  __device__ int gemm(int first, int M, int N, const Op<T>& a1, const Op<T>& b1, int K1, Epi epi) const {
    return gemm(first, M, N, a1, b1, K1, a1, b1, 0, epi);
  }
  __device__ Op<T> Wrows(const T* th, int l) const {  // W(o, i): rows of W
    return {th + A.pw[l], A.ldw[l], 1};
  }
  __device__ Op<T> Wcols(const T* th, int l) const {  // W^T(i, o): columns of W
    return {th + A.pw[l], 1, A.ldw[l]};
  }
  // The rate of parameter element p at step s.
  __device__ T rate(const Param& p, int s) const {
    if (A.lr_w[0] == nullptr) return A.lr;
    if (!A.lr_per_step) return layer_elem(A.lr_w, A.lr_b, p);
    const int n = p.bias ? A.dims[p.l + 1] : A.dims[p.l + 1] * A.dims[p.l];
    return (p.bias ? A.lr_b[p.l] : A.lr_w[p.l])[static_cast<int64_t>(s) * n + p.k];
  }
  // One scalar rate and no rate gradient: the reverse pass's v_{s+1} - H_s (lr v_{s+1}) is
  // v_{s+1} - lr H_s v_{s+1}, the R-operator reading v itself (see the kernel's reverse pass).
  __device__ bool fold_lr() const { return A.lr_w[0] == nullptr && A.dlr == nullptr; }

  // z_l = a_{l-1} W_l^T + b_l, a_l = act(z_l) for the rows x [N, d_0], one phase a layer; then the
  // loss of a_L against the targets, its gradient da_L and dz_L, and with loss_out the task's loss.
  // MSE's loss is part of the last layer's phase (its epilogue has each element of a_L), cross-entropy
  // (a softmax over each row) a phase of its own. during(l) runs in layer l's phase. The loss and
  // its gradient are scaled by weight (a step's in the multi-step loss); with add, the weighted
  // loss is added to *loss_out (thread 0 writes it, whichever call).
  template <typename During>
  __device__ void forward_loss(const T* th, const T* x, int N, const Acts<T>& S, const T* yf, const int64_t* yl,
                               T* loss_out, T* red, During during, T weight = T(1), bool add = false) const {
    const bool mse = A.loss == 0;
    T part = 0;
    for (int l = 0; l < A.L; ++l) {
      const int din = A.dims[l], dout = A.dims[l + 1], act = A.acts[l];
      const T* ain = l == 0 ? x : S.at(A, 1, l - 1);
      T* z = S.at(A, 0, l);
      T* a = S.at(A, 1, l);
      const T* b = th + A.pb[l];
      if (mse && l == A.L - 1) {
        T* da = S.at(A, 2, l);
        T* dz = S.at(A, 3, l);
        const T scale = weight * T(2) / static_cast<T>(N * dout);
        gemm(0, N, dout, Op<T>{ain, din, 1}, Wrows(th, l), din, [&](int n, int o, T c) {
          const int e = n * dout + o;
          c += b[o];
          const T av = act_fwd(act, c, slope);
          z[e] = c;  // (a's storage where z shares it: overwritten next)
          a[e] = av;
          const T diff = av - yf[e];
          part += diff * diff;
          const T g = scale * diff;
          da[e] = g;  // (likewise dz's)
          dz[e] = act_d1(act, c, av, slope) * g;
        });
        if (loss_out != nullptr) red[threadIdx.x] = part / static_cast<T>(N * dout);
      } else {
        gemm(0, N, dout, Op<T>{ain, din, 1}, Wrows(th, l), din, [&](int n, int o, T c) {
          c += b[o];
          z[n * dout + o] = c;
          a[n * dout + o] = act_fwd(act, c, slope);
        });
      }
      during(l);
      __syncthreads();
    }
    if (!mse) {
      loss_grad(S, N, yl, loss_out, red, weight, add);
    } else if (loss_out != nullptr && threadIdx.x == 0) {  // red is not written again before it is read
      T total = 0;
      for (unsigned i = 0; i < blockDim.x; ++i) total += red[i];
      *loss_out = add ? *loss_out + weight * total : weight * total;
    }
  }

  // Cross-entropy of a_L against the labels: da_L, dz_L; with loss_out, the task's loss (weighted and
  // added as forward_loss says). One phase.
  __device__ void loss_grad(const Acts<T>& S, int N, const int64_t* yl, T* loss_out, T* red, T weight,
                            bool add) const {
    const int D = A.dims[A.L], act = A.acts[A.L - 1];
    const T *z = S.at(A, 0, A.L - 1), *a = S.at(A, 1, A.L - 1);
    T* da = S.at(A, 2, A.L - 1);
    T* dz = S.at(A, 3, A.L - 1);
    T part = 0;
    const T invN = T(1) / static_cast<T>(N), ginvN = weight * invN;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      const Softmax<T> sm(a + n * D, D);
      const int y = static_cast<int>(yl[n]);
      for (int c = 0; c < D; ++c) {
        const int i = n * D + c;
        da[i] = (sm.p(c) - (c == y ? T(1) : T(0))) * ginvN;
        dz[i] = act_d1(act, z[i], a[i], slope) * da[i];
      }
      part += (log(sm.sum) + sm.m - sm.row[y]) * invN;
    }
    if (loss_out != nullptr) {
      red[threadIdx.x] = part;
      __syncthreads();
      if (threadIdx.x == 0) {
        T total = 0;
        for (unsigned i = 0; i < blockDim.x; ++i) total += red[i];
        *loss_out = add ? *loss_out + weight * total : weight * total;
      }
    }
    __syncthreads();
  }

  // Parameter element (o, i) of W_l (i < 0: b_l's element o) with its padded and flat indices.
  __device__ Param param(int l, int o, int i) const {
    if (i < 0) return Param{static_cast<int>(A.pb[l]) + o, static_cast<int>(A.off_b[l]) + o, l, o, true};
    const int k = o * A.dims[l] + i;
    return Param{static_cast<int>(A.pw[l]) + o * A.ldw[l] + i, static_cast<int>(A.off_w[l]) + k, l, k, false};
  }

  // From dz_L: each element of the gradient to sink(Param, g) as its product finishes, and da_l,
  // dz_l for l < L; one phase a layer, during(l) in layer l's. sink may write parameter-sized
  // vectors other than th (nothing else in these phases reads them).
  template <typename Sink, typename During>
  __device__ void backward(const T* th, const T* x, int N, const Acts<T>& S, Sink sink, During during) const {
    for (int l = A.L - 1; l >= 0; --l) {
      const int din = A.dims[l], dout = A.dims[l + 1];
      const T* ain = l == 0 ? x : S.at(A, 1, l - 1);
      const T* dz = S.at(A, 3, l);
      // dW [dout, din] = dz^T ain
      int tiles = gemm(0, dout, din, Op<T>{dz, 1, dout}, Op<T>{ain, 1, din}, N,
                       [&](int o, int i, T c) { sink(param(l, o, i), c); });
      if (l > 0) {  // da_{l-1} = dz W, and dz_{l-1}
        const int act = A.acts[l - 1];
        const T *zp = S.at(A, 0, l - 1), *ap = S.at(A, 1, l - 1);
        T* dap = S.at(A, 2, l - 1);
        T* dzp = S.at(A, 3, l - 1);
        tiles = gemm(tiles, N, din, Op<T>{dz, dout, 1}, Wcols(th, l), dout, [&](int n, int i, T c) {
          const int e = n * din + i;
          dap[e] = c;
          dzp[e] = act_d1(act, zp[e], ap[e], slope) * c;
        });
      }
      const int nt = static_cast<int>(blockDim.x);
      for (int o = (static_cast<int>(threadIdx.x) - tiles % nt + nt) % nt; o < dout; o += nt) {
        T c = 0;
        for (int n = 0; n < N; ++n) c += dz[n * dout + o];
        sink(param(l, o, -1), c);
      }
      during(l);
      __syncthreads();
    }
  }

  // v + vdelta = v - H u (fold_lr(): v - lr H u) at th (S: the activations of that step; vdelta 0,
  // or no element of v is written): R-forward (MSE's R-loss in its last layer's
  // phase, cross-entropy's a phase of its own), R-backward, one phase a layer; R holds Rz, Ra
  // [K, sum d], Rdz two [K, dmax] buffers (layer l's, and l-1's being made).
  __device__ void hvp(const T* th, const T* x, const Acts<T>& S, const T* u, T* v, int vdelta, const Acts<T>& R,
                      T* Rdz0, T* Rdz1) const {
    const int N = S.rows, L = A.L;
    const int D = A.dims[L];
    const bool mse = A.loss == 0;
    for (int l = 0; l < L; ++l) {
      const int din = A.dims[l], dout = A.dims[l + 1], act = A.acts[l];
      const T* ain = l == 0 ? x : S.at(A, 1, l - 1);
      const T *z = S.at(A, 0, l), *a = S.at(A, 1, l);
      const T* ub = u + A.pb[l];
      T* rz = R.at(A, 0, l);
      T* ra = R.at(A, 1, l);
      const bool rloss = mse && l == L - 1;  // R(da_L) = scale R(a_L), then Rdz_L
      const T* da = S.at(A, 2, l);
      T* rdz = (L - 1) % 2 == 0 ? Rdz0 : Rdz1;
      const T scale = T(2) / static_cast<T>(N * D);
      auto epi = [&](int n, int o, T c) {
        const int e = n * dout + o;
        c += ub[o];
        const T d1 = act_d1(act, z[e], a[e], slope);
        if (rloss) {
          const T d2 = has_d2(act) ? act_d2(act, z[e], a[e]) * c * da[e] : T(0);
          rdz[e] = d2 + d1 * scale * (d1 * c);
        } else {
          rz[e] = c;
          ra[e] = d1 * c;
        }
      };
      if (l == 0)
        gemm(0, N, dout, Op<T>{ain, din, 1}, Wrows(u, l), din, epi);
      else
        gemm(0, N, dout, Op<T>{ain, din, 1}, Wrows(u, l), din, Op<T>{R.at(A, 1, l - 1), din, 1}, Wrows(th, l), din,
             epi);
      __syncthreads();
    }
    if (!mse) {  // R-loss: R(da_L), then Rdz_L
      const int act = A.acts[L - 1];
      const T *raL = R.at(A, 1, L - 1), *rzL = R.at(A, 0, L - 1);
      const T *z = S.at(A, 0, L - 1), *a = S.at(A, 1, L - 1), *da = S.at(A, 2, L - 1);
      T* rdz = (L - 1) % 2 == 0 ? Rdz0 : Rdz1;
      const T invN = T(1) / static_cast<T>(N);
      for (int n = threadIdx.x; n < N; n += blockDim.x) {
        const Softmax<T> sm(a + n * D, D);
        T pr = 0;
        for (int c = 0; c < D; ++c) pr += sm.p(c) * raL[n * D + c];
        for (int c = 0; c < D; ++c) {
          const int i = n * D + c;
          const T rda = sm.p(c) * (raL[i] - pr) * invN;
          rdz[i] = d2_term(act, z, a, rzL, da, i) + act_d1(act, z[i], a[i], slope) * rda;
        }
      }
      __syncthreads();
    }
    for (int l = L - 1; l >= 0; --l) {  // R-backward
      const int din = A.dims[l], dout = A.dims[l + 1];
      const T* ain = l == 0 ? x : S.at(A, 1, l - 1);
      const T* dz = S.at(A, 3, l);
      const T* rdz = l % 2 == 0 ? Rdz0 : Rdz1;
      auto put = [&](const Param& p, T c) {
        const T nv = v[p.j] - (fold_lr() ? A.lr : T(1)) * c;
        v[p.j + vdelta] = nv;
      };
      // H u for W_l: Rdz^T ain + dz^T R(a_{l-1})
      auto epi_w = [&](int o, int i, T c) { put(param(l, o, i), c); };
      int tiles = l == 0 ? gemm(0, dout, din, Op<T>{rdz, 1, dout}, Op<T>{ain, 1, din}, N, epi_w)
                         : gemm(0, dout, din, Op<T>{rdz, 1, dout}, Op<T>{ain, 1, din}, N, Op<T>{dz, 1, dout},
                                Op<T>{R.at(A, 1, l - 1), 1, din}, N, epi_w);
      if (l > 0) {  // R(da_{l-1}) = Rdz W + dz dW, then Rdz_{l-1} into the other buffer
        const int act = A.acts[l - 1];
        const T *zp = S.at(A, 0, l - 1), *ap = S.at(A, 1, l - 1), *dap = S.at(A, 2, l - 1);
        const T* rzp = R.at(A, 0, l - 1);
        T* o_ = (l - 1) % 2 == 0 ? Rdz0 : Rdz1;
        tiles = gemm(tiles, N, din, Op<T>{rdz, dout, 1}, Wcols(th, l), dout, Op<T>{dz, dout, 1}, Wcols(u, l), dout,
                     [&](int n, int i, T c) {
                       const int e = n * din + i;
                       o_[e] = d2_term(act, zp, ap, rzp, dap, e) + act_d1(act, zp[e], ap[e], slope) * c;
                     });
      }
      const int nt = static_cast<int>(blockDim.x);
      for (int o = (static_cast<int>(threadIdx.x) - tiles % nt + nt) % nt; o < dout; o += nt) {
        T c = 0;
        for (int n = 0; n < N; ++n) c += rdz[n * dout + o];
        put(param(l, o, -1), c);
      }
      __syncthreads();
    }
  }
};

template <typename T>
__device__ __forceinline__ void copy(T* dst, const T* src, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// Launch bounds (mlp_max_threads): float fits 128 registers a thread, so blocks of up to 512
// threads (double takes a bound of 256 threads, up to 255 registers: at 128 it spills a few bytes).
// kMinBlocks = 8 (MLPArgs::occupancy): the same code held to 64 registers so that eight 128-thread
// blocks share an SM (a register-bound four otherwise): more tasks at once and more warps to hide
// latency, for a few hundred bytes of spills.
template <typename T, int kMinBlocks = 1>
__global__ void __launch_bounds__(kMinBlocks > 1 ? 128 : (sizeof(T) == 8 ? 256 : 512), kMinBlocks)
    mlp_inner_loop_kernel(const MLPArgs<T> A) {
  FASTMETA_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* red = reinterpret_cast<T*>(smem_raw);
  const int t = blockIdx.x;
  const int S = static_cast<int>(A.steps), K = static_cast<int>(A.K), Q = static_cast<int>(A.Q);
  const int Pp = static_cast<int>(A.Pp), P = static_cast<int>(A.P);
  const int I = A.dims[0], D = A.dims[A.L];
  int sumd = 0, dmax = 0;
  for (int l = 0; l < A.L; ++l) sumd += A.dims[l + 1];
  for (int l = 0; l <= A.L; ++l) dmax = max(dmax, A.dims[l]);
  const int NQ = max(K, Q);
  // fo: first order's layout (no history; theta_s and theta_{s+1} in turn), where only the last
  // step's query loss counts; with step weights first order keeps the history and runs the reverse
  // pass without its Hessian terms
  const bool fo = !mlp_keeps_history(A), keep_g = A.dlr != nullptr;
  const bool weighted = A.weighted_steps > 0;
  const int lr_sets = A.lr_per_step ? S : 1;
  T* shared = red + blockDim.x;
  T* scratch = A.scratch + static_cast<int64_t>(t) * A.scratch_per_task;
  // working set: th and gv, which hold theta_s and theta_{s+1} in turn (a step's backward pass
  // writes the next parameters as each gradient element is made), theta_S in th; second order's v
  // (the reverse pass's vector; gv then holds u = lr (.) v); one pass's activations; R buffers.
  // First order's query gradient goes straight to dtheta.
  T* w = A.placement == kAllGlobal ? scratch : shared;
  T* th = w; w += Pp;
  T* gv = w; w += Pp;
  T* v = w; w += fo ? 0 : Pp;
  const int sec = A.act_sections, step_acts = sec * K * sumd;
  const Acts<T> work{w, NQ, sumd, sec}; w += sec * NQ * sumd;
  const Acts<T> R{w, K, sumd, 4}; w += fo ? 0 : 2 * K * sumd;  // Rz, Ra (which 0, 1)
  T* Rdz0 = w; w += fo ? 0 : K * dmax;
  T* Rdz1 = w; w += fo ? 0 : K * dmax;
  T* const inputs = w; w += A.inputs;
  // history (second order): each step's parameters, gradients (learned rates), activations
  T* h = A.placement == kAllShared ? w : (A.placement == kAllGlobal ? w : scratch);
  T* h_th = h; h += fo ? 0 : S * Pp;
  T* h_g = h; h += fo || !keep_g ? 0 : S * Pp;
  T* h_q = h; h += weighted ? (S - 1) * Pp : 0;  // w_s grad L_query(theta_s), s = 1..S-1, at (s - 1) Pp
  T* h_acts = h;
  // placement 1 computes a step's parameters and activations in shared memory and copies them to
  // their history slots as they are finished (each slab during the phase after the one that made
  // it); otherwise second order computes them in (and its reverse pass reads them from) their
  // history slots directly
  const bool stage = A.placement == kWorkShared, mirror = !fo && stage;
  auto acts_at = [&](int s) {
    return Acts<T>{(fo || stage) ? work.base : h_acts + s * step_acts, K, sumd, sec};
  };
  auto theta_at = [&](int s) -> T* {  // theta_s, s <= S
    if (s == S) return th;
    if (!fo && !stage) return h_th + s * Pp;
    return (S - s) % 2 == 0 ? th : gv;
  };
  // step s's slab of layer l's activation sections: z and a (fwd), or da and dz, to its history
  auto mirror_slab = [&](int s, int l, bool fwd) {
    const Acts<T> src = acts_at(s), dst{h_acts + s * step_acts, K, sumd, sec};
    const int n = K * A.dims[l + 1];
    for (int which = fwd ? 0 : 2; which < (fwd ? 2 : 4); ++which)
      if (sec == 4 || which % 2 == 1) copy(dst.at(A, which, l), src.at(A, which, l), n);
  };
  const Ctx<T> C{A, A.slope};
  const T* x = A.xs + static_cast<int64_t>(t) * K * I;
  const T* xq = A.xq + static_cast<int64_t>(t) * Q * I;
  const T* ysf = A.loss == 0 ? A.ys_f + static_cast<int64_t>(t) * K * D : nullptr;
  const int64_t* ysl = A.loss == 1 ? A.ys_l + static_cast<int64_t>(t) * K : nullptr;
  const T* yqf = A.loss == 0 ? A.yq_f + static_cast<int64_t>(t) * Q * D : nullptr;
  const int64_t* yql = A.loss == 1 ? A.yq_l + static_cast<int64_t>(t) * Q : nullptr;
  if (A.inputs > 0) {  // the inputs and MSE targets into the working set's end (read after the first barrier)
    copy(inputs, x, K * I);
    copy(inputs + K * I, xq, Q * I);
    if (A.loss == 0) {
      copy(inputs + (K + Q) * I, ysf, K * D);
      copy(inputs + (K + Q) * I + K * D, yqf, Q * D);
      ysf = inputs + (K + Q) * I;
      yqf = ysf + K * D;
    }
    x = inputs;
    xq = x + K * I;
  }
  T* dlr = keep_g ? A.dlr + static_cast<int64_t>(t) * lr_sets * P : nullptr;
  auto dlr_at = [&](int s) { return dlr + (A.lr_per_step ? s * P : 0); };  // step s's rate gradients
  T* dth = A.dtheta + static_cast<int64_t>(t) * P;
  {
    T* th0 = theta_at(0);
    for_params(A, [&](const Param& p) {
      const T val = layer_elem(A.theta0_w, A.theta0_b, p);
      th0[p.j] = val;
      if (mirror && S > 0) h_th[p.j] = val;
      if (keep_g)
        for (int k = 0; k < lr_sets; ++k) dlr[k * P + p.jf] = T(0);
    });
    if (weighted && threadIdx.x == 0) A.loss_out[t] = T(0);  // the step losses are added to it
  }
  __syncthreads();
  for (int s = 0; s < S; ++s) {
    const Acts<T> st = acts_at(s);
    const T* cur = theta_at(s);
    T* nxt = theta_at(s + 1);
    T* hg = h_g + s * Pp;
    T* hnext = s + 1 < S && mirror ? h_th + (s + 1) * Pp : nullptr;
    C.forward_loss(cur, x, K, st, ysf, ysl, A.adapt_out != nullptr && s == 0 ? A.loss_out + t : nullptr, red,
                   [&](int l) {
                     if (mirror && l > 0) mirror_slab(s, l - 1, true);
                   });
    // theta_{s+1} = theta_s - lr (.) g_s, element by element; second order keeps g_s (learned
    // rates), first order with learned rates sums the gradients in dlr (the same thread updates an
    // element in every step: its product's tile)
    C.backward(cur, x, K, st,
               [&](const Param& p, T g) {
                 const T val = cur[p.j] - C.rate(p, s) * g;
                 nxt[p.j] = val;
                 if (!fo) {
                   if (keep_g) hg[p.j] = g;
                   if (hnext != nullptr) hnext[p.j] = val;
                 } else if (keep_g) {
                   dlr_at(s)[p.jf] += g;
                 }
               },
               [&](int l) {
                 if (!mirror) return;
                 if (l == A.L - 1) mirror_slab(s, l, true);
                 mirror_slab(s, l, false);
               });
    // the multi-step loss: w grad L_query(theta_{s+1}) kept for the reverse pass (the last step's
    // is made below), w L_query(theta_{s+1}) added to the task's loss
    const T w = weighted && s + 1 < S ? A.step_w[s] : T(0);
    if (w != T(0)) {
      T* hq = h_q + s * Pp;
      C.forward_loss(nxt, xq, Q, Acts<T>{work.base, Q, sumd, sec}, yqf, yql, A.loss_out + t, red, [](int) {}, w,
                     /*add=*/true);
      C.backward(nxt, xq, Q, Acts<T>{work.base, Q, sumd, sec}, [&](const Param& p, T c) { hq[p.j] = c; },
                 [](int) {});
    }
  }
  if (A.adapt_out != nullptr) {  // the inner loop alone: theta_S out (steps >= 1: the binding's)
    T* out = A.adapt_out + static_cast<int64_t>(t) * P;
    const T* thS = theta_at(S);
    for_params(A, [&](const Param& p) { out[p.jf] = thS[p.j]; });
    return;
  }
  const Acts<T> query{work.base, Q, sumd, sec};
  auto none = [](int) {};
  // the query gradient v_S (weighted): first order (v_s = v_S for every s), or no steps,
  // d theta_0 = v_S and d lr_s = -g_s (.) v_S; else v, the first reverse step's u = lr (.) v_S and
  // its lr term. (With step weights, never the former: first order keeps the history then.)
  const bool last = fo || S == 0;
  const bool fold_lr = C.fold_lr();  // (see the reverse pass)
  const T* hg_last = h_g + (S - 1) * Pp;
  const T wS = weighted ? A.step_w[S - 1] : T(1);
  if (wS != T(0)) {
    C.forward_loss(th, xq, Q, query, yqf, yql, A.loss_out + t, red, none, wS, /*add=*/weighted);
    C.backward(th, xq, Q, query,
               [&](const Param& p, T c) {
                 if (last) {
                   dth[p.jf] = c;
                   if (keep_g && fo)
                     for (int k = 0; k < lr_sets; ++k) dlr[k * P + p.jf] = -dlr[k * P + p.jf] * c;
                 } else {
                   v[p.j] = c;
                   if (!fold_lr) gv[p.j] = C.rate(p, S - 1) * c;
                   if (keep_g) dlr_at(S - 1)[p.jf] -= hg_last[p.j] * c;
                 }
               },
               none);
  } else {  // a weight of 0: the query loss at theta_S is not evaluated (v_S = 0; only with weights, not last)
    for_params(A, [&](const Param& p) {
      v[p.j] = T(0);
      if (!fold_lr) gv[p.j] = T(0);
    });
    __syncthreads();
  }
  if (last) return;
  // v_s = v_{s+1} - H_s (lr (.) v_{s+1}). With one scalar rate (and no rate gradient) that is
  // v_{s+1} - lr H_s v_{s+1}: the R-operator reads v itself, and the new v goes to the other
  // buffer (v and gv in turn), so no phase makes u; else u = lr (.) v in gv (the query's backward
  // made the first), v updated in place.
  T* vin = v;
  int vdelta = fold_lr ? static_cast<int>(gv - v) : 0;
  for (int s = S - 1; s >= 0; --s) {
    const T* ths = h_th + s * Pp;
    const T* hg = h_g + s * Pp;
    if (stage) {
      copy(th, ths, Pp);
      copy(work.base, h_acts + s * step_acts, step_acts);
      ths = th;
    }
    const bool rates = !fold_lr && s < S - 1;
    if (rates) {
      for_params(A, [&](const Param& p) {
        if (keep_g) dlr_at(s)[p.jf] -= hg[p.j] * v[p.j];
        gv[p.j] = C.rate(p, s) * v[p.j];
      });
    }
    if (stage || rates) __syncthreads();
    if (!A.first_order) {
      C.hvp(ths, x, acts_at(s), fold_lr ? vin : gv, vin, vdelta, R, Rdz0, Rdz1);
      vin += vdelta;
      vdelta = -vdelta;
    }
    // the multi-step loss: v_s += w_s grad L_query(theta_s), made by the forward pass
    if (weighted && s > 0 && A.step_w[s - 1] != T(0)) {
      const T* hq = h_q + (s - 1) * Pp;
      for_params(A, [&](const Param& p) { vin[p.j] += hq[p.j]; });
      __syncthreads();
    }
  }
  for_params(A, [&](const Param& p) { dth[p.jf] = vin[p.j]; });  // v_0 is d theta_0
}

}  // namespace

template <typename T>
cudaError_t mlp_allow_smem(int bytes) {
  const cudaError_t e =
      cudaFuncSetAttribute(mlp_inner_loop_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  return cudaFuncSetAttribute(mlp_inner_loop_kernel<T, 8>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

int mlp_max_threads(int occupancy, int elem_bytes) { return occupancy > 0 ? 128 : (elem_bytes == 8 ? 256 : 512); }

template <typename T>
cudaError_t launch_mlp_inner_loop(const MLPArgs<T>& args, cudaStream_t stream) {
  if (args.num_tasks == 0) return cudaSuccess;
  if (args.threads > mlp_max_threads(args.occupancy, sizeof(T))) return cudaErrorInvalidValue;
  if (args.occupancy != 0 && args.occupancy != 8) return cudaErrorInvalidValue;
  const size_t shmem = mlp_smem_bytes(args, args.placement);
  const unsigned grid = static_cast<unsigned>(args.num_tasks), block = static_cast<unsigned>(args.threads);
  void (*kernel)(const MLPArgs<T>) = args.occupancy == 8 ? mlp_inner_loop_kernel<T, 8> : mlp_inner_loop_kernel<T>;
  return FASTMETA_LAUNCH(kernel, grid, block, shmem, stream, args);
}

template cudaError_t mlp_allow_smem<float>(int);
template cudaError_t mlp_allow_smem<double>(int);
template cudaError_t launch_mlp_inner_loop<float>(const MLPArgs<float>&, cudaStream_t);
template cudaError_t launch_mlp_inner_loop<double>(const MLPArgs<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastmeta
