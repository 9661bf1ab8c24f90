// Shared helpers for fastmeta's C++ kernels.
#pragma once
// The Tensor class and at::parallel_for only (not ATen/ATen.h, every operator's declaration: half
// of each file's compile time); each file includes the operators it calls from ATen/ops/.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "bn_relu_pool.h"

namespace fastmeta {

// A tensor seen as `period` contiguous elements repeated over leading (broadcast) dims:
// either a contiguous tensor of the full size (period == numel of the output), a contiguous
// tensor of the trailing shape broadcast over leading dims (e.g. a meta-parameter [*shape]
// expanded to [T, *shape]), or a single element (period == 1).
struct Periodic {
  at::Tensor base;   // contiguous storage that is read
  int64_t period;    // out[j] reads base[j % period]
};

// A size threshold read from the environment variable `name` at load: an integer >= -1 (-1: the
// kernels' "never"), or `fallback` where it is unset, empty or anything else.
inline int64_t env_threshold(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  return *end == '\0' && v >= -1 ? static_cast<int64_t>(v) : fallback;
}

// FASTMETA_POISON=1 (tests): outputs are filled with NaN before a kernel writes them, so an
// element the kernel forgets to write fails the comparison with the reference.
inline bool poison_outputs() {
  const char* v = std::getenv("FASTMETA_POISON");
  return v != nullptr && v[0] == '1';
}
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Times fn on the current CUDA stream: one call to warm, then `reps` calls between two CUDA events;
// returns the milliseconds a call, or a negative number without calling fn where the stream is
// being captured into a graph (nothing can be timed there). Set by the CUDA bindings
// (csrc/cuda/bindings_cuda.cpp); nullptr in a build without CUDA.
using CudaTimer = double (*)(const std::function<void()>& fn, int reps);
CudaTimer& cuda_timer();

// FASTMETA_CONV_PRECISION=tf32x3's operands on CUDA (csrc/cuda/tf32_split.cu): src [outer, row]
// (contiguous float32) into dst [outer, parts, row] (contiguous), part p the low one where bit p of
// `which` is set. Set by the CUDA bindings; nullptr in a build without CUDA.
using Tf32SplitStack = void (*)(const at::Tensor& src, const at::Tensor& dst, int64_t outer, int64_t row, int parts,
                                int which);
Tf32SplitStack& tf32_split_stack_cuda();
// t's TF32 parts stacked along dim (which: 1 or 2 of 0 for hi, 1 for lo), as the tf32x3 convolutions
// make them; aten: with ATen's elementwise ops instead of the one-pass loop or kernel (tests).
at::Tensor tf32_stack_parts(const at::Tensor& t, int64_t dim, const std::vector<int64_t>& which, bool aten);
// cuDNN's TF32 flag inside and after the guard the tf32x3 ops hold on CUDA (tests; no CUDA needed).
std::vector<bool> cudnn_tf32_guard_probe();

// What the convolution ops' autotune chose so far (csrc/batched_conv2d.cpp): one line a shape,
// "op | shapes | grouped ms | per-task ms | choice".
std::vector<std::string> conv_autotune_choices();
// Forgets those choices (the next call of each shape times again).
void conv_autotune_clear();

// Materializes `t` expanded to `shape` in the cheapest periodic form.
Periodic as_periodic(const at::Tensor& t, at::IntArrayRef shape);

// inner_update's tensors: as many params (and rates, where given) as grads, each param and rate on
// its grad's device, each param of its grad's dtype (a rate of any floating dtype: it is cast).
inline void check_update_args(at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  TORCH_CHECK(params.size() == grads.size(), "inner_update: params and grads differ in length (", params.size(),
              " vs ", grads.size(), ")");
  TORCH_CHECK(lrs.empty() || lrs.size() == grads.size(), "inner_update: lrs and grads differ in length (", lrs.size(),
              " vs ", grads.size(), ")");
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(params[i].device() == grads[i].device() && params[i].scalar_type() == grads[i].scalar_type(),
                "inner_update: params[", i, "] (", params[i].scalar_type(), ", ", params[i].device(), ") and grads[",
                i, "] (", grads[i].scalar_type(), ", ", grads[i].device(), ") differ in dtype or device");
    TORCH_CHECK(lrs.empty() || (lrs[i].device() == grads[i].device() && lrs[i].is_floating_point()),
                "inner_update: lrs[", i, "] (", lrs[i].scalar_type(), ", ", lrs[i].device(),
                ") must be floating and on grads[", i, "]'s device ", grads[i].device());
  }
}

