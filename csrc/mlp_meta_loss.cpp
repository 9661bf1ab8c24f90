// fastmeta::mlp_meta_grad and fastmeta::mlp_meta_loss: the mean query loss over T tasks after the
// fused inner loop and its task-mean meta-gradient.
//
// mlp_meta_grad returns both as plain tensors (no autograd): on CPU reduced inside the kernel into
// one tensor per parameter, on CUDA fastmeta::mlp_inner_loop's per-task rows summed here and split
// into views. It serves callers that want the gradient itself (BatchedMAML.value_and_grad);
// mlp_meta_loss's forward computes the same two ways.
//
// mlp_meta_loss returns the loss with its autograd in C++ (no Python on the backward path):
// forward is mlp_meta_grad and keeps its gradients, backward scales them by the incoming gradient
// (returned as they are when that is a CPU 1, the usual loss.backward()). Differentiable once (it
// returns the meta-gradient directly). It is CompositeImplicitAutograd: under torch.compile the
// traced graph holds fastmeta::mlp_meta_grad (its fake kernel is registered from Python) and the
// scaling.
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/cat.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
#include <c10/util/accumulate.h>

#include "common.h"

#include <cstdlib>

namespace fastmeta {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// [mean loss, flat mean meta-gradient (then the flat mean lr gradient)] from fastmeta::mlp_inner_loop's
// per-task rows (two reductions), for devices whose kernel returns rows (CUDA; see from_rows).
std::vector<at::Tensor> meta_grad_from_rows(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                                            const at::Tensor& yq, at::TensorList params, at::TensorList lrs,
                                            double lr, int64_t steps, at::IntArrayRef acts, double slope,
                                            int64_t loss, bool first_order, bool need_lr_grad,
                                            at::ArrayRef<double> step_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmeta::mlp_inner_loop", "")
                       .typed<decltype(mlp_inner_loop_cpu)>();  // (the schema's signature, any device)
  const auto rows = op.call(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss, first_order, need_lr_grad,
                            step_weights);
  const at::Tensor grads = need_lr_grad ? at::cat({rows[1], rows[2]}, 1) : rows[1];
  return {rows[0].mean(), grads.mean(0)};
}

// Whether the mean comes from per-task rows: on CUDA, and on CPU with FASTMETA_META_GRAD_ROWS=1
// (for the tests, so that CI checks that path too); else the CPU kernel reduces it itself.
bool from_rows(const at::Tensor& xs) {
  const char* rows_env = std::getenv("FASTMETA_META_GRAD_ROWS");
  return !xs.is_cpu() || (rows_env != nullptr && rows_env[0] == '1');
}

// The flat gradient g split into one tensor per parameter, then per rate (views), shaped like them.
variable_list split_flat(const at::Tensor& g, at::TensorList params, at::TensorList rates) {
  variable_list out;
  int64_t off = 0;
  for (at::TensorList list : {params, rates}) {
    for (const auto& t : list) {
      out.push_back(g.narrow(0, off, t.numel()).view(t.sizes()));
      off += t.numel();
    }
  }
  return out;
}

// fastmeta::mlp_meta_grad: [mean loss, one gradient per parameter (, one per rate)], the gradients
// views of one buffer (CPU and CUDA).
std::vector<at::Tensor> mlp_meta_grad(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                                      const at::Tensor& yq, at::TensorList params, at::TensorList lrs, double lr,
                                      int64_t steps, at::IntArrayRef acts, double slope, int64_t loss,
                                      bool first_order, bool need_lr_grad, at::ArrayRef<double> step_weights) {
  if (!from_rows(xs))  // the kernel's reduction writes one tensor per parameter
    return mlp_meta_grad_cpu(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss, first_order, need_lr_grad,
                             step_weights);
  auto outs = meta_grad_from_rows(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss, first_order,
                                  need_lr_grad, step_weights);
  std::vector<at::Tensor> result{outs[0]};
  for (auto& g : split_flat(outs[1], params, need_lr_grad ? lrs : at::TensorList())) result.push_back(std::move(g));
  return result;
}

// Autograd key: the results are values, not functions of the inputs to differentiate, so it goes
// below autograd at once (no graph node; the outputs do not require grad).
std::vector<at::Tensor> mlp_meta_grad_no_autograd(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                                                  const at::Tensor& yq, at::TensorList params, at::TensorList lrs,
                                                  double lr, int64_t steps, at::IntArrayRef acts, double slope,
                                                  int64_t loss, bool first_order, bool need_lr_grad,
                                                  at::ArrayRef<double> step_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmeta::mlp_meta_grad", "")
                       .typed<decltype(mlp_meta_grad)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss, first_order, need_lr_grad, step_weights);
}

