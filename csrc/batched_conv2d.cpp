// fastmeta::batched_conv2d and its two gradients, for CPU and CUDA tensors: a convolution with
// per-task weights as ATen's grouped convolution (the task folded into the channels, groups * T
// groups), the input gradient and the weight gradient each as one call of ATen's convolution
// backward (oneDNN on CPU, cuDNN on CUDA).
//
//   batched_conv2d          x [T, N, C, H, W], weight [T, O, C/g, kh, kw], bias [T, O] or None
//                           ->  y [T, N, O, Ho, Wo]
//   batched_conv2d_input_grad   gy, weight, x's size  ->  gx [T, N, C, H, W]
//   batched_conv2d_weight_grad  x, gy, weight's size  ->  gw [T, O, C/g, kh, kw]
//   batched_conv2d_backward     gy, x, weight, output mask  ->  (gx, gw, gb [T, O]) in one call
//
// Why not let autograd differentiate the grouped convolution: PyTorch's double backward of a
// convolution (_convolution_double_backward) computes the weight's part of the gradient of the
// input gradient as a forward convolution whose kernel is the whole image, one group at a time
// (a loop of T such convolutions per layer), on every second-order inner step. Here every
// derivative of the three ops is written with the three ops again (fastmeta/ops/batched_conv2d.py),
// so a derivative of any order is a few grouped convolutions and convolution backwards.
//
// y is returned as a [T, N, O, Ho, Wo] view of ATen's [N, T*O, Ho, Wo] output (task-major strides
// over a sample-major buffer): the next layer's grouped input is then that buffer without a copy.
//
// Each op can also run as one ATen call a task (groups as given, not times T; each task's slices
// copied in and out of the same layouts): cuDNN then sees ordinary convolutions, for which it has
// float32 algorithms (Winograd among them) that its grouped ones may lack, at the price of T calls
// and the copies. Which is faster depends on the layer, the card and the library versions, so on
// CUDA the first call of each shape times both and keeps the faster (run_conv below;
// FASTMETA_CONV_AUTOTUNE, FASTMETA_CONV_AUTOTUNE_LOG); FASTMETA_CONV_PER_TASK forces a choice.
//
// FASTMETA_CONV_PRECISION=tf32x3 (float32 only; default ieee) runs each op as three TF32 products
// of its operands' high and low parts (x = hi + lo, hi x rounded to TF32's 11 significant bits, lo
// the exact remainder): hi*hi' + hi*lo' + lo*hi', only the low parts' product (~2^-22 of each
// product) dropped. Two ATen calls: hi*hi', and the two cross products as one call with their parts
// stacked along the op's reduction (the input channels of each group for the forward, the output
// channels for the input gradient); the second is added to the first. The weight gradient, whose
// output gradient operand is the largest tensor, makes three calls on single parts instead (one
// part of it alive at a time). On CUDA they run with cuDNN's TF32 allowed (tensor cores); on a CPU
// the same products run in float32.
#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/bitwise_and.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <torch/library.h>

#include "common.h"

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

