// The whole MAML inner loop of an MLP on CUDA, one thread block per task, with the exact
// meta-gradient. Same math and contract as csrc/mlp_inner_loop.cpp (see its header): S steps
// theta_{s+1} = theta_s - lr (.) g_s, the query loss at theta_S, and the reverse pass
// v_s = v_{s+1} - H_s (lr (.) v_{s+1}) with Hessian-vector products in closed form (R-operator
// forward-over-reverse on the stored activations of step s).
//
// A block's threads share every small GEMM of a step: each thread computes whole output elements
// (a row-column dot product), phases are separated by __syncthreads(). Index math within a task is
// 32-bit (the binding checks that a task's rows times widths fit): 64-bit division and remainder
// cost several times more instructions on the GPU. Weights and activations of
// a task live in its slice of a global workspace (small enough to stay in L2), or, with
// MLPArgs::smem (FASTMETA_CUDA_MLP_SMEM=1, where it fits), in the block's shared memory.
#include <algorithm>

#include "kernels.cuh"

namespace fastmeta {
namespace cuda {
namespace {

enum : int { kNone = 0, kRelu = 1, kLeaky = 2, kTanh = 3, kSigmoid = 4 };

template <typename T>
__device__ inline T act_fwd(int act, T z, T slope) {
  switch (act) {
    case kRelu: return z > T(0) ? z : T(0);
    case kLeaky: return z > T(0) ? z : slope * z;
    case kTanh: return tanh(z);
    case kSigmoid: return T(1) / (T(1) + exp(-z));
    default: return z;
  }
}

template <typename T>
__device__ inline T act_d1(int act, T z, T a, T slope) {
  switch (act) {
    case kRelu: return z > T(0) ? T(1) : T(0);
    case kLeaky: return z > T(0) ? T(1) : slope;
    case kTanh: return T(1) - a * a;
    case kSigmoid: return a * (T(1) - a);
    default: return T(1);
  }
}

template <typename T>
__device__ inline T act_d2(int act, T a) {
  if (act == kTanh) return T(-2) * a * (T(1) - a * a);
  if (act == kSigmoid) return a * (T(1) - a) * (T(1) - T(2) * a);
  return T(0);
}

// Per-layer activation buffers of one forward/backward: z, a, da, dz, each [N, d_l] (l = 1..L).
template <typename T>
struct Acts {
  T* base;
  int64_t rows;  // N the buffers were carved for
  __device__ T* at(const MLPArgs<T>& A, int which, int l) const {  // l: 0-based layer
    int64_t off = 0;
    for (int j = 0; j < l; ++j) off += rows * A.dims[j + 1];
    int64_t sumd = 0;
    for (int j = 0; j < A.L; ++j) sumd += A.dims[j + 1];
    return base + which * rows * sumd + off;
  }
};

template <typename T>
struct Ctx {
  const MLPArgs<T>& A;
  T slope;
  __device__ const T* W(const T* th, int l) const { return th + A.off_w[l]; }
  __device__ const T* b(const T* th, int l) const { return th + A.off_b[l]; }

  // z_l = a_{l-1} W_l^T + b_l, a_l = act(z_l) for rows x [N, d_0].
  __device__ void forward(const T* th, const T* x, int64_t N, const Acts<T>& S) const {
    for (int l = 0; l < A.L; ++l) {
      const int din = A.dims[l], dout = A.dims[l + 1];
      const T* ain = l == 0 ? x : S.at(A, 1, l - 1);
      T* z = S.at(A, 0, l);
      T* a = S.at(A, 1, l);
      const T* Wl = W(th, l);
      const T* bl = b(th, l);
      for (int idx = threadIdx.x; idx < N * dout; idx += blockDim.x) {
        const int n = idx / dout, o = idx % dout;
        T acc = bl[o];
        for (int i = 0; i < din; ++i) acc += ain[n * din + i] * Wl[o * din + i];
        z[idx] = acc;
        a[idx] = act_fwd(A.acts[l], acc, slope);
      }
      __syncthreads();
    }
  }