std::vector<at::Tensor> inner_update_scalar_cpu(at::TensorList params, at::TensorList grads, double lr);
std::vector<at::Tensor> inner_update_tensor_cpu(at::TensorList params, at::TensorList grads, at::TensorList lrs);

// Bytes held by the per-thread workspaces of mlp_inner_loop (kept between calls).
int64_t workspace_bytes();
// The fused CPU kernel's smooth activations applied to z as the kernel applies them (whole SIMD
// registers of float32 where the build has them): s (order 0; codes 3..7), s' or s'' (codes 5..7).
at::Tensor activation_values(const at::Tensor& z, int64_t act, int64_t order);
// The fused MLP kernel's panel-order threshold (csrc/mlp_inner_loop.cpp): set to bytes (>= -1),
// returning the previous value; bytes < -1 only reads it.
int64_t mlp_panel_bytes(int64_t bytes);
// fastmeta::mlp_forward's small-MLP CPU loops: their threshold on N * sum_l d_l d_{l-1} (sets it to
// macs, -1: never, and returns the previous value; below -1: reads it)
int64_t mlp_forward_small_macs(int64_t macs);
// the calls of those loops so far (forward, backward and its derivative each count one)
int64_t mlp_forward_small_calls();
// The fused CPU MLP kernel's tasks a group (SIMD lanes) for elements of itemsize bytes (4 or 8).
int64_t mlp_lanes(int64_t itemsize);

// fastmeta::mlp_inner_loop's arguments against each other (the CPU and CUDA kernels check each
// call with it): params [W_1 [d_1, d_0], b_1 [d_1], ...] of xs's dtype, rates (if any) shaped
// like them; xs [T, K, d_0] and xq [T, Q, d_0] floating; mse targets ys [T, K, d_L] and yq
// [T, Q, d_L] of xs's dtype, cross-entropy labels [T, K] and [T, Q] int64; every tensor on xs's
// device; at least one support row when steps > 0 and one query row.
// Rates may also be per inner step, each [steps, *param shape] (mlp_rates_per_step).
void check_mlp_args(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
                    at::TensorList params, at::TensorList lrs, int64_t steps, int64_t loss);
// Whether the rates are one set per inner step ([steps, *param shape] each).
bool mlp_rates_per_step(at::TensorList params, at::TensorList lrs);
// Per-step rate gradients as the kernels make them, rows [T, steps * P] step-major ([steps, P]), in
// the op's order: each rate's [steps, numel] in turn.
at::Tensor rate_rows_in_op_order(const at::Tensor& rows, at::TensorList params, int64_t steps);
// step_weights (the multi-step loss: the query loss after step s weighs step_weights[s]): empty
// (the last step's only) or one finite weight a step.
void check_step_weights(at::ArrayRef<double> step_weights, int64_t steps);

std::vector<at::Tensor> mlp_inner_loop_cpu(
    const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList params, at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
    double negative_slope, int64_t loss, bool first_order, bool need_lr_grad, at::ArrayRef<double> step_weights);

// The inner loop alone: [theta_S [T, P] (each task's flat parameters after `steps` steps), the
// support loss at the meta-parameters [T]]; values, no autograd (fastmeta::mlp_adapt).
std::vector<at::Tensor> mlp_adapt_cpu(const at::Tensor& xs, const at::Tensor& ys, at::TensorList params,
                                     at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
                                     double negative_slope, int64_t loss);

// The task mean of mlp_inner_loop, reduced inside the kernel: [mean query loss (0-dim), the mean
// meta-gradient as one tensor per parameter, shaped like it, followed when need_lr_grad by one per
// rate, shaped like it].
std::vector<at::Tensor> mlp_meta_grad_cpu(
    const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList params, at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
    double negative_slope, int64_t loss, bool first_order, bool need_lr_grad, at::ArrayRef<double> step_weights);