namespace fastmeta {
namespace {

struct Geometry {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

Geometry geometry(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  auto pair = [](at::IntArrayRef v, const char* what) {
    TORCH_CHECK(v.size() == 1 || v.size() == 2, "batched_conv2d: ", what, " must have 1 or 2 values, got ", v);
    return v.size() == 1 ? std::vector<int64_t>{v[0], v[0]} : std::vector<int64_t>{v[0], v[1]};
  };
  TORCH_CHECK(groups >= 1, "batched_conv2d: groups must be >= 1, got ", groups);
  return {pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"), groups};
}

// [T, N, C, H, W] -> [N, T*C, H, W] (a view when x is the task-major view of such a buffer)
at::Tensor fold(const at::Tensor& x) {
  return x.transpose(0, 1).reshape({x.size(1), x.size(0) * x.size(2), x.size(3), x.size(4)});
}

// [N, T*C, H, W] -> [T, N, C, H, W] (a view)
at::Tensor unfold(const at::Tensor& y, int64_t T) {
  return y.view({y.size(0), T, y.size(1) / T, y.size(2), y.size(3)}).transpose(0, 1);
}

// [T, O, C/g, kh, kw] -> [T*O, C/g, kh, kw]
at::Tensor fold_weight(const at::Tensor& w) {
  return w.reshape({w.size(0) * w.size(1), w.size(2), w.size(3), w.size(4)});
}

void check_5d(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 5, "batched_conv2d: ", what, " must be 5-dimensional [T, ...], got ", t.sizes());
}

void check_sizes(at::IntArrayRef s, const char* what) {
  TORCH_CHECK(s.size() == 5, "batched_conv2d: ", what, " must have 5 values [T, ...], got ", s);
}

void check_tasks(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.size(0) == b.size(0), "batched_conv2d: ", an, " ", a.sizes(), " and ", bn, " ", b.sizes(),
              " must have the same number of tasks T (dim 0)");
}

// x [T, N, C, H, W], weight [T, O, C/groups, kh, kw] and (where given) gy [T, N, O, Ho, Wo]
// against each other and the geometry, whichever of them an op is given as tensors or sizes.
void check_conv(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef gy, const Geometry& g, const char* op) {
  TORCH_CHECK(x[0] == w[0] && w[1] % g.groups == 0 && x[2] == w[2] * g.groups, "batched_conv2d (", op, "): weight ", w,
              " with groups=", g.groups, " needs x [T=", w[0], ", N, C=", w[2] * g.groups, ", H, W], got ", x);
  std::array<int64_t, 2> out{};
  for (int i = 0; i < 2; ++i) {
    const int64_t span = g.dilation[i] * (w[3 + i] - 1) + 1;
    out[i] = (x[3 + i] + 2 * g.padding[i] - span) / g.stride[i] + 1;
    TORCH_CHECK(g.stride[i] >= 1 && g.dilation[i] >= 1 && g.padding[i] >= 0 && out[i] >= 1, "batched_conv2d (", op,
                "): x ", x, " and weight ", w, " give no output with stride ", g.stride, ", padding ", g.padding,
                " and dilation ", g.dilation);
  }
  if (gy.empty()) return;
  TORCH_CHECK(gy[0] == x[0] && gy[1] == x[1] && gy[2] == w[1] && gy[3] == out[0] && gy[4] == out[1],
              "batched_conv2d (", op, "): gy ", gy, " must be [", x[0], ", ", x[1], ", ", w[1], ", ", out[0], ", ",
              out[1], "] for x ", x, " and weight ", w);
}

// ATen's convolution backward of the folded problem: gy [T, N, O, Ho, Wo], xf [N, T*C, H, W] and
// wf [T*O, C/g, kh, kw] (a one-element stand-in where only the size is read, as torch.nn.grad
// passes). What the mask leaves out comes back as an empty tensor (an op's outputs are all defined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& gy, const at::Tensor& xf,
                                                             const at::Tensor& wf, const Geometry& g,
                                                             std::array<bool, 3> mask) {
  const int64_t T = gy.size(0), O = gy.size(2);
  const std::vector<int64_t> bias_size{T * O};
  at::Tensor gx, gw, gb;
  std::tie(gx, gw, gb) = at::convolution_backward(fold(gy), xf, wf,
                                                  mask[2] ? at::OptionalIntArrayRef(bias_size) : c10::nullopt,
                                                  g.stride, g.padding, g.dilation, /*transposed=*/false, {0, 0},
                                                  g.groups * T, mask);
  gx = mask[0] ? unfold(gx, T) : at::empty({0}, gy.options());
  gw = mask[1] ? gw.view({T, O, gw.size(1), gw.size(2), gw.size(3)}) : at::empty({0}, gy.options());
  gb = mask[2] ? gb.view({T, O}) : at::empty({0}, gy.options());
  return {gx, gw, gb};
}

at::Tensor stand_in(const at::Tensor& like, at::IntArrayRef size) { return like.new_empty({1}).expand(size); }

// FASTMETA_CONV_PRECISION (read each call): whether a float32 op runs as three TF32 products.
bool tf32x3(const at::Tensor& like) {
  const char* v = std::getenv("FASTMETA_CONV_PRECISION");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "ieee") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "tf32x3") == 0, "FASTMETA_CONV_PRECISION: expected ieee or tf32x3, got '", v, "'");
  return like.scalar_type() == at::kFloat;
}

// (hi, lo): hi = t rounded to the nearest TF32 value (ties away from zero: 13 low mantissa bits
// cleared after adding half of their range), lo = t - hi, exact in float32.
std::pair<at::Tensor, at::Tensor> tf32_parts(const at::Tensor& t) {
  at::Tensor hi = at::bitwise_and(t.view(at::kInt) + 0x1000, static_cast<int64_t>(~0x1FFF)).view(at::kFloat);
  return {hi, t - hi};
}

// Which TF32 parts of a tensor to stack, in order: 0 for hi, 1 for lo; one or two of them (a single
// part, or a cross product's pair).
using Parts = std::vector<int>;