  // Loss of a_L against the targets; its gradient into da_L; the task's loss into *loss_out.
  __device__ void loss_grad(const Acts<T>& S, int64_t N, const T* yf, const int64_t* yl, T* loss_out,
                            T* red) const {
    const int D = A.dims[A.L];
    const T* a = S.at(A, 1, A.L - 1);
    T* da = S.at(A, 2, A.L - 1);
    T part = 0;
    if (A.loss == 0) {
      const T scale = T(2) / static_cast<T>(N * D);
      for (int i = threadIdx.x; i < N * D; i += blockDim.x) {
        const T diff = a[i] - yf[i];
        part += diff * diff;
        da[i] = scale * diff;
      }
      part /= static_cast<T>(N * D);
    } else {
      const T invN = T(1) / static_cast<T>(N);
      for (int n = threadIdx.x; n < N; n += blockDim.x) {
        const T* row = a + n * D;
        T* drow = da + n * D;
        T m = row[0];
        for (int c = 1; c < D; ++c) m = max(m, row[c]);
        T sum = 0;
        for (int c = 0; c < D; ++c) sum += exp(row[c] - m);
        for (int c = 0; c < D; ++c) drow[c] = exp(row[c] - m) / sum * invN;
        drow[yl[n]] -= invN;
        part += (log(sum) + m - row[yl[n]]) * invN;
      }
    }
    red[threadIdx.x] = part;
    __syncthreads();
    if (threadIdx.x == 0 && loss_out != nullptr) {
      T total = 0;
      for (int i = 0; i < blockDim.x; ++i) total += red[i];
      *loss_out = total;
    }
    __syncthreads();
  }

  // Backward from da_L: dz_l, da_l (l < L) and the gradient gr [P].
  __device__ void backward(const T* th, const T* x, int64_t N, const Acts<T>& S, T* gr) const {
    for (int l = A.L - 1; l >= 0; --l) {
      const int din = A.dims[l], dout = A.dims[l + 1];
      const T* ain = l == 0 ? x : S.at(A, 1, l - 1);
      const T *z = S.at(A, 0, l), *a = S.at(A, 1, l), *da = S.at(A, 2, l);
      T* dz = S.at(A, 3, l);
      for (int idx = threadIdx.x; idx < N * dout; idx += blockDim.x)
        dz[idx] = act_d1(A.acts[l], z[idx], a[idx], slope) * da[idx];
      __syncthreads();
      T* gW = gr + A.off_w[l];
      T* gb = gr + A.off_b[l];
      for (int idx = threadIdx.x; idx < dout * din + dout; idx += blockDim.x) {
        T acc = 0;
        if (idx < static_cast<int64_t>(dout) * din) {
          const int o = idx / din, i = idx % din;
          for (int n = 0; n < N; ++n) acc += dz[n * dout + o] * ain[n * din + i];
          gW[idx] = acc;
        } else {
          const int o = idx - dout * din;
          for (int n = 0; n < N; ++n) acc += dz[n * dout + o];
          gb[o] = acc;
        }
      }
      if (l > 0) {
        T* dprev = S.at(A, 2, l - 1);
        const T* Wl = W(th, l);
        for (int idx = threadIdx.x; idx < N * din; idx += blockDim.x) {
          const int n = idx / din, i = idx % din;
          T acc = 0;
          for (int o = 0; o < dout; ++o) acc += dz[n * dout + o] * Wl[o * din + i];
          dprev[idx] = acc;
        }
      }
      __syncthreads();
    }
  }

