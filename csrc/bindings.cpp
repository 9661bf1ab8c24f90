// Registration of fastmeta's C++ ops under the `fastmeta` namespace. Fake (meta) kernels are
// registered from Python (fastmeta/ops/*.py). Autograd: inner_update_* and mlp_meta_loss have their
// own in C++ (csrc/inner_update.cpp, csrc/mlp_meta_loss.cpp), mlp_meta_grad returns values; the
// kernels below are differentiated by fastmeta.ops' functions (autograd Functions over them, with
// their closed-form double backward), so a raw call's result refuses a backward rather than
// giving no gradient.
#include <torch/csrc/utils/pybind.h>  // (pybind11 with torch's casters; not torch/python.h or torch/extension.h)

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(fastmeta, m) {
  m.def("inner_update_scalar(Tensor[] params, Tensor[] grads, float lr) -> Tensor[]");
  m.def("inner_update_tensor(Tensor[] params, Tensor[] grads, Tensor[] lrs) -> Tensor[]");
  // Returns [loss [T], dtheta [T, P], dlr [T or 0, the rates' entries]] (see csrc/mlp_inner_loop.cpp).
  // lrs: none (the scalar lr), one per param shaped like it, or one per param and step ([steps,
  // *shape]); step_weights: none (the query loss after the last step) or one a step (MAML++'s
  // multi-step loss).
  m.def("mlp_inner_loop(Tensor xs, Tensor ys, Tensor xq, Tensor yq, Tensor[] params, Tensor[] lrs, "
        "float lr, int steps, int[] acts, float negative_slope, int loss, bool first_order, "
        "bool need_lr_grad, float[] step_weights=[]) -> Tensor[]");
  // [mean query loss, the mean meta-gradient, one tensor per param (then per lr when
  // need_lr_grad)], no autograd (csrc/mlp_meta_loss.cpp).
  m.def("mlp_meta_grad(Tensor xs, Tensor ys, Tensor xq, Tensor yq, Tensor[] params, Tensor[] lrs, "
        "float lr, int steps, int[] acts, float negative_slope, int loss, bool first_order, "
        "bool need_lr_grad, float[] step_weights=[]) -> Tensor[]");
  // The inner loop alone, values (no autograd): [theta_S [T, P], the support loss at theta_0 [T]]
  // (csrc/mlp_inner_loop.cpp; CPU).
  m.def("mlp_adapt(Tensor xs, Tensor ys, Tensor[] params, Tensor[] lrs, float lr, int steps, int[] acts, "
        "float negative_slope, int loss) -> Tensor[]");
  // The mean query loss with its autograd in C++ (csrc/mlp_meta_loss.cpp).
  m.def("mlp_meta_loss(Tensor xs, Tensor ys, Tensor xq, Tensor yq, Tensor[] params, Tensor[] lrs, "
        "float lr, int steps, int[] acts, float negative_slope, int loss, bool first_order, "
        "float[] step_weights=[]) -> Tensor");
}

// Differentiated through fastmeta.ops (see above): backward through a raw call raises, naming the op.
TORCH_LIBRARY_IMPL(fastmeta, Autograd, m) {
  for (const char* op : {"mlp_inner_loop", "mlp_adapt", "batched_conv2d", "batched_conv2d_input_grad",
                         "batched_conv2d_weight_grad", "batched_conv2d_backward", "bn_relu_pool",
                         "bn_relu_pool_backward", "bn_relu_pool_double_backward"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("inner_update_scalar", &fastmeta::inner_update_scalar_cpu);
  m.impl("inner_update_tensor", &fastmeta::inner_update_tensor_cpu);
  m.impl("mlp_inner_loop", &fastmeta::mlp_inner_loop_cpu);
  m.impl("mlp_adapt", &fastmeta::mlp_adapt_cpu);
}

namespace {
// The direct bindings' arguments: strided CPU tensors (the kernels read their data on the host).
void check_cpu(const char* fn, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
               const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& lrs) {
  auto cpu = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.layout() == at::kStrided, fn, ": ", what,
                " must be a strided CPU tensor");
  };
  cpu(xs, "xs"); cpu(ys, "ys"); cpu(xq, "xq"); cpu(yq, "yq");
  for (const auto& p : params) cpu(p, "every param");
  for (const auto& r : lrs) cpu(r, "every rate");
}
}  // namespace