// The parts of t stacked along dim d as `which` lists them, contiguous: one pass over t on a CPU and
// on CUDA (fastmeta::tf32_split_stack_cuda), ATen's ops elsewhere or with aten.
at::Tensor stack_parts(const at::Tensor& t, int64_t d, const Parts& which, bool aten = false) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && d >= 0 && d < t.dim(), "tf32 parts: a float32 tensor and one of its dims, "
              "got ", t.scalar_type(), " ", t.sizes(), " and dim ", d);
  const int k = static_cast<int>(which.size());
  TORCH_CHECK(k == 1 || k == 2, "tf32 parts: 1 or 2 parts, got ", k);
  int mask = 0;
  for (int p = 0; p < k; ++p) {
    TORCH_CHECK(which[p] == 0 || which[p] == 1, "tf32 parts: each part is 0 (hi) or 1 (lo), got ", which[p]);
    mask |= which[p] << p;
  }
  const at::Tensor src = t.contiguous();
  std::vector<int64_t> size = src.sizes().vec();
  int64_t outer = 1, row = 1;
  for (int64_t i = 0; i < src.dim(); ++i) (i < d ? outer : row) *= size[i];
  size[d] *= k;
  if (src.is_cpu() && !aten) {
    at::Tensor dst = at::empty(size, src.options());
    const float* in = src.data_ptr<float>();
    float* out = dst.data_ptr<float>();
    at::parallel_for(0, outer * row, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t o = i / row, r = i - o * row;
        uint32_t bits;
        std::memcpy(&bits, in + i, 4);
        bits = (bits + 0x1000u) & ~0x1FFFu;
        float hi;
        std::memcpy(&hi, &bits, 4);
        const float lo = in[i] - hi;
        float* dk = out + o * k * row + r;
        for (int p = 0; p < k; ++p) dk[p * row] = (mask >> p) & 1 ? lo : hi;
      }
    });
    return dst;
  }
  if (src.is_cuda() && !aten && tf32_split_stack_cuda() != nullptr && outer * row <= 0xFFFFFFFFll) {
    at::Tensor dst = at::empty(size, src.options());
    tf32_split_stack_cuda()(src, dst, outer, row, k, mask);
    return dst;
  }
  const std::pair<at::Tensor, at::Tensor> hl = tf32_parts(src);
  std::vector<at::Tensor> parts;
  for (int p = 0; p < k; ++p) parts.push_back(which[p] == 0 ? hl.first : hl.second);
  return at::cat(parts, d);
}

// cuDNN's TF32 convolutions allowed while alive, for CUDA tensors (the process-wide flag, restored
// after: not for threads that run other float32 convolutions at the same time). The flag is read
// and set through cuDNN's one TF32 switch (torch.backends.cudnn.allow_tf32), which PyTorch refuses
// to read while its conv and rnn settings differ (set apart through the per-op fp32_precision):
// that is reported, not guessed around.
struct AllowTF32 {
  bool set = false;
  explicit AllowTF32(bool cuda) {
    if (!cuda) return;
    bool now = false;
    try {
      now = at::globalContext().allowTF32CuDNN();
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "FASTMETA_CONV_PRECISION=tf32x3 turns cuDNN's TF32 on for its calls and back after, "
                  "which needs cuDNN's conv and rnn TF32 settings to agree (torch.backends.cudnn.allow_tf32, "
                  "or .conv.fp32_precision and .rnn.fp32_precision alike): ", e.what_without_backtrace());
    }
    if (!now) {
      at::globalContext().setAllowTF32CuDNN(true);
      set = true;
    }
  }
  explicit AllowTF32(const at::Tensor& like) : AllowTF32(like.is_cuda()) {}
  ~AllowTF32() {
    if (set) at::globalContext().setAllowTF32CuDNN(false);
  }
  AllowTF32(const AllowTF32&) = delete;
  AllowTF32& operator=(const AllowTF32&) = delete;
};

// The operands of the tf32x3 products, as the main product hi * hi' (one part each) and the cross
// products hi * lo' + lo * hi' (two parts each, stacked along the reduction; the weight gradient
// makes them one at a time, weight_grad_x3): the two are separate calls, summed after, so that the
// float32 sum of the main product's terms is no longer than the plain op's (one call over all three
// parts' terms rounded 2.2x more on a CPU, RESULTS.md).
//
// x [T, N, C, H, W] along each group's C/g input channels, built sample-major ([N, T, kC, H, W]
// underneath, so the grouped call folds it without a copy).
at::Tensor x_parts(const at::Tensor& x, int64_t groups, const Parts& which) {
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4), k = which.size();
  at::Tensor xs = x.transpose(0, 1).reshape({N, T, groups, C / groups, H, W});
  return stack_parts(xs, 3, which).view({N, T, k * C, H, W}).transpose(0, 1);
}