  // hv = H u at th (activations S of that step); R [2, N, sum d] (Rz, Ra), Rda/Rdz [N, dmax] each.
  __device__ void hvp(const T* th, const T* x, const Acts<T>& S, const T* du, T* hv, const Acts<T>& R,
                      T* Rda, T* Rdz) const {
    const int64_t N = S.rows;
    const int L = A.L;
    for (int l = 0; l < L; ++l) {  // R-forward
      const int din = A.dims[l], dout = A.dims[l + 1];
      const T* ain = l == 0 ? x : S.at(A, 1, l - 1);
      const T* rain = l == 0 ? nullptr : R.at(A, 1, l - 1);
      const T *Wl = W(th, l), *dW = du + A.off_w[l], *db = du + A.off_b[l];
      const T *z = S.at(A, 0, l), *a = S.at(A, 1, l);
      T* rz = R.at(A, 0, l);
      T* ra = R.at(A, 1, l);
      for (int idx = threadIdx.x; idx < N * dout; idx += blockDim.x) {
        const int n = idx / dout, o = idx % dout;
        T acc = db[o];
        for (int i = 0; i < din; ++i) acc += ain[n * din + i] * dW[o * din + i];
        if (rain != nullptr)
          for (int i = 0; i < din; ++i) acc += rain[n * din + i] * Wl[o * din + i];
        rz[idx] = acc;
        ra[idx] = act_d1(A.acts[l], z[idx], a[idx], slope) * acc;
      }
      __syncthreads();
    }
    const int D = A.dims[L];
    const T* raL = R.at(A, 1, L - 1);
    if (A.loss == 0) {
      const T scale = T(2) / static_cast<T>(N * D);
      for (int i = threadIdx.x; i < N * D; i += blockDim.x) Rda[i] = scale * raL[i];
    } else {
      const T invN = T(1) / static_cast<T>(N);
      const T* aL = S.at(A, 1, L - 1);
      for (int n = threadIdx.x; n < N; n += blockDim.x) {
        const T* row = aL + n * D;
        T m = row[0];
        for (int c = 1; c < D; ++c) m = max(m, row[c]);
        T sum = 0;
        for (int c = 0; c < D; ++c) sum += exp(row[c] - m);
        T pr = 0;
        for (int c = 0; c < D; ++c) pr += exp(row[c] - m) / sum * raL[n * D + c];
        for (int c = 0; c < D; ++c) Rda[n * D + c] = exp(row[c] - m) / sum * (raL[n * D + c] - pr) * invN;
      }
    }
    __syncthreads();
    for (int l = L - 1; l >= 0; --l) {  // R-backward
      const int din = A.dims[l], dout = A.dims[l + 1], act = A.acts[l];
      const T* ain = l == 0 ? x : S.at(A, 1, l - 1);
      const T *z = S.at(A, 0, l), *a = S.at(A, 1, l), *da = S.at(A, 2, l), *dz = S.at(A, 3, l);
      const T* rz = R.at(A, 0, l);
      for (int idx = threadIdx.x; idx < N * dout; idx += blockDim.x)
        Rdz[idx] = act_d2(act, a[idx]) * rz[idx] * da[idx] + act_d1(act, z[idx], a[idx], slope) * Rda[idx];
      __syncthreads();
      const T* rain = l == 0 ? nullptr : R.at(A, 1, l - 1);
      T* hW = hv + A.off_w[l];
      T* hb = hv + A.off_b[l];
      for (int idx = threadIdx.x; idx < dout * din + dout; idx += blockDim.x) {
        T acc = 0;
        if (idx < static_cast<int64_t>(dout) * din) {
          const int o = idx / din, i = idx % din;
          for (int n = 0; n < N; ++n) {
            acc += Rdz[n * dout + o] * ain[n * din + i];
            if (rain != nullptr) acc += dz[n * dout + o] * rain[n * din + i];
          }
          hW[idx] = acc;
        } else {
          const int o = idx - dout * din;
          for (int n = 0; n < N; ++n) acc += Rdz[n * dout + o];
          hb[o] = acc;
        }
      }
      __syncthreads();  // Rda is read above for layer l and rewritten below for layer l - 1
      if (l > 0) {
        const T *Wl = W(th, l), *dW = du + A.off_w[l];
        for (int idx = threadIdx.x; idx < N * din; idx += blockDim.x) {
          const int n = idx / din, i = idx % din;
          T acc = 0;
          for (int o = 0; o < dout; ++o) acc += Rdz[n * dout + o] * Wl[o * din + i] + dz[n * dout + o] * dW[o * din + i];
          Rda[idx] = acc;
        }
      }
      __syncthreads();
    }
  }
};

__host__ __device__ inline int64_t sum_widths(const int* dims, int L) {
  int64_t s = 0;
  for (int l = 0; l < L; ++l) s += dims[l + 1];
  return s;
}

template <typename T>
__global__ void mlp_inner_loop_kernel(const MLPArgs<T> A) {
  FASTMETA_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* red = reinterpret_cast<T*>(smem_raw);
  const int64_t t = blockIdx.x;
  const int64_t P = A.P, S = A.steps, K = A.K, Q = A.Q;
  const int I = A.dims[0], D = A.dims[A.L];
  const int64_t sumd = sum_widths(A.dims, A.L);
  int dmax = 0;
  for (int l = 0; l <= A.L; ++l) dmax = max(dmax, A.dims[l]);
  const int64_t NQ = max(K, Q);
  T* w = A.smem ? red + blockDim.x : A.scratch + t * A.scratch_per_task;
  // Slots as in mlp_scratch_per_task: first order keeps two parameter sets (ping-pong) and one
  // step's activations; the per-step gradients are kept only for the learned rates' gradient.
  const bool fo = A.first_order, keep_g = A.dlr != nullptr;
  T* theta = w; w += (fo && S >= 1 ? 2 : S + 1) * P;
  T* g = w; w += (keep_g ? S : 1) * P;
  T* steps_base = w; w += (fo && S >= 1 ? 1 : S) * 4 * K * sumd;
  auto theta_at = [&](int64_t s) { return theta + (fo ? (s & 1) : s) * P; };
  auto g_at = [&](int64_t s) { return g + (keep_g ? s : 0) * P; };
  auto acts_at = [&](int64_t s) { return Acts<T>{steps_base + (fo ? 0 : s) * 4 * K * sumd, K}; };
  Acts<T> query{w, NQ}; w += 4 * NQ * sumd;
  Acts<T> R{w, K}; w += 2 * K * sumd;
  T* Rda = w; w += K * dmax;
  T* Rdz = w; w += K * dmax;
  T* v = w; w += P;
  T* u = w; w += P;
  T* h = w; w += P;
  T* dlr = w; w += P;
  Ctx<T> C{A, A.slope};
  const T* x = A.xs + t * K * I;
  const T* xq = A.xq + t * Q * I;
  const T* ysf = A.loss == 0 ? A.ys_f + t * K * D : nullptr;
  const int64_t* ysl = A.loss == 1 ? A.ys_l + t * K : nullptr;
  const T* yqf = A.loss == 0 ? A.yq_f + t * Q * D : nullptr;
  const int64_t* yql = A.loss == 1 ? A.yq_l + t * Q : nullptr;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) theta[j] = A.theta0[j];
  __syncthreads();
  for (int64_t s = 0; s < S; ++s) {
    const T* th = theta_at(s);
    const Acts<T> st = acts_at(s);
    T* gs = g_at(s);
    C.forward(th, x, K, st);
    C.loss_grad(st, K, ysf, ysl, nullptr, red);
    C.backward(th, x, K, st, gs);
    T* next = theta_at(s + 1);
    for (int64_t j = threadIdx.x; j < P; j += blockDim.x) next[j] = th[j] - (A.lrs ? A.lrs[j] : A.lr) * gs[j];
    __syncthreads();
  }
  const T* thS = theta_at(S);
  C.forward(thS, xq, Q, query);
  C.loss_grad(query, Q, yqf, yql, A.loss_out + t, red);
  C.backward(thS, xq, Q, query, v);
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) dlr[j] = T(0);
  __syncthreads();
  for (int64_t s = S - 1; s >= 0; --s) {
    for (int64_t j = threadIdx.x; j < P; j += blockDim.x) {
      if (keep_g) dlr[j] -= g_at(s)[j] * v[j];
      u[j] = (A.lrs ? A.lrs[j] : A.lr) * v[j];
    }
    __syncthreads();
    if (fo) continue;
    C.hvp(theta_at(s), x, acts_at(s), u, h, R, Rda, Rdz);
    for (int64_t j = threadIdx.x; j < P; j += blockDim.x) v[j] -= h[j];
    __syncthreads();
  }
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) {
    A.dtheta[t * P + j] = v[j];
    if (A.dlr != nullptr) A.dlr[t * P + j] = dlr[j];
  }
}

}  // namespace

