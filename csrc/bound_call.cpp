// fastmeta._C._BoundMetaGrad: BatchedMAML.value_and_grad's call of the CPU MLP kernel (or forward's
// call of fastmeta::mlp_meta_loss's direct binding, the loss with its C++ autograd) bound to what the
// module's last checked call saw, so that a call that sees the same again runs the kernel after a
// few pointer and shape comparisons instead of the Python checks (~10 us a call on a small MLP,
// where the kernel itself takes ~100 us).
//
// What the checked path reads and the binding compares (any difference: the call returns None and
// the module's checked path runs, which binds again where its checks pass):
//   - the BatchedMAML instance's __dict__ (its settings, backend request, lowered program, stamps),
//     entry by entry: the same keys holding the very same objects, in the same order (an assigned
//     setting is a new object; the caller holds the snapshotted objects with the binding, so no
//     address is reused);
//   - each module's _modules and _parameters dicts, the same way (a module or parameter swapped
//     in or out), and PyTorch's count of hook handles made (a hook or a parametrization added);
//   - each parameter's (and learned rate's) requires_grad, dtype, shape and device (its data
//     replaced);
//   - the batch: plain torch.Tensor objects (no subclass) of the same shapes and dtypes, strided,
//     on the CPU, not requiring grad;
//   - what routes a call elsewhere in the dispatcher: inference mode, a torch function or dispatch
//     mode, a functorch transform; for the loss, grad mode (on: forward without it takes another
//     path). (Compilation, autocast, a profiler and the global backend request are read in Python
//     before the call.)
#include <torch/csrc/utils/pybind.h>  // (pybind11 with torch's casters)

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include "common.h"

namespace fastmeta {
namespace {

// A dict's entries as they were: the same keys and the same value objects in the same order;
// `skip` (a key, or null) is left out on both sides. The pointers are borrowed: the objects are
// appended to `keep`, which the caller holds as long as the snapshot (a reference held here would
// be one the garbage collector cannot see, and a cycle through the module would never be freed).
class DictSnapshot {
 public:
  // (own: the dict is passed to same() on each call and is not kept; keeping it, in a list that it
  // holds itself, would make it a cycle that only a full collection frees)
  DictSnapshot(PyObject* d, PyObject* skip, py::list& keep, bool own = false) : dict_(own ? nullptr : d), skip_(skip) {
    if (!own) keep.append(py::reinterpret_borrow<py::object>(d));
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d, &pos, &k, &v)) {
      if (is_skipped(k)) continue;
      entries_.emplace_back(k, v);
      keep.append(py::reinterpret_borrow<py::object>(k));
      keep.append(py::reinterpret_borrow<py::object>(v));
    }
  }

  // d: the dict to compare (null: the one snapshotted)
  bool same(PyObject* d = nullptr) const {
    if (d == nullptr) d = dict_;
    if (d == nullptr || !PyDict_Check(d)) return false;
    const Py_ssize_t n = PyDict_GET_SIZE(d), m = static_cast<Py_ssize_t>(entries_.size());
    if (n != m && n != m + 1) return false;
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    size_t i = 0;
    while (PyDict_Next(d, &pos, &k, &v)) {
      if (is_skipped(k)) continue;
      if (i == entries_.size() || k != entries_[i].first || v != entries_[i].second) return false;
      ++i;
    }
    return i == entries_.size();
  }

 private:
  bool is_skipped(PyObject* k) const {
    return skip_ != nullptr && (k == skip_ || (PyUnicode_Check(k) && PyUnicode_Compare(k, skip_) == 0));
  }
  PyObject* dict_;
  PyObject* skip_;
  std::vector<std::pair<PyObject*, PyObject*>> entries_;
};

// Nothing in effect that the dispatcher would route a call elsewhere for (as the Python side's
// _plain_call and BatchedMAML's inference-mode handling check). A functorch transform in effect
// includes its dynamic-layer keys in the thread's dispatch keys.
bool plain_dispatch_state() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return !c10::InferenceMode::is_enabled() && !at::impl::torch_function_mode_enabled() &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// The dispatch keys of a tensor that is not a plain one: a Python subclass or mode's, a functorch
// wrapper's (batched, grad), a functional tensor's.
const c10::DispatchKeySet kWrapperKeys{c10::DispatchKey::Python, c10::DispatchKey::FuncTorchBatched,
                                       c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize};

struct TensorSig {
  std::vector<int64_t> sizes;
  at::ScalarType dtype;
  bool requires_grad;

