// CUDA implementations of fastmeta's ops (built only when torch has CUDA and nvcc is found).
#include <algorithm>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <mutex>
#include <tuple>
#include <vector>

#include "../common.h"
#include "kernels.cuh"

namespace fastmeta {
namespace {

template <typename T>
std::vector<at::Tensor> update_cuda(at::TensorList params, at::TensorList grads, const std::vector<at::Tensor>& lrs,
                                    double lr) {
  const c10::cuda::CUDAGuard guard(grads[0].device());  // (checked, and not empty: the callers)
  std::vector<at::Tensor> outs, keep;
  std::vector<cuda::UpdateTensor<T>> table;
  std::vector<cuda::UpdateChunk> chunks;
  for (size_t i = 0; i < grads.size(); ++i) {
    at::Tensor g = grads[i].contiguous();
    at::Tensor out = new_output(g.sizes(), g.options());
    Periodic p = as_periodic(params[i], g.sizes());
    cuda::UpdateTensor<T> t{out.data_ptr<T>(), p.base.data_ptr<T>(), g.data_ptr<T>(), nullptr,
                            static_cast<T>(lr), g.numel(), p.period, 1};
    if (!lrs.empty()) {
      Periodic l = as_periodic(lrs[i].to(g.scalar_type()), g.sizes());
      t.lr = l.base.data_ptr<T>();
      t.lr_period = l.period;
      keep.push_back(l.base);
    }
    keep.push_back(p.base);
    keep.push_back(g);
    for (int64_t s = 0; s < g.numel(); s += cuda::kChunk) chunks.push_back({static_cast<int32_t>(i), s});
    table.push_back(t);
    outs.push_back(out);
  }
  if (chunks.empty()) return outs;
  // one host->device copy of the tables (pinned, async), then one launch
  const int64_t tb = table.size() * sizeof(table[0]), cb = chunks.size() * sizeof(chunks[0]);
  at::Tensor host = at::empty({tb + cb}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), tb);
  std::memcpy(static_cast<uint8_t*>(host.data_ptr()) + tb, chunks.data(), cb);
  at::Tensor dev = host.to(grads[0].device(), /*non_blocking=*/true);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* dtable = reinterpret_cast<const cuda::UpdateTensor<T>*>(dev.data_ptr());
  const auto* dchunks = reinterpret_cast<const cuda::UpdateChunk*>(static_cast<uint8_t*>(dev.data_ptr()) + tb);
  // (a non-blocking copy from pinned memory records its event, so `host` is not reused too early)
  C10_CUDA_CHECK(cuda::launch_inner_update<T>(dtable, dchunks, static_cast<int64_t>(chunks.size()), stream));
  return outs;
}

std::vector<at::Tensor> inner_update_scalar_cuda(at::TensorList params, at::TensorList grads, double lr) {
  check_update_args(params, grads, {});
  if (grads.empty()) return {};
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "inner_update_cuda", [&] {
    outs = update_cuda<scalar_t>(params, grads, {}, lr);
  });
  return outs;
}

std::vector<at::Tensor> inner_update_tensor_cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  check_update_args(params, grads, lrs);
  if (grads.empty()) return {};
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "inner_update_cuda", [&] {
    outs = update_cuda<scalar_t>(params, grads, lrs.vec(), 0.0);
  });
  return outs;
}

// What the placement choice needs of a device, read once a device.
struct DeviceLimits {
  int smem_optin = 0, smem_per_sm = 0, sms = 0, threads_per_sm = 0;
};

// The first call on a device also lets the MLP kernel (both dtypes) use all the shared memory a
// block may opt in to, so no launch (none inside a CUDA graph capture either) needs that call.

const DeviceLimits& device_limits(int device) {
  static std::mutex mu;
  static std::map<int, DeviceLimits> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceLimits d;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  C10_CUDA_CHECK(cuda::mlp_allow_smem<float>(d.smem_optin));
  C10_CUDA_CHECK(cuda::mlp_allow_smem<double>(d.smem_optin));
  return cache.emplace(device, d).first->second;
}

// The MLP kernel's occupancy build: FASTMETA_CUDA_MLP_OCC=8 takes the kernel held to 64 registers
// (eight 128-thread blocks an SM); unset or 0 the default one.
int mlp_occupancy() {
  const char* env = std::getenv("FASTMETA_CUDA_MLP_OCC");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "0") == 0) return 0;
  TORCH_CHECK(std::strcmp(env, "8") == 0, "FASTMETA_CUDA_MLP_OCC must be 0 or 8, got '", env, "'");
  return 8;
}