// weight [T, O, C/g, kh, kw] along its input channels.
at::Tensor w_in_parts(const at::Tensor& w, const Parts& which) { return stack_parts(w, 2, which); }

// gy [T, N, O, Ho, Wo] along each group's O/g channels (the input gradient's reduction).
at::Tensor gy_parts(const at::Tensor& gy, int64_t groups, const Parts& which) {
  const int64_t T = gy.size(0), N = gy.size(1), O = gy.size(2), H = gy.size(3), W = gy.size(4), k = which.size();
  at::Tensor s = gy.transpose(0, 1).reshape({N, T, groups, O / groups, H, W});
  return stack_parts(s, 3, which).view({N, T, k * O, H, W}).transpose(0, 1);
}

// weight [T, O, C/g, kh, kw] along each group's O/g output channels.
at::Tensor w_out_parts(const at::Tensor& w, int64_t groups, const Parts& which) {
  const int64_t T = w.size(0), O = w.size(1), k = which.size();
  at::Tensor s = w.reshape({T, groups, O / groups, w.size(2), w.size(3), w.size(4)});
  return stack_parts(s, 2, which).view({T, k * O, w.size(2), w.size(3), w.size(4)});
}

// t [T, N, ...] along its samples (the weight gradient's reduction), sample-major underneath.
at::Tensor sample_parts(const at::Tensor& t, const Parts& which) {
  return stack_parts(t.transpose(0, 1), 0, which).transpose(0, 1);
}

const Parts kHi{0}, kLo{1}, kHiLo{0, 1}, kLoHi{1, 0};

// FASTMETA_CONV_PER_TASK (read each call, as the CUDA kernels' settings): "1" one ATen call a task,
// "0" one grouped call, "cN" a call a task for convolutions of at most N input channels a group (a
// network's first layers: 1 or 3 image channels, which a grouped call turns into PyTorch's
// depthwise-style kernels) and one grouped call for the others; unset or empty: no choice forced
// (-1).
int forced_per_task(int64_t channels_per_group) {
  const char* v = std::getenv("FASTMETA_CONV_PER_TASK");
  if (v == nullptr || *v == '\0') return -1;
  if (std::strcmp(v, "0") == 0) return 0;
  if (std::strcmp(v, "1") == 0) return 1;
  char* end = nullptr;
  const long most = v[0] == 'c' ? std::strtol(v + 1, &end, 10) : 0;
  TORCH_CHECK(v[0] == 'c' && end != v + 1 && *end == '\0' && most >= 1,
              "FASTMETA_CONV_PER_TASK: expected 0, 1 or cN (N >= 1 input channels), got '", v, "'");
  return channels_per_group <= most ? 1 : 0;
}

// FASTMETA_CONV_AUTOTUNE: unset or empty, on for CUDA tensors and off for CPU ones (oneDNN's grouped
// convolution is the faster on the CPUs measured, RESULTS.md); "1" on, "0" off for both.
bool autotune_on(const at::Device& device) {
  const char* v = std::getenv("FASTMETA_CONV_AUTOTUNE");
  if (v == nullptr || *v == '\0') return device.is_cuda();
  TORCH_CHECK((v[0] == '0' || v[0] == '1') && v[1] == '\0', "FASTMETA_CONV_AUTOTUNE must be 0 or 1, got '", v, "'");
  return v[0] == '1';
}

// Milliseconds a call of fn (one call to warm, then reps timed), or < 0 where it cannot be timed:
// CUDA through the CUDA bindings' timer (events on the current stream; nothing inside a graph
// capture), CPU by the wall clock.
double time_call(const at::Device& device, const std::function<void()>& fn, int reps) {
  if (device.is_cuda()) {
    CudaTimer timer = cuda_timer();
    return timer == nullptr ? -1.0 : timer(fn, reps);
  }
  if (!device.is_cpu()) return -1.0;
  fn();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) fn();
  const std::chrono::duration<double, std::milli> dt = std::chrono::steady_clock::now() - t0;
  return dt.count() / reps;
}

struct ConvChoice {
  bool per_task;
  double grouped_ms, per_task_ms;
  std::string what;
};

std::mutex& choice_mutex() {
  static std::mutex mu;
  return mu;
}