  explicit TensorSig(const at::Tensor& t)
      : sizes(t.sizes().vec()), dtype(t.scalar_type()), requires_grad(t.requires_grad()) {}

  bool matches(const at::Tensor& t) const {
    return t.defined() && t.layout() == at::kStrided && t.is_cpu() && !t.key_set().has_any(kWrapperKeys) &&
           t.scalar_type() == dtype && t.requires_grad() == requires_grad && t.sizes() == at::IntArrayRef(sizes);
  }
};

class BoundMetaGrad {
 public:
  // own: the BatchedMAML instance's __dict__ (own_key, where it keeps its bindings, left out);
  // dicts: its modules' _modules and _parameters dicts; handles: RemovableHandle; lrs: none (the
  // scalar lr), one learned rate a parameter, shaped like it (Meta-SGD), or with layer_rates one a
  // parameter tensor ([]) or a tensor and step ([S0], per_step) with step_weights (MAML++'s,
  // meta_grad_layer_rates); as_loss: the loss with its autograd (forward) instead of (loss, grads);
  // keep: a list that receives every object the binding points to, for the caller to hold with it.
  BoundMetaGrad(py::dict own, py::str own_key, const std::vector<py::dict>& dicts, py::object handles,
                std::vector<at::Tensor> params, std::vector<at::Tensor> lrs, const std::vector<at::Tensor>& batch,
                double lr, int64_t steps, std::vector<int64_t> acts, double slope, int64_t loss, bool first_order,
                bool as_loss, bool layer_rates, bool per_step, std::vector<double> step_weights, py::list keep)
      : as_loss_(as_loss),
        layer_rates_(layer_rates),
        per_step_(per_step),
        step_weights_(std::move(step_weights)),
        handles_(std::move(handles)),
        own_(own.ptr(), own_key.ptr(), keep, /*own=*/true),
        params_(std::move(params)),
        lrs_(std::move(lrs)),
        lr_(lr),
        steps_(steps),
        acts_(std::move(acts)),
        slope_(slope),
        loss_(loss),
        first_order_(first_order) {
    TORCH_CHECK(batch.size() == 4, "_BoundMetaGrad: batch must be [xs, ys, xq, yq], got ", batch.size(), " tensors");
    keep.append(own_key);
    for (const auto& d : dicts) snapshots_.emplace_back(d.ptr(), nullptr, keep);
    hook_id_ = next_hook_id();
    TORCH_CHECK(hook_id_ >= 0, "_BoundMetaGrad: handles.next_id must be an int >= 0");
    TORCH_CHECK(lrs_.empty() || lrs_.size() == params_.size(), "_BoundMetaGrad: ", lrs_.size(), " lrs for ",
                params_.size(), " params");
    TORCH_CHECK(!layer_rates_ || (!lrs_.empty() && !as_loss_), "_BoundMetaGrad: layer_rates needs lrs and "
                "value_and_grad's call (as_loss false)");
    TORCH_CHECK(layer_rates_ || (!per_step_ && step_weights_.empty()), "_BoundMetaGrad: per_step and step_weights "
                "go with layer_rates");
    for (const auto* list : {&params_, &lrs_}) {
      for (const auto& p : *list) {
        TORCH_CHECK(p.defined() && p.is_cpu() && p.layout() == at::kStrided,
                    "_BoundMetaGrad: every param and rate must be a strided CPU tensor");
        param_sigs_.emplace_back(p);
      }
    }
    for (const auto& t : batch) {
      TORCH_CHECK(t.defined() && t.is_cpu() && t.layout() == at::kStrided && !t.requires_grad(),
                  "_BoundMetaGrad: xs, ys, xq and yq must be strided CPU tensors that do not require grad");
      batch_sigs_.emplace_back(t);
    }
  }