// Threads a block of the MLP kernel: FASTMETA_CUDA_MLP_THREADS (a multiple of 32 up to the
// kernel's launch bound, cuda::mlp_max_threads), else 256 when every task has an SM to itself
// (more threads shorten each phase and nothing else shares the SM), else 128 (several blocks an
// SM), at most the bound of the build (the occupancy build's, or the default's) and dtype.
int mlp_threads(int64_t tasks, int occupancy, int sms, int elem_bytes) {
  const int most = cuda::mlp_max_threads(occupancy, elem_bytes);
  const char* env = std::getenv("FASTMETA_CUDA_MLP_THREADS");
  if (env == nullptr || env[0] == '\0') return std::min(tasks <= sms ? 256 : 128, most);
  const int n = std::atoi(env);
  TORCH_CHECK(n >= 32 && n <= 512 && n % 32 == 0, "FASTMETA_CUDA_MLP_THREADS must be a multiple of 32 from 32 "
              "to 512, got '", env, "'");
  TORCH_CHECK(n <= most, "FASTMETA_CUDA_MLP_THREADS=", n, occupancy ? " with FASTMETA_CUDA_MLP_OCC=8" : "", " in ",
              elem_bytes == 8 ? "float64" : "float32", ": at most ", most, " threads a block");
  return n;
}

// FASTMETA_CUDA_MLP_SMEM=0|1|2 forces a placement (global / working set in shared memory / all in
// shared memory, each where it fits); unset or auto: cuda::mlp_choose_placement decides.
template <typename T>
int mlp_placement(const cuda::MLPArgs<T>& a, int device) {
  const char* env = std::getenv("FASTMETA_CUDA_MLP_SMEM");
  int forced = -1;
  if (env != nullptr && env[0] != '\0' && std::strcmp(env, "auto") != 0) {
    TORCH_CHECK((env[0] == '0' || env[0] == '1' || env[0] == '2') && env[1] == '\0',
                "FASTMETA_CUDA_MLP_SMEM must be auto, 0, 1 or 2, got '", env, "'");
    forced = env[0] - '0';
  }
  const DeviceLimits& d = device_limits(device);
  return cuda::mlp_choose_placement(a, forced, d.smem_optin, d.smem_per_sm, d.sms, d.threads_per_sm);
}

// fastmeta::cuda_timer (common.h): fn timed on the current stream with CUDA events, one call to warm
// and `reps` timed; -1 without calling fn while the stream is being captured.
double time_on_current_stream(const std::function<void()>& fn, int reps) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return -1.0;
  fn();
  cudaEvent_t start, stop;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  C10_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < reps; ++i) fn();
  C10_CUDA_CHECK(cudaEventRecord(stop, stream));
  C10_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  C10_CUDA_CHECK(cudaEventDestroy(start));
  C10_CUDA_CHECK(cudaEventDestroy(stop));
  return static_cast<double>(ms) / reps;
}

// fastmeta::tf32_split_stack_cuda (common.h) on the current stream.
void tf32_split_stack(const at::Tensor& src, const at::Tensor& dst, int64_t outer, int64_t row, int parts,
                      int which) {
  const c10::cuda::CUDAGuard guard(src.device());
  const int blocks = 8 * device_limits(src.get_device()).sms;
  C10_CUDA_CHECK(cuda::launch_tf32_split_stack(src.data_ptr<float>(), dst.data_ptr<float>(), outer, row, parts, which,
                                               blocks, c10::cuda::getCurrentCUDAStream()));
}

const bool timer_set = [] {
  cuda_timer() = &time_on_current_stream;
  tf32_split_stack_cuda() = &tf32_split_stack;
  return true;
}();

// A launch configuration of the MLP kernel: occupancy build, threads a block, and a forced
// placement (-1: cuda::mlp_choose_placement decides).
struct MLPConfig {
  int occupancy, threads, placement;
};