std::map<std::vector<int64_t>, ConvChoice>& choices() {
  static std::map<std::vector<int64_t>, ConvChoice> chosen;
  return chosen;
}

// The sizes and strides of t, then a separator, into a cache key.
void add_key(std::vector<int64_t>& key, const at::Tensor& t) {
  key.push_back(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) {
    key.push_back(t.size(d));
    key.push_back(t.stride(d));
  }
}

void add_key(std::vector<int64_t>& key, at::IntArrayRef v) {
  key.push_back(static_cast<int64_t>(v.size()));
  key.insert(key.end(), v.begin(), v.end());
}

// Runs an op as run(per_task) says: forced by FASTMETA_CONV_PER_TASK; one grouped call for a
// single task or with the autotune off; else the choice cached for this key (the op, its
// tensors' sizes and strides, the geometry), made on the key's first call outside a graph
// capture by timing both forms (three timed calls each after one to warm) and keeping the faster,
// whose result that call returns (FASTMETA_CONV_AUTOTUNE_LOG=1 prints each choice to stderr); a
// call a task that fails there (out of memory, say) leaves the grouped call chosen. Both forms
// compute the same values up to the rounding of the algorithms underneath.
template <typename R>
R run_conv(const char* op, const std::function<std::vector<int64_t>()>& make_key, const at::Tensor& like, int64_t T,
           int64_t channels_per_group, const std::function<std::string()>& describe,
           const std::function<R(bool)>& run) {
  const int forced = forced_per_task(channels_per_group);
  if (forced >= 0) return run(forced == 1 && T > 0);
  if (T <= 1 || !autotune_on(like.device())) return run(false);
  std::vector<int64_t> key = make_key();  // (built only where the choice is looked up)
  key.push_back(static_cast<int64_t>(like.device().type()));
  key.push_back(like.device().index());
  key.push_back(static_cast<int64_t>(like.scalar_type()));
  {
    const std::lock_guard<std::mutex> lock(choice_mutex());
    auto it = choices().find(key);
    if (it != choices().end()) return run(it->second.per_task);
  }
  // Each timed call drops the previous call's result before it runs, and the grouped form's result
  // is dropped before the other form is timed (and made again if it wins), so that tuning holds
  // no more memory at once than a call of either form does.
  R result;
  const int reps = 3;
  const double g_ms = time_call(like.device(), [&] { result = R(); result = run(false); }, reps);
  if (g_ms < 0) return run(false);
  result = R();
  double p_ms;
  std::string failed;
  try {
    p_ms = time_call(like.device(), [&] { result = R(); result = run(true); }, reps);
  } catch (const c10::Error& e) {  // e.g. out of memory: the grouped call stays
    result = R();
    p_ms = std::numeric_limits<double>::infinity();
    failed = e.what_without_backtrace();
  }
  if (p_ms < 0) return run(false);
  const bool pick = p_ms < g_ms;
  if (!pick) {  // (the last per-task result dropped first)
    result = R();
    result = run(false);
  }
  ConvChoice c{pick, g_ms, p_ms, c10::str(op, " ", describe())};
  const char* log = std::getenv("FASTMETA_CONV_AUTOTUNE_LOG");
  if (log != nullptr && log[0] == '1') {
    std::fprintf(stderr, "fastmeta: batched_conv2d autotune (%s, %s): %s: grouped %.4f ms, per task %.4f ms%s%s; "
                 "chosen %s\n", like.device().str().c_str(), c10::toString(like.scalar_type()), c.what.c_str(), g_ms,
                 p_ms, failed.empty() ? "" : " (failed: ", failed.empty() ? "" : (failed.substr(0, 200) + ")").c_str(),
                 pick ? "per task" : "grouped");
  }
  const std::lock_guard<std::mutex> lock(choice_mutex());
  choices().emplace(key, std::move(c));
  return result;
}