  // (loss, [one gradient a parameter]) as value_and_grad returns them (as_loss: the loss, as forward
  // does), or None where anything differs from what the binding saw. own: the instance's __dict__ now.
  py::object call(py::handle own, py::handle xs, py::handle ys, py::handle xq, py::handle yq) const {
    if (!plain_dispatch_state() || (as_loss_ && !at::GradMode::is_enabled()) || next_hook_id() != hook_id_ ||
        !own_.same(own.ptr()))
      return py::none();
    PyObject* args[4] = {xs.ptr(), ys.ptr(), xq.ptr(), yq.ptr()};
    for (int i = 0; i < 4; ++i) {
      if (!THPVariable_CheckExact(args[i]) || !batch_sigs_[i].matches(THPVariable_Unpack(args[i])))
        return py::none();
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!param_sigs_[i].matches(params_[i])) return py::none();
    }
    for (size_t i = 0; i < lrs_.size(); ++i) {
      if (!param_sigs_[params_.size() + i].matches(lrs_[i])) return py::none();
    }
    for (const auto& s : snapshots_) {
      if (!s.same()) return py::none();
    }
    const at::Tensor& txs = THPVariable_Unpack(args[0]);
    const at::Tensor& tys = THPVariable_Unpack(args[1]);
    const at::Tensor& txq = THPVariable_Unpack(args[2]);
    const at::Tensor& tyq = THPVariable_Unpack(args[3]);
    if (as_loss_) {
      at::Tensor value;
      {
        py::gil_scoped_release no_gil;
        value = mlp_meta_loss_cpu_direct(txs, tys, txq, tyq, params_, lrs_, lr_, steps_, acts_, slope_, loss_,
                                         first_order_);
      }
      return py::cast(std::move(value));
    }
    std::vector<at::Tensor> out;
    if (layer_rates_) {
      py::gil_scoped_release no_gil;
      out = meta_grad_layer_rates(txs, tys, txq, tyq, params_, lrs_, per_step_, steps_, acts_, slope_, loss_,
                                  first_order_, step_weights_, /*need_lr_grad=*/true);
    } else {
      py::gil_scoped_release no_gil;
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // values, as the op's Autograd kernel
      out = mlp_meta_grad_cpu(txs, tys, txq, tyq, params_, lrs_, lr_, steps_, acts_, slope_, loss_, first_order_,
                              /*need_lr_grad=*/!lrs_.empty(), {});
    }
    py::list grads(out.size() - 1);
    for (size_t i = 1; i < out.size(); ++i) grads[i - 1] = py::cast(std::move(out[i]));
    return py::make_tuple(py::cast(std::move(out[0])), std::move(grads));
  }

 private:
  // RemovableHandle.next_id: PyTorch's count of hook handles made (-1 where it cannot be read)
  int64_t next_hook_id() const {
    PyObject* v = PyObject_GetAttrString(handles_.ptr(), "next_id");
    if (v == nullptr) {
      PyErr_Clear();
      return -1;
    }
    const long long id = PyLong_Check(v) ? PyLong_AsLongLong(v) : -1;
    Py_DECREF(v);
    if (id == -1 && PyErr_Occurred()) PyErr_Clear();
    return id;
  }

  bool as_loss_, layer_rates_, per_step_;
  std::vector<double> step_weights_;
  py::object handles_;
  DictSnapshot own_;
  std::vector<DictSnapshot> snapshots_;
  int64_t hook_id_ = -1;
  std::vector<at::Tensor> params_, lrs_;
  std::vector<TensorSig> param_sigs_, batch_sigs_;  // (param_sigs_: the params', then the rates')
  double lr_;
  int64_t steps_;
  std::vector<int64_t> acts_;
  double slope_;
  int64_t loss_;
  bool first_order_;
};

}  // namespace

void bind_bound_calls(py::module& m) {
  py::class_<BoundMetaGrad>(m, "_BoundMetaGrad",
                            "BatchedMAML.value_and_grad's (or forward's) CPU MLP kernel call bound to what its last "
                            "checked call saw (csrc/bound_call.cpp); calling it gives (loss, grads) (or the loss), "
                            "or None where anything differs")
      .def(py::init<py::dict, py::str, const std::vector<py::dict>&, py::object, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, const std::vector<at::Tensor>&, double, int64_t, std::vector<int64_t>,
                    double, int64_t, bool, bool, bool, bool, std::vector<double>, py::list>(),
           py::arg("own"), py::arg("own_key"), py::arg("dicts"), py::arg("handles"), py::arg("params"),
           py::arg("lrs"), py::arg("batch"), py::arg("lr"), py::arg("steps"), py::arg("acts"), py::arg("slope"),
           py::arg("loss"), py::arg("first_order"), py::arg("as_loss"), py::arg("layer_rates"), py::arg("per_step"),
           py::arg("step_weights"), py::arg("keep"))
      .def("__call__", &BoundMetaGrad::call, py::arg("own"), py::arg("xs"), py::arg("ys"), py::arg("xq"),
           py::arg("yq"));
}

}  // namespace fastmeta