// Whether the environment forces any part of the configuration (FASTMETA_CUDA_MLP_OCC, _THREADS,
// _SMEM): then it is taken as given, never tuned.
bool mlp_config_forced() {
  for (const char* name : {"FASTMETA_CUDA_MLP_OCC", "FASTMETA_CUDA_MLP_THREADS", "FASTMETA_CUDA_MLP_SMEM"}) {
    const char* env = std::getenv(name);
    if (env != nullptr && env[0] != '\0') return true;
  }
  return false;
}

// FASTMETA_CUDA_MLP_AUTOTUNE=0 turns the timing of configurations off (unset or 1: on).
bool mlp_autotune_on() {
  const char* env = std::getenv("FASTMETA_CUDA_MLP_AUTOTUNE");
  if (env == nullptr || env[0] == '\0') return true;
  TORCH_CHECK((env[0] == '0' || env[0] == '1') && env[1] == '\0', "FASTMETA_CUDA_MLP_AUTOTUNE must be 0 or 1, got '",
              env, "'");
  return env[0] == '1';
}

// a's occupancy, threads, placement and scratch size for configuration c (a's sizes set).
template <typename T>
void mlp_apply_config(cuda::MLPArgs<T>& a, const MLPConfig& c, int device) {
  a.occupancy = c.occupancy;
  a.threads = c.threads;
  const DeviceLimits& d = device_limits(device);
  a.placement = cuda::mlp_choose_placement(a, c.placement, d.smem_optin, d.smem_per_sm, d.sms, d.threads_per_sm);
  a.scratch_per_task = cuda::mlp_scratch_per_task(a, a.placement);
}

// One launch of a (configured) on stream, with its global scratch allocated for it (the caching
// allocator's stream order keeps that memory the kernel's until it has run).
template <typename T>
cudaError_t mlp_launch(cuda::MLPArgs<T> a, const at::TensorOptions& opts, cudaStream_t stream) {
  at::Tensor scratch = at::empty({a.scratch_per_task > 0 ? a.num_tasks : 0, a.scratch_per_task}, opts);
  a.scratch = scratch.data_ptr<T>();
  return cuda::launch_mlp_inner_loop<T>(a, stream);
}

