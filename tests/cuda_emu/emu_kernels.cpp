// fastmeta's CUDA kernels compiled for the CPU through cuda_emu.h, with a C interface for ctypes
// (tests/test_cuda_emu.py): the same sources and launchers as the GPU build, and the binding's
// sizing and placement helpers (cuda::mlp_layout, mlp_sizes, mlp_choose_placement) with an H100's limits.
#include "cuda_emu.h"

#include "../../csrc/cuda/bn_relu_pool.cu"
#include "../../csrc/cuda/inner_update.cu"
#include "../../csrc/cuda/mlp_inner_loop.cu"
#include "../../csrc/cuda/tf32_split.cu"

#include <limits>
#include <vector>

namespace {

// An H100's limits for the placement choice.
constexpr int64_t kSmemPerSM = 228 * 1024, kSMs = 132, kThreadsPerSM = 2048;

// MLPArgs::occupancy for the next run_mlp calls (fm_emu_set_mlp_occupancy).
int g_mlp_occupancy = 0;

// Returns the placement the launch ran with, or -1 (fm_emu_error says why). lrs: the rate tensors
// flattened one after another (each [steps, *shape] with lr_per_step); weights: n_weights step
// weights (0: none); dlr [tasks, P] ([tasks, steps, P] with lr_per_step).
template <typename T>
int run_mlp(int L, const int* dims, const int* acts, int64_t tasks, int64_t K, int64_t Q, int64_t steps,
            const T* xs, const void* ys, const T* xq, const void* yq, const T* theta0, const T* lrs, double lr,
            double slope, int loss, int first_order, int placement, int threads, T* loss_out, T* dtheta,
            T* dlr, int lr_per_step, int n_weights, const double* weights, T* adapt_out) {
  using namespace fastmeta::cuda;
  MLPArgs<T> a{};
  a.L = L;
  for (int l = 0; l <= L; ++l) a.dims[l] = dims[l];
  for (int l = 0; l < L; ++l) a.acts[l] = acts[l];
  mlp_layout(a);
  a.num_tasks = tasks; a.K = K; a.Q = Q; a.steps = steps;
  a.loss = loss; a.first_order = first_order != 0;
  a.lr_grad = dlr != nullptr;
  a.lr_per_step = lr_per_step != 0;
  if (n_weights > kMaxWeightedSteps) {
    fm_emu::state().error = "more step weights than kMaxWeightedSteps";
    return -1;
  }
  a.weighted_steps = n_weights;
  for (int s = 0; s < n_weights; ++s) a.step_w[s] = static_cast<T>(weights[s]);
  a.threads = threads;
  a.occupancy = g_mlp_occupancy;
  a.slope = static_cast<T>(slope);  // (mlp_sizes reads it)
  mlp_sizes(a);
  a.lr = static_cast<T>(lr);
  a.xs = xs; a.xq = xq;
  if (loss == 0) { a.ys_f = static_cast<const T*>(ys); a.yq_f = static_cast<const T*>(yq); }
  else { a.ys_l = static_cast<const int64_t*>(ys); a.yq_l = static_cast<const int64_t*>(yq); }
  for (int l = 0; l < L; ++l) {  // per-layer views of the flat vectors, as the binding passes tensors
    a.theta0_w[l] = theta0 + a.off_w[l];
    a.theta0_b[l] = theta0 + a.off_b[l];
    const int64_t sets = lr_per_step ? steps : 1;
    a.lr_w[l] = lrs ? lrs + sets * a.off_w[l] : nullptr;
    a.lr_b[l] = lrs ? lrs + sets * a.off_b[l] : nullptr;
  }
  a.placement = mlp_choose_placement(a, placement, static_cast<int64_t>(fm_emu::kMaxSmemOptin), kSmemPerSM, kSMs,
                                     kThreadsPerSM);
  a.scratch_per_task = mlp_scratch_per_task(a, a.placement);
  // the workspace starts as NaN: a value read before the kernel wrote it shows in the results
  std::vector<T> scratch(tasks * a.scratch_per_task, std::numeric_limits<T>::quiet_NaN());
  a.scratch = scratch.data();
  a.loss_out = loss_out; a.dtheta = dtheta; a.dlr = dlr; a.adapt_out = adapt_out;
  fm_emu::state().error.clear();
  if (mlp_allow_smem<T>(static_cast<int>(fm_emu::kMaxSmemOptin)) != cudaSuccess) return -1;
  if (launch_mlp_inner_loop<T>(a, nullptr) != cudaSuccess) return -1;
  return a.placement;
}

template <typename T>
int run_update(int n_tensors, T** outs, const T** ps, const T** gs, const T** lrs, double lr, const int64_t* ns,
               const int64_t* p_periods, const int64_t* lr_periods) {
  using namespace fastmeta::cuda;
  std::vector<UpdateTensor<T>> table;
  std::vector<UpdateChunk> chunks;
  for (int i = 0; i < n_tensors; ++i) {
    table.push_back({outs[i], ps[i], gs[i], lrs ? lrs[i] : nullptr, static_cast<T>(lr), ns[i], p_periods[i],
                     lr_periods ? lr_periods[i] : 1});
    for (int64_t s = 0; s < ns[i]; s += kChunk) chunks.push_back({i, s});
  }
  fm_emu::state().error.clear();
  return launch_inner_update<T>(table.data(), chunks.data(), static_cast<int64_t>(chunks.size()), nullptr) ==
                 cudaSuccess ? 0 : 1;
}

// The sizes, layout and blocks a (task, channel) from dims = T, N, C, H, W, task_inner, slices
// (every [T, N, C, ., .] array laid out alike), with scratch for the slices' sums in `partial`.
template <typename T>
fastmeta::cuda::BNReLUPoolArgs<T> bn_relu_pool_dims(const int64_t* dims, std::vector<double>& partial) {
  fastmeta::cuda::BNReLUPoolArgs<T> a{};
  a.tasks = dims[0]; a.N = dims[1]; a.C = dims[2]; a.H = dims[3]; a.W = dims[4];
  a.Ho = a.H / 2; a.Wo = a.W / 2;
  a.task_inner = dims[5] != 0;
  a.slices = dims[6];
  partial.assign(static_cast<size_t>(a.tasks * a.C * a.slices * 5), std::numeric_limits<double>::quiet_NaN());
  a.partial = partial.data();
  return a;
}

// bn_relu_pool forward (gy == nullptr) or backward on host arrays (dims as above); 0 or 1 (error).
template <typename T>
int run_bn_relu_pool(const int64_t* dims, const T* x, const T* weight, const T* bias, double eps, T* y,
                     uint8_t* idx, T* mean, T* invstd, const T* gy, T* dx, T* dweight, T* dbias) {
  using namespace fastmeta::cuda;
  std::vector<double> partial;
  BNReLUPoolArgs<T> a = bn_relu_pool_dims<T>(dims, partial);
  a.x = x; a.weight = weight; a.bias = bias; a.eps = eps;
  a.y = y; a.idx = idx; a.mean = mean; a.invstd = invstd;
  a.gy = gy; a.dx = dx; a.dweight = dweight; a.dbias = dbias;
  fm_emu::state().error.clear();
  const cudaError_t e = gy == nullptr ? launch_bn_relu_pool<T>(a, nullptr) : launch_bn_relu_pool_backward<T>(a, nullptr);
  return e == cudaSuccess ? 0 : 1;
}

// bn_relu_pool's double backward on host arrays (dims as above; ggx may be null); 0 or 1 (error).
template <typename T>
int run_bn_relu_pool_double(const int64_t* dims, const T* x, const T* weight, const T* mean, const T* invstd,
                            const T* y, const uint8_t* idx, const T* gy, const T* ggx, const T* ggw, const T* ggb,
                            T* g_gy, T* g_x, T* g_w) {
  using namespace fastmeta::cuda;
  std::vector<double> partial;
  BNReLUPoolArgs<T> a = bn_relu_pool_dims<T>(dims, partial);
  a.x = x; a.weight = weight; a.mean = const_cast<T*>(mean); a.invstd = const_cast<T*>(invstd);
  a.y = const_cast<T*>(y); a.idx = const_cast<uint8_t*>(idx); a.gy = gy;
  a.ggx = ggx; a.ggw = ggw; a.ggb = ggb; a.g_gy = g_gy; a.g_x = g_x; a.g_w = g_w;
  fm_emu::state().error.clear();
  return launch_bn_relu_pool_double_backward<T>(a, nullptr) == cudaSuccess ? 0 : 1;
}

// A kernel with a deliberate race unless `sync`: thread i reads what thread i + 1 wrote in the same
// interval. The emulator's thread orders must tell the two apart (tests/test_cuda_emu.py).
__global__ void neighbour_kernel(float* out, int sync) {
  FASTMETA_DYNAMIC_SMEM(float, buf);
  const unsigned i = threadIdx.x;
  buf[i] = static_cast<float>(i);
  if (sync) __syncthreads();
  out[i] = buf[(i + 1) % blockDim.x];
}

}  // namespace