class MLPMetaLoss : public torch::autograd::Function<MLPMetaLoss> {
 public:
  // The forward is fastmeta::mlp_meta_grad, called through the dispatcher (below autograd), so that
  // under fake tensors (torch.compile's tracing) its fake kernel runs; its gradients (one per
  // parameter, then one per rate) are kept for backward.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                            const at::Tensor& yq, at::TensorList params, at::TensorList lrs, double lr,
                            int64_t steps, at::IntArrayRef acts, double slope, int64_t loss, bool first_order,
                            at::ArrayRef<double> step_weights) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmeta::mlp_meta_grad", "")
                         .typed<decltype(mlp_meta_grad)>();
    bool need_lr_grad = false;
    for (const auto& l : lrs) need_lr_grad |= l.requires_grad();
    std::vector<at::Tensor> outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outs = op.call(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss, first_order, need_lr_grad,
                     step_weights);
    }
    ctx->save_for_backward(std::vector<at::Tensor>(outs.begin() + 1, outs.end()));
    ctx->saved_data["n_lrs"] = static_cast<int64_t>(lrs.size());
    ctx->saved_data["lr_grads"] = need_lr_grad;
    return outs[0];
  }

  // One gradient per forward input: 4 data tensors (none), the params, the lrs, 7 non-tensors. The
  // saved meta-gradient is scaled by the incoming gradient (not for a CPU 1, the usual
  // loss.backward(); a traced one, torch.compile's, is always multiplied).
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastmeta::mlp_meta_loss returns the meta-gradient directly and is differentiable once only; "
                "use fastmeta.use_backend('torch') for higher-order derivatives of the meta-loss");
    variable_list saved = ctx->get_saved_variables();
    const int64_t n_lrs = ctx->saved_data["n_lrs"].toInt();
    const bool lr_grads = ctx->saved_data["lr_grads"].toBool();
    const at::Tensor& go = grad_out[0];
    const bool unit = go.is_cpu() && !go.unsafeGetTensorImpl()->is_python_dispatch() && go.numel() == 1 &&
                      go.item<double>() == 1.0;
    variable_list grads(4);
    if (unit) {
      for (auto& g : saved) grads.push_back(std::move(g));
    } else {  // one launch on CUDA for all of them
      for (auto& g : at::_foreach_mul(saved, go)) grads.push_back(std::move(g));
    }
    grads.resize(grads.size() + (lr_grads ? 0 : n_lrs) + 7);
    return grads;
  }
};

at::Tensor mlp_meta_loss(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
                         at::TensorList params, at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
                         double negative_slope, int64_t loss, bool first_order, at::ArrayRef<double> step_weights) {
  // its backward gives the parameters' and rates' gradients only: a gradient for the data would
  // come back as none, so asking for one is refused
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(xs.requires_grad() || ys.requires_grad() || xq.requires_grad() || yq.requires_grad()),
              "fastmeta::mlp_meta_loss differentiates the parameters and rates, not the data: xs, ys, xq and yq "
              "must not require grad (fastmeta.ops.mlp_meta_loss takes the differentiable reference for such "
              "a batch)");
  return MLPMetaLoss::apply(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss, first_order,
                            step_weights);
}

}  // namespace

at::Tensor mlp_meta_loss_cpu_direct(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                                    const at::Tensor& yq, at::TensorList params, at::TensorList lrs, double lr,
                                    int64_t steps, at::IntArrayRef acts, double negative_slope, int64_t loss,
                                    bool first_order) {
  return MLPMetaLoss::apply(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss,
                            first_order, at::ArrayRef<double>());
}

}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta, CompositeImplicitAutograd, m) {
  m.impl("mlp_meta_loss", &fastmeta::mlp_meta_loss);
}

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("mlp_meta_grad", &fastmeta::mlp_meta_grad);
}

// Its results are values, not functions of the inputs to differentiate: below autograd at once
// (no graph node, outputs that do not require grad).
TORCH_LIBRARY_IMPL(fastmeta, Autograd, m) {
  m.impl("mlp_meta_grad", &fastmeta::mlp_meta_grad_no_autograd);
}

// Registered for the CUDA key here (no device code: it calls fastmeta::mlp_inner_loop, whose CUDA
// kernel is in csrc/cuda, and reduces its rows with ATen).
TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("mlp_meta_grad", &fastmeta::mlp_meta_grad);
}