// The configuration for a launch that the environment does not force. With one block an SM or
// fewer (tasks <= SMs) the default: 256 threads. With more, several blocks share each
// SM and which build and placement keep the most of them busy depends on the MLP, the step count
// and the card: the first launch of each shape (device, dtype, widths, activations, rows, steps,
// tasks, order, rates, loss) outside a graph capture times the candidates (the default; the
// occupancy build with its working set where it fits and in global memory; 64-thread blocks; one
// warp a task, whose barriers hold no other warp and whose blocks (up to 32 an SM) are bounded by
// the working set in shared memory, or, with it in global memory, by registers: 16 blocks an SM,
// 32 in the occupancy build), each with one launch to warm and three timed (CUDA events), and
// keeps the fastest for that shape (FASTMETA_CUDA_MLP_AUTOTUNE=0: always the default;
// FASTMETA_CUDA_MLP_AUTOTUNE_LOG=1 prints each timing to stderr). Every candidate computes the same outputs (each is tested against the
// reference); the caller's launch then runs the chosen one.
template <typename T>
MLPConfig mlp_config(const cuda::MLPArgs<T>& a, const at::TensorOptions& opts, cudaStream_t stream, int device) {
  const DeviceLimits& d = device_limits(device);
  const MLPConfig def{0, std::min(a.num_tasks <= d.sms ? 256 : 128, cuda::mlp_max_threads(0, sizeof(T))), -1};
  const bool tune = mlp_autotune_on();  // (read first: a bad value raises whatever the shape)
  if (a.num_tasks <= d.sms || !tune) return def;
  std::vector<int64_t> key{device, static_cast<int64_t>(sizeof(T)), a.L, a.K, a.Q, a.steps, a.num_tasks,
                           a.first_order, a.lr_grad, a.loss, a.slope >= T(0), a.lr_per_step, a.weighted_steps,
                           a.adapt_out != nullptr};
  for (int l = 0; l < a.L; ++l) {
    key.push_back(a.dims[l + 1]);
    key.push_back(a.acts[l]);
  }
  key.push_back(a.dims[0]);
  static std::mutex mu;
  static std::map<std::vector<int64_t>, MLPConfig> chosen;
  {
    const std::lock_guard<std::mutex> lock(mu);
    auto it = chosen.find(key);
    if (it != chosen.end()) return it->second;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return def;  // no timing inside a capture
  const MLPConfig candidates[] = {def,           {8, 128, -1}, {8, 128, cuda::kAllGlobal}, {0, 64, -1},
                                  {0, 32, -1},   {0, 32, cuda::kAllGlobal}, {8, 32, cuda::kAllGlobal}};
  cudaEvent_t start, stop;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&stop));
  MLPConfig best = def;
  float best_ms = -1.0f;
  const char* log_env = std::getenv("FASTMETA_CUDA_MLP_AUTOTUNE_LOG");
  const bool log = log_env != nullptr && log_env[0] == '1';
  std::string report;
  std::vector<std::tuple<int, int, int>> tried;  // (occupancy, threads, placement) actually launched
  std::tuple<int, int, int> best_what{def.occupancy, def.threads, -1};
  for (const MLPConfig& c : candidates) {
    cuda::MLPArgs<T> b = a;
    mlp_apply_config(b, c, device);
    const auto what = std::make_tuple(b.occupancy, b.threads, b.placement);
    if (std::find(tried.begin(), tried.end(), what) != tried.end()) continue;  // same launch as one timed
    tried.push_back(what);
    if (mlp_launch<T>(b, opts, stream) != cudaSuccess) {  // a build this card cannot launch: skip it
      (void)cudaGetLastError();
      continue;
    }
    C10_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int i = 0; i < 3; ++i) C10_CUDA_CHECK(mlp_launch<T>(b, opts, stream));
    C10_CUDA_CHECK(cudaEventRecord(stop, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (log) {
      report += c10::str(" [occupancy ", b.occupancy, ", ", b.threads, " threads, placement ", b.placement, "] ",
                         ms * 1000.0f / 3.0f, " us;");
    }
    if (best_ms < 0.0f || ms < best_ms) {
      best_ms = ms;
      best = c;
      best_what = what;
    }
  }
  C10_CUDA_CHECK(cudaEventDestroy(start));
  C10_CUDA_CHECK(cudaEventDestroy(stop));
  if (log) {
    std::fprintf(stderr, "fastmeta: mlp_inner_loop (cuda) autotune, %lld tasks, %s order:%s chosen occupancy %d, "
                 "%d threads, placement %d\n", static_cast<long long>(a.num_tasks), a.first_order ? "first" : "second",
                 report.c_str(), std::get<0>(best_what), std::get<1>(best_what), std::get<2>(best_what));
  }
  const std::lock_guard<std::mutex> lock(mu);
  chosen[key] = best;
  return best;
}

template <typename T>
void mlp_cuda(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
              const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& lrs, double lr, int64_t steps,
              at::IntArrayRef acts, double slope, int64_t loss, bool first_order, at::ArrayRef<double> step_weights,
              at::Tensor& loss_out, at::Tensor& dtheta, at::Tensor& dlr, int64_t P, at::Tensor* adapt_out = nullptr) {
  cuda::MLPArgs<T> a{};
  const int L = static_cast<int>(params.size() / 2);
  a.L = L;
  a.dims[0] = static_cast<int>(params[0].size(1));
  for (int l = 0; l < L; ++l) {
    a.dims[l + 1] = static_cast<int>(params[2 * l].size(0));
    a.acts[l] = static_cast<int>(acts[l]);
  }
  cuda::mlp_layout(a);
  TORCH_CHECK(a.P == P, "mlp_inner_loop (cuda): params must be [W_1 [d_1, d_0], b_1 [d_1], ...]");
  a.num_tasks = xs.size(0); a.K = xs.size(1); a.Q = xq.size(1); a.steps = steps;
  a.loss = static_cast<int>(loss); a.first_order = first_order;
  a.lr_grad = dlr.numel() > 0;
  a.lr_per_step = mlp_rates_per_step(params, lrs);
  a.weighted_steps = static_cast<int>(step_weights.size());  // (checked: at most kMaxWeightedSteps)
  for (size_t s = 0; s < step_weights.size(); ++s) a.step_w[s] = static_cast<T>(step_weights[s]);
  a.slope = static_cast<T>(slope);  // (mlp_sizes reads it)
  cuda::mlp_sizes(a);
  TORCH_CHECK(a.work + a.hist < (int64_t{1} << 31), "mlp_inner_loop (cuda): one task's workspace (", a.work,
              " + ", a.hist, " elements for ", a.K, " support rows, ", a.Q, " query rows, ", steps,
              " steps and ", a.P, " parameters) exceeds 32-bit indexing");
  a.lr = static_cast<T>(lr);
  a.xs = xs.data_ptr<T>(); a.xq = xq.data_ptr<T>();
  if (loss == 0) { a.ys_f = ys.data_ptr<T>(); a.yq_f = yq.data_ptr<T>(); }
  else { a.ys_l = ys.data_ptr<int64_t>(); a.yq_l = yq.data_ptr<int64_t>(); }
  for (int l = 0; l < L; ++l) {  // (contiguous, each checked against its layer's shape by the caller)
    a.theta0_w[l] = params[2 * l].data_ptr<T>();
    a.theta0_b[l] = params[2 * l + 1].data_ptr<T>();
    a.lr_w[l] = lrs.empty() ? nullptr : lrs[2 * l].data_ptr<T>();
    a.lr_b[l] = lrs.empty() ? nullptr : lrs[2 * l + 1].data_ptr<T>();
  }
  a.loss_out = loss_out.data_ptr<T>();
  a.dtheta = dtheta.data_ptr<T>();
  a.dlr = a.lr_grad ? dlr.data_ptr<T>() : nullptr;
  a.adapt_out = adapt_out != nullptr ? adapt_out->data_ptr<T>() : nullptr;
  const int device = xs.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (mlp_config_forced()) {
    a.occupancy = mlp_occupancy();
    a.threads = mlp_threads(a.num_tasks, a.occupancy, device_limits(device).sms, sizeof(T));
    a.placement = mlp_placement(a, device);
    a.scratch_per_task = cuda::mlp_scratch_per_task(a, a.placement);
  } else {
    mlp_apply_config(a, mlp_config(a, xs.options(), stream, device), device);
  }
  C10_CUDA_CHECK(mlp_launch<T>(a, xs.options(), stream));
}

