// Multi-tensor inner-loop update, CPU:  theta'_i = theta_i - lr_i * g_i  for every tensor i.
//
// One call covers all parameter tensors of all tasks. A parameter may be a broadcast view of a
// meta-parameter (step 0 of a batched inner loop: [T, *shape] with stride 0 over T) and a
// per-parameter learning rate (Meta-SGD) may be broadcast the same way; neither is copied.
// The output has the shape of the gradient. Backward (Python, fastmeta/ops/inner_update.py):
//   d_theta = d_theta',  d_g = -lr * d_theta',  d_lr = -sum(g * d_theta').
#include <ATen/ops/scalar_tensor.h>

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

}  // namespace fastmeta