extern "C" {

int fm_emu_neighbours(float* out, int threads, int sync) {
  fm_emu::state().error.clear();
  return FASTMETA_LAUNCH(neighbour_kernel, 1u, static_cast<unsigned>(threads), threads * sizeof(float), nullptr, out,
                         sync) == cudaSuccess ? 0 : 1;
}

void fm_emu_set_mlp_occupancy(int occupancy) { g_mlp_occupancy = occupancy; }

void fm_emu_set_order(int order, uint64_t seed) {
  fm_emu::state().order = order;
  fm_emu::state().seed = seed;
}

const char* fm_emu_error() { return fm_emu::state().error.c_str(); }

uint64_t fm_emu_barriers() { return fm_emu::state().barriers; }

#define FM_EMU_MLP(NAME, T)                                                                                  \
  int NAME(int L, const int* dims, const int* acts, int64_t tasks, int64_t K, int64_t Q, int64_t steps,     \
           const T* xs, const void* ys, const T* xq, const void* yq, const T* theta0, const T* lrs, double lr, \
           double slope, int loss, int first_order, int placement, int threads, T* loss_out,                 \
           T* dtheta, T* dlr, int lr_per_step, int n_weights, const double* weights, T* adapt_out) {         \
    return run_mlp<T>(L, dims, acts, tasks, K, Q, steps, xs, ys, xq, yq, theta0, lrs, lr, slope, loss,      \
                      first_order, placement, threads, loss_out, dtheta, dlr, lr_per_step, n_weights,       \
                      weights, adapt_out);                                                                   \
  }
FM_EMU_MLP(fm_emu_mlp_f32, float)
FM_EMU_MLP(fm_emu_mlp_f64, double)

#define FM_EMU_UPDATE(NAME, T)                                                                               \
  int NAME(int n, T** outs, const T** ps, const T** gs, const T** lrs, double lr, const int64_t* ns,         \
           const int64_t* p_periods, const int64_t* lr_periods) {                                            \
    return run_update<T>(n, outs, ps, gs, lrs, lr, ns, p_periods, lr_periods);                               \
  }
FM_EMU_UPDATE(fm_emu_update_f32, float)
FM_EMU_UPDATE(fm_emu_update_f64, double)

#define FM_EMU_BNRP(NAME, T)                                                                                  \
  int NAME(const int64_t* dims, const T* x, const T* weight, const T* bias, double eps, T* y, uint8_t* idx,    \
           T* mean, T* invstd, const T* gy, T* dx, T* dweight, T* dbias) {                                     \
    return run_bn_relu_pool<T>(dims, x, weight, bias, eps, y, idx, mean, invstd, gy, dx, dweight, dbias);      \
  }
FM_EMU_BNRP(fm_emu_bn_relu_pool_f32, float)
FM_EMU_BNRP(fm_emu_bn_relu_pool_f64, double)

#define FM_EMU_BNRP2(NAME, T)                                                                                 \
  int NAME(const int64_t* dims, const T* x, const T* weight, const T* mean, const T* invstd, const T* y,       \
           const uint8_t* idx, const T* gy, const T* ggx, const T* ggw, const T* ggb, T* g_gy, T* g_x, T* g_w) { \
    return run_bn_relu_pool_double<T>(dims, x, weight, mean, invstd, y, idx, gy, ggx, ggw, ggb, g_gy, g_x, g_w); \
  }
FM_EMU_BNRP2(fm_emu_bn_relu_pool_double_f32, float)
FM_EMU_BNRP2(fm_emu_bn_relu_pool_double_f64, double)

int fm_emu_tf32_split_stack(const float* src, float* dst, int64_t outer, int64_t row, int parts, int which,
                            int max_blocks) {
  fm_emu::state().error.clear();
  return fastmeta::cuda::launch_tf32_split_stack(src, dst, outer, row, parts, which, max_blocks, nullptr) ==
                 cudaSuccess
             ? 0
             : 1;
}

}  // extern "C"