// The checks, tensors and launch of fastmeta::mlp_inner_loop (adapt false: [loss, dtheta, dlr]) and
// of fastmeta::mlp_adapt with steps >= 1 (adapt true: the kernel's inner loop alone, first order,
// no rate gradient: [theta_S [T, P], the support loss at theta_0], xq / yq then the support set).
std::vector<at::Tensor> mlp_run_cuda(const at::Tensor& xs_, const at::Tensor& ys_, const at::Tensor& xq_,
                                     const at::Tensor& yq_, at::TensorList params_, at::TensorList lrs_, double lr,
                                     int64_t steps, at::IntArrayRef acts, double negative_slope, int64_t loss,
                                     bool first_order, bool need_lr_grad, at::ArrayRef<double> step_weights,
                                     bool adapt) {
  const char* op = adapt ? "mlp_adapt" : "mlp_inner_loop";
  check_mlp_args(xs_, ys_, xq_, yq_, params_, lrs_, steps, loss);
  check_step_weights(step_weights, steps);
  TORCH_CHECK(static_cast<int64_t>(step_weights.size()) <= cuda::kMaxWeightedSteps, op, " (cuda): "
              "step_weights for at most ", cuda::kMaxWeightedSteps, " steps, got ", step_weights.size());
  const int64_t L = static_cast<int64_t>(params_.size() / 2);
  TORCH_CHECK(L <= cuda::kMaxLayers, op, " (cuda): at most ", cuda::kMaxLayers, " layers, got ", L);
  TORCH_CHECK(static_cast<int64_t>(acts.size()) == L, op, ": one activation per layer");
  for (const int64_t a : acts) TORCH_CHECK(a >= 0 && a <= 7, op, " (cuda): activation code ", a, " is not one of 0..7");
  const c10::cuda::CUDAGuard guard(xs_.device());
  // the kernel reads each parameter (and rate) tensor where it is: no concatenation (shapes,
  // dtypes and devices checked above)
  std::vector<at::Tensor> params, lrs;
  int64_t P = 0;
  for (const at::Tensor& p : params_) {
    params.push_back(p.contiguous());
    P += p.numel();
  }
  for (const at::Tensor& r : lrs_) lrs.push_back(r.to(xs_.scalar_type()).contiguous());
  const at::Tensor xs = xs_.contiguous(), xq = xq_.contiguous(), ys = ys_.contiguous(), yq = yq_.contiguous();
  const int64_t Tn = xs.size(0);
  auto opts = xs.options();
  at::Tensor loss_out = new_output({Tn}, opts);
  at::Tensor theta = adapt ? new_output({Tn, P}, opts) : at::Tensor();
  at::Tensor dtheta = adapt ? at::empty({0}, opts) : new_output({Tn, P}, opts);  // (adapt: not written)
  const bool per_step = mlp_rates_per_step(params_, lrs_);
  const int64_t sets = per_step ? steps : 1;
  at::Tensor dlr = new_output({need_lr_grad ? Tn : 0, sets * P}, opts);
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "mlp_run_cuda", [&] {
    mlp_cuda<scalar_t>(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss, first_order, step_weights,
                       loss_out, dtheta, dlr, P, adapt ? &theta : nullptr);
  });
  if (adapt) return {theta, loss_out};
  if (per_step && need_lr_grad) dlr = rate_rows_in_op_order(dlr, params, steps);
  return {loss_out, dtheta, dlr};
}