namespace fastmeta {
// fastmeta::mlp_meta_grad with rates of one value a parameter tensor (rates[i] []) or, per_step, a
// tensor and inner step (rates[i] [S0], S0 >= steps, the first steps used): each expanded to the op's rates
// (params[i]'s shape, or [steps, *shape]) for the call, and each rate's gradient summed back over
// its entries (and, per step, padded with zeros to S0; without need_lr_grad the rates' gradients
// are neither made nor returned). Values only, as the op's.
std::vector<at::Tensor> meta_grad_layer_rates(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                                              const at::Tensor& yq, const std::vector<at::Tensor>& params,
                                              const std::vector<at::Tensor>& rates, bool per_step, int64_t steps,
                                              const std::vector<int64_t>& acts, double slope, int64_t loss,
                                              bool first_order, const std::vector<double>& step_weights,
                                              bool need_lr_grad) {
  const char* fn = "_mlp_meta_grad_layer_rates";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // values only (as the op's Autograd kernel)
  TORCH_CHECK(rates.size() == params.size(), fn, ": ", rates.size(), " rates for ", params.size(), " params");
  std::vector<at::Tensor> lrs;
  lrs.reserve(rates.size());
  for (size_t i = 0; i < rates.size(); ++i) {
    const auto& r = rates[i];
    const auto& p = params[i];
    TORCH_CHECK(r.defined() && p.defined(), fn, ": rates[", i, "] and params[", i, "] must be tensors");
    if (per_step) {
      TORCH_CHECK(r.dim() == 1 && r.size(0) >= steps, fn, ": rates[", i, "] ", r.sizes(),
                  " must be [S] with S >= steps=", steps, " (one rate a tensor and inner step)");
    } else {
      TORCH_CHECK(r.dim() == 0, fn, ": rates[", i, "] ", r.sizes(), " must be [] (one rate a tensor)");
    }
    at::Tensor v = r.detach();
    if (v.dim() == 0) {
      lrs.push_back(v.expand(p.sizes()).contiguous());
    } else {
      std::vector<int64_t> one(p.dim() + 1, 1), full{steps};
      one[0] = steps;
      full.insert(full.end(), p.sizes().begin(), p.sizes().end());
      lrs.push_back(v.narrow(0, 0, steps).view(one).expand(full).contiguous());
    }
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmeta::mlp_meta_grad", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, at::TensorList, at::TensorList, double,
                                                      int64_t, at::IntArrayRef, double, int64_t, bool, bool,
                                                      at::ArrayRef<double>)>();
  auto out = op.call(xs, ys, xq, yq, params, lrs, 0.0, steps, acts, slope, loss, first_order, need_lr_grad,
                     step_weights);
  const size_t n = params.size();
  TORCH_CHECK(out.size() == 1 + (need_lr_grad ? 2 : 1) * n, fn, ": fastmeta::mlp_meta_grad returned ", out.size(),
              " tensors for ", n, " params", need_lr_grad ? " and rates" : "");
  for (size_t i = 0; need_lr_grad && i < n; ++i) {
    at::Tensor& g = out[1 + n + i];
    if (rates[i].dim() == 0) {
      g = g.sum();
    } else {
      g = g.flatten(1).sum(1);
      const int64_t S0 = rates[i].size(0);
      if (S0 > steps) g = at::cat({g, g.new_zeros({S0 - steps})});
    }
  }
  return out;
}

void bind_bound_calls(py::module& m);  // csrc/bound_call.cpp
}  // namespace fastmeta

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("workspace_bytes", &fastmeta::workspace_bytes,
        "bytes held by the per-thread workspaces of the fused CPU kernels");
  m.def("_activation_values", &fastmeta::activation_values,
        "the fused CPU kernel's smooth activation (code, derivative order) applied to a tensor, for the tests");
  // fastmeta::mlp_meta_grad's CPU kernel and fastmeta::mlp_meta_loss (a scalar lr, or one rate a
  // parameter entry: lrs, whose gradients then follow the parameters') without the
  // dispatcher, for the repeated calls of BatchedMAML.value_and_grad / forward on plain CPU tensors
  // (fastmeta/ops/mlp_inner_loop.py decides when): a boxed op call costs about as much again as
  // one of these bindings. The GIL is released while they run, as for a torch op.
  m.def("_mlp_meta_grad_cpu_direct",
        [](const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
           const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& lrs, double lr, int64_t steps,
           const std::vector<int64_t>& acts, double slope, int64_t loss, bool first_order) {
          check_cpu("_mlp_meta_grad_cpu_direct", xs, ys, xq, yq, params, lrs);
          // values (as the op's Autograd kernel): the wrapper's ATen calls on parameters that
          // require grad skip the autograd layer
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          return fastmeta::mlp_meta_grad_cpu(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss, first_order,
                                             /*need_lr_grad=*/!lrs.empty(), {});
        },
        py::call_guard<py::gil_scoped_release>());
  m.def("_mlp_meta_loss_cpu_direct",
        [](const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
           const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& lrs, double lr, int64_t steps,
           const std::vector<int64_t>& acts, double slope, int64_t loss, bool first_order) {
          check_cpu("_mlp_meta_loss_cpu_direct", xs, ys, xq, yq, params, lrs);
          return fastmeta::mlp_meta_loss_cpu_direct(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss,
                                                    first_order);
        },
        py::call_guard<py::gil_scoped_release>());
  // value_and_grad's call with learn_inner_lr='per_layer' / 'per_layer_step' (any device: the op is
  // called through the dispatcher): the rates' expansion and their gradients' sums without a
  // Python-level op each.
  m.def("_mlp_meta_grad_layer_rates", &fastmeta::meta_grad_layer_rates, py::call_guard<py::gil_scoped_release>());
  // value_and_grad's call bound to what its last checked call saw (csrc/bound_call.cpp)
  fastmeta::bind_bound_calls(m);
  m.def("_mlp_panel_bytes", &fastmeta::mlp_panel_bytes, py::arg("bytes") = -2,
        "the fused MLP kernel's threshold on a product's B operand above which it sweeps column panels "
        "outermost: sets it to bytes (0: always, -1: never) and returns the previous value; no argument: reads it");
  m.def("_mlp_forward_small_macs", &fastmeta::mlp_forward_small_macs, py::arg("macs") = -2,
        "fastmeta::mlp_forward's threshold on N * sum_l d_l d_(l-1) up to which a CPU MLP runs as plain "
        "loops instead of ATen's calls: sets it to macs (-1: never) and returns the previous value; no "
        "argument: reads it");
  m.def("_mlp_forward_small_calls", &fastmeta::mlp_forward_small_calls,
        "how many calls of fastmeta::mlp_forward's small-MLP CPU loops this process made (its forward, "
        "backward and the backward's derivative count one each)");
  m.def("_mlp_lanes", &fastmeta::mlp_lanes, py::arg("itemsize"),
        "the fused CPU MLP kernel's tasks a group (one a SIMD lane) for float32 (itemsize 4) or float64 (8)");
  m.def("_conv_autotune_choices", &fastmeta::conv_autotune_choices,
        "the convolution ops' autotune choices so far: 'op shapes | grouped ms | per task ms | choice' a shape");
  m.def("_conv_autotune_clear", &fastmeta::conv_autotune_clear, "forgets the convolution ops' autotune choices");
  m.def("_cudnn_tf32_guard_probe", &fastmeta::cudnn_tf32_guard_probe,
        "cuDNN's TF32 flag inside and after the guard that tf32x3 convolutions hold on CUDA");
  m.def("_tf32_stack_parts", &fastmeta::tf32_stack_parts,
        "a float32 tensor's TF32 parts (0: hi, the nearest TF32 value; 1: lo = x - hi) stacked along dim as "
        "`which` lists them (FASTMETA_CONV_PRECISION=tf32x3's operands); aten: with ATen's elementwise ops");
  m.def("has_cuda", []() {
#ifdef FASTMETA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
