// CUDA implementations of fastmeta's ops (built only when torch has CUDA and nvcc is found).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../common.h"
#include "kernels.cuh"

namespace fastmeta {
namespace {

template <typename T>
std::vector<at::Tensor> update_cuda(at::TensorList params, at::TensorList grads, const std::vector<at::Tensor>& lrs,
                                    double lr) {
  TORCH_CHECK(params.size() == grads.size(), "inner_update: params and grads differ in length");
  const c10::cuda::CUDAGuard guard(grads[0].device());
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
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "inner_update_cuda", [&] {
    outs = update_cuda<scalar_t>(params, grads, {}, lr);
  });
  return outs;
}

std::vector<at::Tensor> inner_update_tensor_cuda(at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  TORCH_CHECK(lrs.size() == grads.size(), "inner_update: lrs and grads differ in length");
  std::vector<at::Tensor> outs;
  AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "inner_update_cuda", [&] {
    outs = update_cuda<scalar_t>(params, grads, lrs.vec(), 0.0);
  });
  return outs;
}

}  // namespace
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("inner_update_scalar", &fastmeta::inner_update_scalar_cuda);
  m.impl("inner_update_tensor", &fastmeta::inner_update_tensor_cuda);
}