std::vector<at::Tensor> mlp_inner_loop_cuda(
    const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList params, at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
    double negative_slope, int64_t loss, bool first_order, bool need_lr_grad, at::ArrayRef<double> step_weights) {
  return mlp_run_cuda(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss, first_order, need_lr_grad,
                      step_weights, /*adapt=*/false);
}

// fastmeta::mlp_adapt: the kernel's inner loop alone (first order, its query and reverse pass not
// run), theta_S of each task and the support loss at theta_0. With no steps, that loss is the
// kernel's query loss with the support set as the query set, and theta_S the meta-parameters.
std::vector<at::Tensor> mlp_adapt_cuda(const at::Tensor& xs, const at::Tensor& ys, at::TensorList params,
                                       at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
                                       double negative_slope, int64_t loss) {
  if (steps == 0) {
    auto out = mlp_run_cuda(xs, ys, xs, ys, params, lrs, lr, 0, acts, negative_slope, loss, true, false,
                            at::ArrayRef<double>(), /*adapt=*/false);
    std::vector<at::Tensor> flat;
    for (const at::Tensor& p : params) flat.push_back(p.reshape({-1}));
    return {at::cat(flat).unsqueeze(0).expand({xs.size(0), -1}).contiguous(), out[0]};
  }
  return mlp_run_cuda(xs, ys, xs, ys, params, lrs, lr, steps, acts, negative_slope, loss, /*first_order=*/true,
                      /*need_lr_grad=*/false, at::ArrayRef<double>(), /*adapt=*/true);
}

// fastmeta::bn_relu_pool, its backward and double backward (csrc/cuda/bn_relu_pool.cu; the checks
// and allocations shared with the CPU kernels, csrc/bn_relu_pool.cpp).
// The arguments every op reads, with its blocks a (task, channel) (FASTMETA_CUDA_BRP_SLICES=N
// forces N, at most the images; else cuda::bn_relu_pool_slices for this GPU) and their scratch,
// which `scratch` keeps alive until the launch is queued.
template <typename T>
cuda::BNReLUPoolArgs<T> bn_relu_pool_args(const BNReLUPoolDims& d, const at::Tensor& x, const at::Tensor& weight,
                                          at::Tensor& scratch) {
  TORCH_CHECK(d.H <= INT32_MAX && d.W <= INT32_MAX, "bn_relu_pool (cuda): planes of at most 2^31 - 1 rows and "
              "columns, got ", d.H, " x ", d.W);
  cuda::BNReLUPoolArgs<T> a{};
  a.tasks = d.T; a.N = d.N; a.C = d.C; a.H = d.H; a.W = d.W; a.Ho = d.Ho; a.Wo = d.Wo;
  a.task_inner = d.task_inner;
  a.x = x.data_ptr<T>();
  a.weight = weight.data_ptr<T>();
  const char* env = std::getenv("FASTMETA_CUDA_BRP_SLICES");
  if (env != nullptr && env[0] != '\0') {
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    TORCH_CHECK(*end == '\0' && n >= 1, "FASTMETA_CUDA_BRP_SLICES must be a whole number >= 1, got '", env, "'");
    a.slices = std::min<int64_t>(n, d.N);
  } else {
    a.slices = cuda::bn_relu_pool_slices(d.T, d.C, d.N, d.H * d.W, device_limits(x.device().index()).sms);
  }
  scratch = at::empty({d.T * d.C * a.slices * 5}, x.options().dtype(at::kDouble));
  a.partial = scratch.data_ptr<double>();
  return a;
}