// The per-task form of backward_impl: gy, x, w [T, ...] (x, w may be stand-ins of the right size).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_per_task(const at::Tensor& gy, const at::Tensor& x,
                                                                 const at::Tensor& w, const Geometry& g,
                                                                 std::array<bool, 3> mask) {
  const int64_t T = gy.size(0), N = gy.size(1), O = gy.size(2);
  const std::vector<int64_t> bias_size{O};
  at::Tensor gx, gw, gb;
  if (mask[0]) gx = gy.new_empty({N, T, x.size(2), x.size(3), x.size(4)});
  if (mask[1]) gw = gy.new_empty(w.sizes());
  if (mask[2]) gb = gy.new_empty({T, O});
  for (int64_t t = 0; t < T; ++t) {
    auto r = at::convolution_backward(gy[t], x[t], w[t], mask[2] ? at::OptionalIntArrayRef(bias_size) : c10::nullopt,
                                       g.stride, g.padding, g.dilation, /*transposed=*/false, {0, 0}, g.groups, mask);
    if (mask[0]) gx.select(1, t).copy_(std::get<0>(r));
    if (mask[1]) gw[t].copy_(std::get<1>(r));
    if (mask[2]) gb[t].copy_(std::get<2>(r));
  }
  return {mask[0] ? gx.transpose(0, 1) : at::empty({0}, gy.options()), mask[1] ? gw : at::empty({0}, gy.options()),
          mask[2] ? gb : at::empty({0}, gy.options())};
}

// The key of an op call's geometry.
void add_key(std::vector<int64_t>& key, const Geometry& g) {
  add_key(key, g.stride);
  add_key(key, g.padding);
  add_key(key, g.dilation);
  key.push_back(g.groups);
}

// A cache key: the head's values, then each part's (tensors, size lists, the geometry) in turn.
template <typename... Parts>
std::vector<int64_t> conv_key(std::initializer_list<int64_t> head, const Parts&... parts) {
  std::vector<int64_t> key(head);
  (add_key(key, parts), ...);
  return key;
}

// The input gradient of gy [T, N, O, Ho, Wo] through w [T, O, C/g, kh, kw] in either form.
at::Tensor input_grad_form(const at::Tensor& gy, const at::Tensor& w, at::IntArrayRef x_size, const Geometry& g,
                           bool per_task) {
  if (per_task) return std::get<0>(backward_per_task(gy, stand_in(gy, x_size), w, g, {true, false, false}));
  at::Tensor xf = stand_in(gy, {x_size[1], x_size[0] * x_size[2], x_size[3], x_size[4]});
  return std::get<0>(backward_impl(gy, xf, fold_weight(w), g, {true, false, false}));
}

// The weight gradient of x [T, N, C, H, W] and gy [T, N, O, Ho, Wo] in either form.
at::Tensor weight_grad_form(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef w_size, const Geometry& g,
                            bool per_task) {
  if (per_task) return std::get<1>(backward_per_task(gy, x, stand_in(gy, w_size), g, {false, true, false}));
  at::Tensor wf = stand_in(gy, {w_size[0] * w_size[1], w_size[2], w_size[3], w_size[4]});
  return std::get<1>(backward_impl(gy, fold(x), wf, g, {false, true, false}));
}

// The tf32x3 input gradient: main product, then the cross products added (x_parts above).
at::Tensor input_grad_x3(const at::Tensor& gy, const at::Tensor& w, at::IntArrayRef x_size, const Geometry& g,
                         bool per_task) {
  at::Tensor gx = input_grad_form(gy_parts(gy, g.groups, kHi), w_out_parts(w, g.groups, kHi), x_size, g, per_task);
  return gx.add_(
      input_grad_form(gy_parts(gy, g.groups, kHiLo), w_out_parts(w, g.groups, kLoHi), x_size, g, per_task));
}