// fastmeta::mlp_meta_grad with rates of one value a parameter tensor ([]) or a tensor and inner
// step ([S0], per_step), expanded to the op's rates, their gradients summed back (csrc/bindings.cpp).
std::vector<at::Tensor> meta_grad_layer_rates(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                                              const at::Tensor& yq, const std::vector<at::Tensor>& params,
                                              const std::vector<at::Tensor>& rates, bool per_step, int64_t steps,
                                              const std::vector<int64_t>& acts, double slope, int64_t loss,
                                              bool first_order, const std::vector<double>& step_weights,
                                              bool need_lr_grad);

// fastmeta::mlp_meta_loss (its autograd Function; a scalar lr, or lrs one rate a parameter entry)
// called without the dispatcher, for the direct binding in bindings.cpp (CPU tensors).
at::Tensor mlp_meta_loss_cpu_direct(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                                    const at::Tensor& yq, at::TensorList params, at::TensorList lrs, double lr,
                                    int64_t steps, at::IntArrayRef acts, double negative_slope, int64_t loss,
                                    bool first_order);

// bn_relu_pool's sizes, layout and argument checks (csrc/bn_relu_pool.cpp), shared by its CPU and
// CUDA kernels: x [T, N, C, H, W], weight / bias [T, C]; the pooled output [T, N, C, H/2, W/2].
// Each H x W plane is contiguous, and plane (t, n, c) starts at plane_of(t, n, c) planes: x is
// either task-major (contiguous) or task-inner ([N, T, C, H, W] in memory, as batched_conv2d
// returns it); y, idx and dx are written in x's layout, so a conv block passes its activations on
// without a copy.
struct BNReLUPoolDims {
  int64_t T, N, C, H, W, Ho, Wo;
  bool task_inner;
  int64_t plane() const { return H * W; }
  int64_t out_plane() const { return Ho * Wo; }
  int64_t plane_of(int64_t t, int64_t n, int64_t c) const { return bn_relu_pool_plane(task_inner, T, N, C, t, n, c); }
};
// Whether a [T, N, C, H, W] tensor is task-inner (and not also contiguous: T == 1 or N == 1 are
// task-major).
bool bn_relu_pool_task_inner(const at::Tensor& x);
// t [T, N, C, h, w] laid out as task_inner says (t itself when it already is).
at::Tensor bn_relu_pool_in_layout(const at::Tensor& t, bool task_inner);
// An uninitialized [T, N, C, h, w] tensor in d's layout (NaN-filled under FASTMETA_POISON=1).
at::Tensor bn_relu_pool_empty(const BNReLUPoolDims& d, int64_t h, int64_t w, const at::TensorOptions& opts);
// The forward's inputs (x in a layout the kernels read, weight and bias contiguous), checked, with
// their dims, and its outputs allocated (y and idx in x's layout, mean and invstd [T, C]).
struct BNReLUPoolForward {
  at::Tensor x, weight, bias, y, idx, mean, invstd;
  BNReLUPoolDims d;
};
BNReLUPoolForward bn_relu_pool_forward_prepare(const at::Tensor& x, const at::Tensor& weight,
                                               const at::Tensor& bias);
// The tensors bn_relu_pool's backward and double backward read (the forward's input and outputs,
// and the gradient of y), in x's layout, checked, with their dims.
struct BNReLUPoolSaved {
  at::Tensor gy, x, weight, idx, y, mean, invstd;
  BNReLUPoolDims d;
};
BNReLUPoolSaved bn_relu_pool_saved(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& idx, const at::Tensor& y, const at::Tensor& mean,
                                   const at::Tensor& invstd);
// The backward's outputs, allocated: dx in x's layout, dweight and dbias [T, C].
struct BNReLUPoolGrads {
  at::Tensor dx, dw, db;
};
BNReLUPoolGrads bn_relu_pool_backward_outputs(const BNReLUPoolSaved& s);
// The double backward's cotangents (ggw, ggb [T, C]; ggx like x, in its layout, or undefined: zero),
// checked, and its outputs, allocated in x's layout.
struct BNReLUPoolDouble {
  at::Tensor ggx, ggw, ggb, g_gy, g_x, g_w;
};
BNReLUPoolDouble bn_relu_pool_double_prepare(const BNReLUPoolSaved& s, const c10::optional<at::Tensor>& ggx,
                                             const at::Tensor& ggw, const at::Tensor& ggb);

}  // namespace fastmeta