// The arguments the backward and double backward share: the saved tensors and gy.
template <typename T>
cuda::BNReLUPoolArgs<T> bn_relu_pool_saved_args(const BNReLUPoolSaved& s, at::Tensor& scratch) {
  auto a = bn_relu_pool_args<T>(s.d, s.x, s.weight, scratch);
  a.y = s.y.data_ptr<T>();
  a.idx = s.idx.data_ptr<uint8_t>();
  a.mean = s.mean.data_ptr<T>();
  a.invstd = s.invstd.data_ptr<T>();
  a.gy = s.gy.data_ptr<T>();
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_cuda(const at::Tensor& x,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BNReLUPoolForward f = bn_relu_pool_forward_prepare(x, weight, bias);
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "bn_relu_pool_cuda", [&] {
    at::Tensor scratch;
    auto a = bn_relu_pool_args<scalar_t>(f.d, f.x, f.weight, scratch);
    a.bias = f.bias.data_ptr<scalar_t>();
    a.eps = eps;
    a.y = f.y.data_ptr<scalar_t>();
    a.idx = f.idx.data_ptr<uint8_t>();
    a.mean = f.mean.data_ptr<scalar_t>();
    a.invstd = f.invstd.data_ptr<scalar_t>();
    C10_CUDA_CHECK(cuda::launch_bn_relu_pool<scalar_t>(a, c10::cuda::getCurrentCUDAStream()));
  });
  return {f.y, f.idx, f.mean, f.invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cuda(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BNReLUPoolSaved s = bn_relu_pool_saved(gy, x, weight, idx, y, mean, invstd);
  const BNReLUPoolGrads o = bn_relu_pool_backward_outputs(s);
  AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "bn_relu_pool_backward_cuda", [&] {
    at::Tensor scratch;
    auto a = bn_relu_pool_saved_args<scalar_t>(s, scratch);
    a.dx = o.dx.data_ptr<scalar_t>();
    a.dweight = o.dw.data_ptr<scalar_t>();
    a.dbias = o.db.data_ptr<scalar_t>();
    C10_CUDA_CHECK(cuda::launch_bn_relu_pool_backward<scalar_t>(a, c10::cuda::getCurrentCUDAStream()));
  });
  return {o.dx, o.dw, o.db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_double_backward_cuda(
    const c10::optional<at::Tensor>& ggx, const at::Tensor& ggw, const at::Tensor& ggb, const at::Tensor& gy,
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  const BNReLUPoolSaved s = bn_relu_pool_saved(gy, x, weight, idx, y, mean, invstd);
  const BNReLUPoolDouble o = bn_relu_pool_double_prepare(s, ggx, ggw, ggb);
  AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "bn_relu_pool_double_backward_cuda", [&] {
    at::Tensor scratch;
    auto a = bn_relu_pool_saved_args<scalar_t>(s, scratch);
    a.ggx = o.ggx.defined() ? o.ggx.data_ptr<scalar_t>() : nullptr;
    a.ggw = o.ggw.data_ptr<scalar_t>();
    a.ggb = o.ggb.data_ptr<scalar_t>();
    a.g_gy = o.g_gy.data_ptr<scalar_t>();
    a.g_x = o.g_x.data_ptr<scalar_t>();
    a.g_w = o.g_w.data_ptr<scalar_t>();
    C10_CUDA_CHECK(cuda::launch_bn_relu_pool_double_backward<scalar_t>(a, c10::cuda::getCurrentCUDAStream()));
  });
  return {o.g_gy, o.g_x, o.g_w};
}

}  // namespace
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("mlp_inner_loop", &fastmeta::mlp_inner_loop_cuda);
  m.impl("mlp_adapt", &fastmeta::mlp_adapt_cuda);
  m.impl("inner_update_scalar", &fastmeta::inner_update_scalar_cuda);
  m.impl("inner_update_tensor", &fastmeta::inner_update_tensor_cuda);
  m.impl("bn_relu_pool", &fastmeta::bn_relu_pool_cuda);
  m.impl("bn_relu_pool_backward", &fastmeta::bn_relu_pool_backward_cuda);
  m.impl("bn_relu_pool_double_backward", &fastmeta::bn_relu_pool_double_backward_cuda);
}