// The tf32x3 weight gradient as three calls on single parts, gy's high part dropped before its low
// part is made: its operands then hold x's two parts and one of gy's at a time (gy, the output
// gradient, is the larger: 4x x at a layer that a 2x2 pool follows, far more at an image layer),
// instead of both operands' parts stacked along the samples (the first mini-ImageNet layer's gy is
// 68 MB a task).
at::Tensor weight_grad_x3(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef w_size, const Geometry& g,
                          bool per_task) {
  const at::Tensor xh = sample_parts(x, kHi), xl = sample_parts(x, kLo);
  at::Tensor gyp = sample_parts(gy, kHi);
  at::Tensor gw = weight_grad_form(xh, gyp, w_size, g, per_task);
  gw.add_(weight_grad_form(xl, gyp, w_size, g, per_task));
  gyp = at::Tensor();
  gyp = sample_parts(gy, kLo);
  return gw.add_(weight_grad_form(xh, gyp, w_size, g, per_task));
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_5d(x, "x");
  check_5d(w, "weight");
  check_tasks(x, w, "x", "weight");
  const Geometry g = geometry(stride, padding, dilation, groups);
  check_conv(x.sizes(), w.sizes(), {}, g, "forward");
  const int64_t T = x.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == T && bias->size(1) == w.size(1),
                "batched_conv2d: bias must be [T=", T, ", O=", w.size(1), "], got ", bias->sizes());
    b = bias->reshape({T * w.size(1)});
  }
  auto form = [&](const at::Tensor& x, const at::Tensor& w, bool per_task, bool with_bias = true) {
    const bool add_bias = with_bias && b.defined();
    if (per_task) {
      at::Tensor y;
      for (int64_t t = 0; t < T; ++t) {
        at::Tensor yt = at::convolution(x[t], w[t], add_bias ? c10::optional<at::Tensor>(bias->select(0, t)) : c10::nullopt,
                                        g.stride, g.padding, g.dilation, /*transposed=*/false, {0, 0}, g.groups);
        if (t == 0) y = yt.new_empty({yt.size(0), T, yt.size(1), yt.size(2), yt.size(3)});
        y.select(1, t).copy_(yt);
      }
      return y.transpose(0, 1);  // the same layout as the grouped call's
    }
    at::Tensor y = at::convolution(fold(x), fold_weight(w), add_bias ? b : at::Tensor(), g.stride, g.padding,
                                   g.dilation, /*transposed=*/false, {0, 0}, g.groups * T);
    return unfold(y, T);
  };
  const bool x3 = tf32x3(x);
  std::function<at::Tensor(bool)> run = [&](bool per_task) {
    if (!x3) return form(x, w, per_task);
    const AllowTF32 allow(x);
    at::Tensor y = form(x_parts(x, g.groups, kHi), w_in_parts(w, kHi), per_task);
    return y.add_(form(x_parts(x, g.groups, kHiLo), w_in_parts(w, kLoHi), per_task, /*with_bias=*/false));
  };
  auto make_key = [&] { return conv_key({0, b.defined(), x3}, x, w, g); };
  return run_conv<at::Tensor>("forward", make_key, x, T, w.size(2),
                              [&] { return c10::str("x ", x.sizes(), ", weight ", w.sizes(), x3 ? " tf32x3" : ""); }, run);
}

at::Tensor input_grad(const at::Tensor& gy, const at::Tensor& w, at::IntArrayRef x_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_5d(gy, "gy");
  check_5d(w, "weight");
  check_sizes(x_size, "x_size");
  check_tasks(gy, w, "gy", "weight");
  TORCH_CHECK(x_size[0] == gy.size(0) && x_size[1] == gy.size(1), "batched_conv2d: x_size ", x_size,
              " and gy ", gy.sizes(), " must agree in T and N");
  const Geometry g = geometry(stride, padding, dilation, groups);
  check_conv(x_size, w.sizes(), gy.sizes(), g, "input grad");
  const bool x3 = tf32x3(gy);
  std::function<at::Tensor(bool)> run = [&](bool per_task) {
    if (!x3) return input_grad_form(gy, w, x_size, g, per_task);
    const AllowTF32 allow(gy);
    return input_grad_x3(gy, w, x_size, g, per_task);
  };
  auto make_key = [&] { return conv_key({1, x3}, gy, w, x_size, g); };
  return run_conv<at::Tensor>("input grad", make_key, gy, gy.size(0), w.size(2),
                              [&] { return c10::str("gy ", gy.sizes(), ", weight ", w.sizes(), x3 ? " tf32x3" : ""); },
                              run);
}