int64_t mlp_scratch_per_task(const int* dims, int L, int64_t K, int64_t Q, int64_t steps, int64_t P,
                             bool first_order, bool keep_grads) {
  const int64_t sumd = sum_widths(dims, L);
  int dmax = 0;
  for (int l = 0; l <= L; ++l) dmax = std::max(dmax, dims[l]);
  const int64_t NQ = std::max(K, Q);
  const int64_t n_theta = first_order ? std::min<int64_t>(steps + 1, 2) : steps + 1;
  const int64_t n_g = keep_grads ? steps : 1;
  const int64_t n_acts = first_order ? std::min<int64_t>(steps, 1) : steps;
  return n_theta * P + n_g * P + n_acts * 4 * K * sumd + 4 * NQ * sumd + 2 * K * sumd + 2 * K * dmax + 4 * P;
}

constexpr int kThreads = 256;

template <typename T>
size_t mlp_smem_bytes(int64_t scratch_per_task, bool smem) {
  return kThreads * sizeof(T) + (smem ? static_cast<size_t>(scratch_per_task) * sizeof(T) : 0);
}

template <typename T>
cudaError_t launch_mlp_inner_loop(const MLPArgs<T>& args, cudaStream_t stream) {
  if (args.num_tasks == 0) return cudaSuccess;
  const size_t shmem = mlp_smem_bytes<T>(args.scratch_per_task, args.smem);
  if (args.smem) {  // above 48 KB a kernel must opt in to its dynamic shared memory
    const cudaError_t e = cudaFuncSetAttribute(mlp_inner_loop_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(shmem));
    if (e != cudaSuccess) return e;
  }
  return FASTMETA_LAUNCH(mlp_inner_loop_kernel<T>, static_cast<unsigned>(args.num_tasks), kThreads, shmem, stream,
                         args);
}

template size_t mlp_smem_bytes<float>(int64_t, bool);
template size_t mlp_smem_bytes<double>(int64_t, bool);
template cudaError_t launch_mlp_inner_loop<float>(const MLPArgs<float>&, cudaStream_t);
template cudaError_t launch_mlp_inner_loop<double>(const MLPArgs<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace fastmeta
