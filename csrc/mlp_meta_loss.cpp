// fastmeta::mlp_meta_loss: the mean query loss over T tasks after the fused inner loop, with its
// autograd in C++ (no Python on the backward path). Forward runs fastmeta::mlp_inner_loop (CPU or
// CUDA kernel) and reduces the per-task meta-gradients over tasks right away; backward scales those
// by the incoming gradient. Differentiable once (it returns the meta-gradient directly).
#include <torch/autograd.h>
#include <torch/library.h>

#include "common.h"

namespace fastmeta {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MLPMetaLoss : public torch::autograd::Function<MLPMetaLoss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                            const at::Tensor& yq, at::TensorList params, at::TensorList lrs, double lr,
                            int64_t steps, at::IntArrayRef acts, double slope, int64_t loss, bool first_order) {
    bool need_lr_grad = false;
    for (const auto& l : lrs) need_lr_grad |= l.requires_grad();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmeta::mlp_inner_loop", "")
                         .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, at::TensorList, at::TensorList, double,
                                                        int64_t, at::IntArrayRef, double, int64_t, bool, bool)>();
    std::vector<at::Tensor> outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outs = op.call(xs, ys, xq, yq, params, lrs, lr, steps, acts, slope, loss, first_order, need_lr_grad);
    }
    const double inv_t = 1.0 / static_cast<double>(xs.size(0));
    ctx->save_for_backward({outs[1].sum(0).mul_(inv_t),
                            need_lr_grad ? outs[2].sum(0).mul_(inv_t) : at::Tensor()});
    std::vector<int64_t> dims, ndims;
    for (const auto& p : params) {
      ndims.push_back(p.dim());
      for (int64_t d : p.sizes()) dims.push_back(d);
    }
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["ndims"] = ndims;
    ctx->saved_data["n_lrs"] = static_cast<int64_t>(lrs.size());
    ctx->saved_data["need_lr_grad"] = need_lr_grad;
    return outs[0].mean();
  }

  // One gradient per forward input: 4 data tensors (none), the params, the lrs, 6 non-tensors.
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastmeta::mlp_meta_loss returns the meta-gradient directly and is differentiable once only; "
                "use fastmeta.use_backend('torch') for higher-order derivatives of the meta-loss");
    const auto saved = ctx->get_saved_variables();
    const auto dims = ctx->saved_data["dims"].toIntVector();
    const auto ndims = ctx->saved_data["ndims"].toIntVector();
    const int64_t n_lrs = ctx->saved_data["n_lrs"].toInt();
    const bool need_lr_grad = ctx->saved_data["need_lr_grad"].toBool();
    const at::Tensor go = grad_out[0];
    variable_list grads(4);
    auto split = [&](const at::Tensor& flat) {
      const at::Tensor scaled = flat * go;
      int64_t off = 0, d = 0;
      for (int64_t nd : ndims) {
        std::vector<int64_t> shape(dims.begin() + d, dims.begin() + d + nd);
        d += nd;
        const int64_t n = c10::multiply_integers(shape);
        grads.push_back(scaled.narrow(0, off, n).view(shape));
        off += n;
      }
    };
    split(saved[0]);
    if (need_lr_grad) {
      split(saved[1]);
    } else {
      for (int64_t i = 0; i < n_lrs; ++i) grads.emplace_back();
    }
    grads.resize(grads.size() + 6);
    return grads;
  }
};

at::Tensor mlp_meta_loss(const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
                         at::TensorList params, at::TensorList lrs, double lr, int64_t steps, at::IntArrayRef acts,
                         double negative_slope, int64_t loss, bool first_order) {
  return MLPMetaLoss::apply(xs, ys, xq, yq, params, lrs, lr, steps, acts, negative_slope, loss, first_order);
}

}  // namespace
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta, CompositeImplicitAutograd, m) {
  m.impl("mlp_meta_loss", &fastmeta::mlp_meta_loss);
}