at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& gy, at::IntArrayRef w_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_5d(x, "x");
  check_5d(gy, "gy");
  check_sizes(w_size, "weight_size");
  check_tasks(x, gy, "x", "gy");
  TORCH_CHECK(w_size[0] == x.size(0) && w_size[1] == gy.size(2), "batched_conv2d: weight_size ", w_size,
              " must be [T=", x.size(0), ", O=", gy.size(2), ", ...] for gy ", gy.sizes());
  const Geometry g = geometry(stride, padding, dilation, groups);
  check_conv(x.sizes(), w_size, gy.sizes(), g, "weight grad");
  const bool x3 = tf32x3(gy);
  std::function<at::Tensor(bool)> run = [&](bool per_task) {
    if (!x3) return weight_grad_form(x, gy, w_size, g, per_task);
    const AllowTF32 allow(gy);
    return weight_grad_x3(x, gy, w_size, g, per_task);
  };
  auto make_key = [&] { return conv_key({2, x3}, x, gy, w_size, g); };
  return run_conv<at::Tensor>("weight grad", make_key, gy, gy.size(0), w_size[2],
                              [&] { return c10::str("x ", x.sizes(), ", gy ", gy.sizes(), x3 ? " tf32x3" : ""); }, run);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> all_grads(const at::Tensor& gy, const at::Tensor& x,
                                                         const at::Tensor& w, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                                         int64_t groups, std::array<bool, 3> output_mask) {
  check_5d(gy, "gy");
  check_5d(x, "x");
  check_5d(w, "weight");
  check_tasks(x, gy, "x", "gy");
  check_tasks(x, w, "x", "weight");
  const Geometry g = geometry(stride, padding, dilation, groups);
  check_conv(x.sizes(), w.sizes(), gy.sizes(), g, "backward");
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  const bool x3 = tf32x3(gy);
  std::function<Grads(bool)> run = [&](bool per_task) {
    if (!x3) {
      if (per_task) return backward_per_task(gy, output_mask[1] ? x : stand_in(gy, x.sizes()), w, g, output_mask);
      // x is read only for the weight gradient (else only its size)
      at::Tensor xf =
          output_mask[1] ? fold(x) : stand_in(gy, {x.size(1), x.size(0) * x.size(2), x.size(3), x.size(4)});
      return backward_impl(gy, xf, fold_weight(w), g, output_mask);
    }
    // the two gradients split their operands along different reductions (input_grad_x3,
    // weight_grad_x3); the bias gradient is a sum (no products), in float32
    const at::Tensor none = at::empty({0}, gy.options());
    Grads out{none, none, none};
    {
      const AllowTF32 allow(gy);
      if (output_mask[0]) std::get<0>(out) = input_grad_x3(gy, w, x.sizes(), g, per_task);
      if (output_mask[1]) std::get<1>(out) = weight_grad_x3(x, gy, w.sizes(), g, per_task);
    }
    if (output_mask[2]) std::get<2>(out) = gy.sum({1, 3, 4});
    return out;
  };
  auto make_key = [&] { return conv_key({3, output_mask[0], output_mask[1], output_mask[2], x3}, gy, x, w, g); };
  return run_conv<Grads>("backward", make_key, gy, gy.size(0), w.size(2),
                         [&] {
                           return c10::str("gy ", gy.sizes(), ", x ", x.sizes(), ", weight ", w.sizes(),
                                           x3 ? " tf32x3" : "");
                         },
                         run);
}

}  // namespace

CudaTimer& cuda_timer() {
  static CudaTimer timer = nullptr;
  return timer;
}

at::Tensor tf32_stack_parts(const at::Tensor& t, int64_t dim, const std::vector<int64_t>& which, bool aten) {
  return stack_parts(t, dim, Parts(which.begin(), which.end()), aten);
}

std::vector<bool> cudnn_tf32_guard_probe() {
  std::vector<bool> seen;
  {
    const AllowTF32 allow(/*cuda=*/true);
    seen.push_back(at::globalContext().allowTF32CuDNN());
  }
  seen.push_back(at::globalContext().allowTF32CuDNN());
  return seen;
}

Tf32SplitStack& tf32_split_stack_cuda() {
  static Tf32SplitStack fn = nullptr;
  return fn;
}

void conv_autotune_clear() {
  const std::lock_guard<std::mutex> lock(choice_mutex());
  choices().clear();
}

std::vector<std::string> conv_autotune_choices() {
  const std::lock_guard<std::mutex> lock(choice_mutex());
  std::vector<std::string> out;
  for (const auto& kv : choices()) {
    const ConvChoice& c = kv.second;
    out.push_back(c10::str(c.what, " | grouped ", c.grouped_ms, " ms | per task ", c.per_task_ms, " ms | ",
                           c.per_task ? "per task" : "grouped"));
  }
  return out;
}

}  // namespace fastmeta

TORCH_LIBRARY_FRAGMENT(fastmeta, m) {
  m.def("batched_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> Tensor");
  m.def("batched_conv2d_input_grad(Tensor gy, Tensor weight, int[] x_size, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
  m.def("batched_conv2d_weight_grad(Tensor x, Tensor gy, int[] weight_size, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
  // (gx, gw, gb [T, O]), each an empty tensor where output_mask leaves it out
  m.def("batched_conv2d_backward(Tensor gy, Tensor x, Tensor weight, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

// The same functions serve CPU and CUDA tensors: ATen picks oneDNN / cuDNN underneath.
namespace {
void register_impls(torch::Library& m) {
  m.impl("batched_conv2d", &fastmeta::conv);
  m.impl("batched_conv2d_input_grad", &fastmeta::input_grad);
  m.impl("batched_conv2d_weight_grad", &fastmeta::weight_grad);
  m.impl("batched_conv2d_backward", &fastmeta::all_grads);
}
}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) { register_impls(m); }
TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) { register_impls(m); }
