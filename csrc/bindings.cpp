// Registration of fastmeta's C++ ops under the `fastmeta` namespace. Fake (meta) kernels and
// autograd are registered from Python (fastmeta/ops/*.py) so second order composes there.
#include <torch/extension.h>

#include "common.h"

TORCH_LIBRARY(fastmeta, m) {
  m.def("inner_update_scalar(Tensor[] params, Tensor[] grads, float lr) -> Tensor[]");
  m.def("inner_update_tensor(Tensor[] params, Tensor[] grads, Tensor[] lrs) -> Tensor[]");
  // Returns [loss [T], dtheta [T, P], dlr [T or 0, P]] (see csrc/mlp_inner_loop.cpp).
  m.def("mlp_inner_loop(Tensor xs, Tensor ys, Tensor xq, Tensor yq, Tensor[] params, Tensor[] lrs, "
        "float lr, int steps, int[] acts, float negative_slope, int loss, bool first_order, "
        "bool need_lr_grad) -> Tensor[]");
  // [mean query loss, the mean meta-gradient flat (then the lrs' when need_lr_grad)], no autograd
  // (csrc/mlp_meta_loss.cpp).
  m.def("mlp_meta_grad(Tensor xs, Tensor ys, Tensor xq, Tensor yq, Tensor[] params, Tensor[] lrs, "
        "float lr, int steps, int[] acts, float negative_slope, int loss, bool first_order, "
        "bool need_lr_grad) -> Tensor[]");
  // The mean query loss with its autograd in C++ (csrc/mlp_meta_loss.cpp).
  m.def("mlp_meta_loss(Tensor xs, Tensor ys, Tensor xq, Tensor yq, Tensor[] params, Tensor[] lrs, "
        "float lr, int steps, int[] acts, float negative_slope, int loss, bool first_order) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("inner_update_scalar", &fastmeta::inner_update_scalar_cpu);
  m.impl("inner_update_tensor", &fastmeta::inner_update_tensor_cpu);
  m.impl("mlp_inner_loop", &fastmeta::mlp_inner_loop_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("workspace_bytes", &fastmeta::workspace_bytes,
        "bytes held by the per-thread workspaces of the fused CPU kernels");
  m.def("has_cuda", []() {
#ifdef FASTMETA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
