// Multi-tensor inner-loop update, CPU:  theta'_i = theta_i - lr_i * g_i  for every tensor i.
//
// One call covers all parameter tensors of all tasks. A parameter may be a broadcast view of a
// meta-parameter (step 0 of a batched inner loop: [T, *shape] with stride 0 over T) and a
// per-parameter learning rate (Meta-SGD) may be broadcast the same way; neither is copied.
// The output has the shape of the gradient. Backward (InnerUpdate below, the ops' Autograd kernel):
//   d_theta = d_theta',  d_g = -lr * d_theta',  d_lr = -sum(g * d_theta'),
// made of differentiable ATen ops, so that the update differentiates to any order.
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum_to_size.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common.h"

#include <c10/util/irange.h>

namespace fastmeta {

Periodic as_periodic(const at::Tensor& t, at::IntArrayRef shape) {
  const int64_t n = c10::multiply_integers(shape);
  if (t.numel() == 1) return {t.reshape({1}).contiguous(), 1};
  if (t.numel() == n && t.sizes() == shape && t.is_contiguous()) return {t, n};
  // Leading broadcast dims (stride 0 or size 1) are stripped: what is left is one period.
  at::Tensor v = t.expand(shape);
  at::Tensor inner = v;
  while (inner.dim() > 0 && (inner.stride(0) == 0 || inner.size(0) == 1)) inner = inner.select(0, 0);
  if (inner.dim() < v.dim()) return {inner.contiguous(), std::max<int64_t>(inner.numel(), 1)};
  return {v.contiguous(), n};
}

// out[i] = p[i % pp] - lr[i % lp] * g[i], pp and lp periods that divide n (trailing shapes of the
// output, so the shorter one divides the longer). Runs in blocks of L = min(pp, lp) elements whose
// inner loop is contiguous in all operands, so it vectorizes.
template <typename scalar_t>
static void update_one(const Periodic& p, const at::Tensor& g, const Periodic& lr, at::Tensor& out) {
  const scalar_t* pp = p.base.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* lp = lr.base.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t n = g.numel(), pn = p.period, ln = lr.period;
  if (ln == 1) {  // one rate: blocks of the parameter's period
    const scalar_t a = lp[0];
    at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const int64_t j0 = i % pn, stop = std::min(end, i + (pn - j0));
        const scalar_t* pr = pp + j0 - i;
#pragma omp simd
        for (int64_t k = i; k < stop; ++k) op[k] = pr[k] - a * gp[k];
        i = stop;
      }
    });
    return;
  }
  const int64_t L = std::min(pn, ln);
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t j0 = i % L, stop = std::min(end, i + (L - j0));
      const scalar_t* pr = pp + (i % pn) - i;
      const scalar_t* lr_ = lp + (i % ln) - i;
#pragma omp simd
      for (int64_t k = i; k < stop; ++k) op[k] = pr[k] - lr_[k] * gp[k];
      i = stop;
    }
  });
}

static std::vector<at::Tensor> update_all(at::TensorList params, at::TensorList grads,
                                          const std::vector<at::Tensor>& lrs) {
  check_update_args(params, grads, lrs);
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const auto i : c10::irange(params.size())) {
    at::Tensor g = grads[i].contiguous();
    at::Tensor out = new_output(g.sizes(), g.options());
    Periodic p = as_periodic(params[i], g.sizes());
    const at::Tensor& r = lrs[i];
    Periodic lr = as_periodic(r.scalar_type() == g.scalar_type() ? r : r.to(g.scalar_type()), g.sizes());
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "inner_update_cpu", [&] {
      update_one<scalar_t>(p, g, lr, out);
    });
    outs.push_back(out);
  }
  return outs;
}

std::vector<at::Tensor> inner_update_scalar_cpu(at::TensorList params, at::TensorList grads, double lr) {
  std::vector<at::Tensor> lrs;
  for (const auto i : c10::irange(grads.size()))
    lrs.push_back(at::scalar_tensor(lr, grads[i].options().device(at::kCPU)));
  return update_all(params, grads, lrs);
}

std::vector<at::Tensor> inner_update_tensor_cpu(at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  return update_all(params, grads, lrs.vec());
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// theta' = theta - lr * g through fastmeta::inner_update_scalar (lrs empty) or ::inner_update_tensor,
// called below autograd (any device's kernel, or the fake one under torch.compile), with its
// backward in ATen ops. One gradient a forward input: the params, the grads, the lrs, then lr.
class InnerUpdate : public torch::autograd::Function<InnerUpdate> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList grads,
                               at::TensorList lrs, double lr) {
    static auto scalar_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastmeta::inner_update_scalar", "")
                                .typed<decltype(inner_update_scalar_cpu)>();
    static auto tensor_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastmeta::inner_update_tensor", "")
                                .typed<decltype(inner_update_tensor_cpu)>();
    variable_list outs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outs = lrs.empty() ? scalar_op.call(params, grads, lr) : tensor_op.call(params, grads, lrs);
    }
    std::vector<int64_t> sizes;  // each param's [dim, sizes...] in turn (its gradient's shape)
    for (const auto& p : params) {
      sizes.push_back(p.dim());
      sizes.insert(sizes.end(), p.sizes().begin(), p.sizes().end());
    }
    ctx->saved_data["sizes"] = std::move(sizes);
    ctx->saved_data["lr"] = lr;
    ctx->saved_data["n_lrs"] = static_cast<int64_t>(lrs.size());
    if (!lrs.empty()) {
      variable_list keep(grads.begin(), grads.end());
      keep.insert(keep.end(), lrs.begin(), lrs.end());
      ctx->save_for_backward(keep);
    }
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list gos) {
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const double lr = ctx->saved_data["lr"].toDouble();
    const int64_t n_lrs = ctx->saved_data["n_lrs"].toInt();
    const size_t n = gos.size();
    const variable_list saved = ctx->get_saved_variables();
    variable_list out(2 * n + n_lrs + 1);
    size_t pos = 0;
    for (size_t i = 0; i < n; ++i) {
      const at::IntArrayRef shape(sizes.data() + pos + 1, sizes[pos]);
      pos += sizes[pos] + 1;
      const at::Tensor& go = gos[i];
      if (!go.defined()) continue;
      if (ctx->needs_input_grad(i)) out[i] = go.sum_to_size(shape);
      if (ctx->needs_input_grad(n + i)) out[n + i] = n_lrs ? at::neg(at::mul(saved[n + i], go)) : at::mul(go, -lr);
      if (n_lrs && ctx->needs_input_grad(2 * n + i))
        out[2 * n + i] = at::neg(at::mul(saved[i], go)).sum_to_size(saved[n + i].sizes());
    }
    return out;
  }
};

std::vector<at::Tensor> inner_update_scalar_autograd(at::TensorList params, at::TensorList grads, double lr) {
  return InnerUpdate::apply(params, grads, at::TensorList(), lr);
}

std::vector<at::Tensor> inner_update_tensor_autograd(at::TensorList params, at::TensorList grads,
                                                     at::TensorList lrs) {
  return InnerUpdate::apply(params, grads, lrs, 0.0);
}

}  // namespace
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta, Autograd, m) {
  m.impl("inner_update_scalar", &fastmeta::inner_update_scalar_autograd);
  m.impl("inner_update_tensor", &fastmeta::inner_update_tensor_autograd);
}
