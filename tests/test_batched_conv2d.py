"""batched_conv2d's cpp backend (fastmeta::batched_conv2d and its two gradients, csrc/batched_conv2d.cpp)
against the grouped-convolution reference: values and derivatives up to third order, every
configuration Conv2d has (stride, padding, dilation, groups), odd sizes, T in {1, 3}, weights and
biases per task or shared; its fake kernels; its errors; and the conv4 MAML meta-gradient on it
against the per-task loop."""
import os

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fastmeta
from fastmeta import ops
from conftest import RTOL, assert_rel_close, loop_meta_grads, requires_cpp, small_conv_net

pytestmark = requires_cpp


def _case(T, N, C, H, W, O, k, shared, bias, dtype, groups=1):
    g = torch.Generator().manual_seed(T * 100 + C + H)
    d = dict(dtype=dtype)
    x = torch.randn(T, N, C, H, W, generator=g, **d).requires_grad_()
    w = torch.randn(*(() if shared else (T,)), O, C // groups, k, k, generator=g, **d).requires_grad_()
    b = None if bias is None else torch.randn(*((O,) if bias == "shared" else (T, O)), generator=g,
                                              **d).requires_grad_()
    return x, w, b


CASES = [
    # T, N, C, H, W, O, k, shared weight, bias, Conv2d keywords
    (1, 2, 3, 5, 5, 17, 3, False, "task", dict(padding=1)),
    (3, 1, 17, 7, 7, 3, 3, True, "shared", dict(padding=1)),
    (3, 2, 3, 7, 5, 4, 3, False, None, dict(padding=0)),
    (2, 2, 4, 7, 7, 5, 3, False, "task", dict(stride=2, padding=1)),
    (2, 1, 3, 9, 8, 4, 3, False, "task", dict(dilation=2, padding=(2, 1))),
    (3, 2, 4, 6, 5, 6, 3, False, "shared", dict(groups=2, padding=1)),
    (2, 2, 3, 6, 6, 4, 1, True, None, dict(stride=(1, 2))),
]


@pytest.mark.parametrize("per_task", ["0", "1", "c3"])
@pytest.mark.parametrize("dtype, precision", [(torch.float64, "ieee"), (torch.float32, "ieee"),
                                              (torch.float32, "tf32x3")])
@pytest.mark.parametrize("case", CASES)
def test_values_and_derivatives_to_third_order(case, dtype, precision, per_task, monkeypatch):
    """Each op as one grouped ATen call, as one call a task (FASTMETA_CONV_PER_TASK=1), and as one
    call a task only at most 3 input channels a group (=c3: the 3- and 2-channel cases here); in
    float32 also with the products as tf32x3 (FASTMETA_CONV_PRECISION)."""
    monkeypatch.setenv("FASTMETA_CONV_PER_TASK", per_task)
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", precision)
    *shape, kw = case
    x, w, b = _case(*shape, dtype, groups=kw.get("groups", 1))
    with fastmeta.use_backend("cpp"):
        y = ops.batched_conv2d(x, w, b, **kw)
    want = ops.batched_conv2d_ref(x, w, b, **kw)
    rtol = RTOL[dtype]
    assert y.shape == want.shape
    assert_rel_close([y.detach()], [want.detach()], rtol, "conv")
    ins = [t for t in (x, w, b) if t is not None]
    r = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
    # tanh makes every order of derivative non-trivial (the convolution itself is bilinear)
    got, want = [(torch.tanh(y) * r).sum()], [(torch.tanh(want) * r).sum()]
    for order in ("first", "second", "third"):
        gg = torch.autograd.grad(got[-1], ins, create_graph=True)
        gw = torch.autograd.grad(want[-1], ins, create_graph=True)
        assert_rel_close([g.detach() for g in gg], [g.detach() for g in gw], rtol, f"{order} derivatives")
        got.append(sum((g * g.detach().flip(-1)).sum() for g in gg))
        want.append(sum((g * g.detach().flip(-1)).sum() for g in gw))


@pytest.mark.parametrize("x_grad", [False, True])
def test_weight_gradient_keeps_the_output_gradient_only_for_the_input(x_grad):
    """The weight gradient's node keeps gy only where x needs a derivative: for a network's input
    images (no gradient) the first layer's output gradient is not held until the outer backward,
    and the second derivative with respect to the weights is still the reference's."""
    x, w, b = _case(2, 2, 3, 6, 6, 5, 3, False, "task", torch.float64)
    x = x.detach().requires_grad_(x_grad)
    r = torch.linspace(-1, 1, 2 * 2 * 5 * 6 * 6, dtype=torch.float64).view(2, 2, 5, 6, 6)
    sums = []
    for fn in ("cpp", "ref"):
        with fastmeta.use_backend("cpp"):
            y = ops.batched_conv2d(x, w, b, padding=1) if fn == "cpp" else ops.batched_conv2d_ref(x, w, b, padding=1)
        gw = torch.autograd.grad((torch.tanh(y) * r).sum(), w, create_graph=True)[0]
        if fn == "cpp":
            assert gw.grad_fn.name() == "_WeightGradBackward"
            saved = gw.grad_fn.saved_tensors
            assert saved[0] is not None and (saved[1] is not None) == x_grad, [t is not None for t in saved]
        sums.append(torch.autograd.grad((gw * gw.detach().flip(-1)).sum(), [w] + ([x] if x_grad else [])))
    assert_rel_close(list(sums[0]), list(sums[1]), 1e-10, "second derivatives")


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]])
def test_gradcheck_and_gradgradcheck(case):
    *shape, kw = case
    small = list(shape)
    small[1] = 1  # one sample a task keeps the numerical Jacobians small
    x, w, b = _case(*small, torch.float64, groups=kw.get("groups", 1))
    fn = lambda *a: ops.batched_conv2d(*a, **kw)  # noqa: E731
    with fastmeta.use_backend("cpp"):
        assert gradcheck(fn, (x, w, b))
        assert gradgradcheck(fn, (x, w, b))


def test_layout_feeds_the_next_layer_without_a_copy():
    """The output is the task-major view of ATen's sample-major buffer, so a second convolution
    folds it back into that buffer by a view (and the values stay the reference's)."""
    x, w, b = _case(3, 2, 4, 6, 6, 5, 3, False, "task", torch.float64)
    with fastmeta.use_backend("cpp"):
        y = ops.batched_conv2d(x, w, b, padding=1)
        assert y.transpose(0, 1).is_contiguous()
        w2 = torch.randn(3, 2, 5, 3, 3, dtype=torch.float64)
        z = ops.batched_conv2d(y, w2, None, padding=1)
    ref = ops.batched_conv2d_ref(ops.batched_conv2d_ref(x, w, b, padding=1), w2, None, padding=1)
    torch.testing.assert_close(z, ref)


def test_fake_kernels_and_schema():
    """torch.library.opcheck: schema, and the fake (meta) kernels against the real outputs (shapes,
    strides)."""
    from fastmeta.ops.batched_conv2d import _register_aten
    _register_aten()
    x, w, b = (t.detach() for t in _case(2, 3, 4, 7, 6, 5, 3, False, "task", torch.float32))
    geom = ([2, 1], [1, 1], [1, 1], 1)
    utils = ("test_schema", "test_faketensor")
    fm = torch.ops.fastmeta
    torch.library.opcheck(fm.batched_conv2d.default, (x, w, b, *geom), test_utils=utils)
    torch.library.opcheck(fm.batched_conv2d.default, (x, w, None, *geom), test_utils=utils)
    y = fm.batched_conv2d(x, w, b, *geom)
    gy = torch.randn_like(y)
    torch.library.opcheck(fm.batched_conv2d_input_grad.default, (gy, w, list(x.shape), *geom), test_utils=utils)
    torch.library.opcheck(fm.batched_conv2d_weight_grad.default, (x, gy, list(w.shape), *geom), test_utils=utils)
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(fm.batched_conv2d_backward.default, (gy, x, w, *geom, mask), test_utils=utils)


def test_op_errors_name_the_argument():
    """The ops called directly (past batched_conv2d's Python checks) reject bad shapes with a message
    that names the argument."""
    from fastmeta.ops.batched_conv2d import _register_aten
    _register_aten()
    fm = torch.ops.fastmeta
    x, w, b = (t.detach() for t in _case(2, 3, 4, 7, 6, 5, 3, False, "task", torch.float32))
    geom = ([1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="weight must be 5-dimensional"):
        fm.batched_conv2d(x, w[0], b, *geom)
    with pytest.raises(RuntimeError, match="same number of tasks"):
        fm.batched_conv2d(x, w[:1], b, *geom)
    with pytest.raises(RuntimeError, match=r"bias must be \[T=2, O=5\]"):
        fm.batched_conv2d(x, w, b[:, :4], *geom)
    with pytest.raises(RuntimeError, match="stride must have 1 or 2 values"):
        fm.batched_conv2d(x, w, b, [1, 1, 1], [1, 1], [1, 1], 1)
    gy = torch.randn(2, 3, 5, 7, 6)
    with pytest.raises(RuntimeError, match="x_size must have 5 values"):
        fm.batched_conv2d_input_grad(gy, w, [3, 4, 7, 6], *geom)
    with pytest.raises(RuntimeError, match="weight_size"):
        fm.batched_conv2d_weight_grad(x, gy, [2, 4, 4, 3, 3], *geom)


def _conv_net(dtype):
    return small_conv_net(dtype, 1, 3, 4)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv4_meta_gradient_on_cpp_conv(first_order, meta_sgd, dtype):
    """BatchedMAML of a conv net (Conv -> BatchNorm -> ReLU -> MaxPool2d(2) blocks, linear head)
    with the convolutions on the cpp backend, against the naive per-task loop: the meta-gradient
    (and the learned rates' gradient under Meta-SGD), two inner steps."""
    model = _conv_net(dtype)
    T, K, Q = 3, 5, 4
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(T, K, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (T, K), generator=g),
             torch.randn(T, Q, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (T, Q), generator=g))
    meta = fastmeta.BatchedMAML(model, 0.3, 2, first_order=first_order, loss="cross_entropy",
                                learn_inner_lr=meta_sgd)
    params = list(model.parameters())
    lr_params = [meta.lrs[n.replace(".", "__")] for n, _ in model.named_parameters()] if meta_sgd else []
    with fastmeta.use_backend("cpp"):
        grads = torch.autograd.grad(meta(*batch), params + lr_params)
    lrs = {n: meta.lrs[n.replace(".", "__")] for n, _ in model.named_parameters()} if meta_sgd else None
    _, want, want_lr = loop_meta_grads(model, *batch, None if meta_sgd else 0.3, 2, "cross_entropy", first_order,
                                       lrs=lrs)
    assert_rel_close(list(grads[:len(params)]), want, RTOL[dtype], "meta-grad")
    if meta_sgd:
        assert_rel_close(list(grads[len(params):]), want_lr, RTOL[dtype], "lr-grad")


def test_conv4_meta_gradient_with_a_call_a_task(monkeypatch):
    """FASTMETA_CONV_PER_TASK=1 (each convolution op as one ATen call a task), all tasks through the
    network at once: the second-order meta-gradient of the conv net equals the loop's."""
    monkeypatch.setenv("FASTMETA_CONV_PER_TASK", "1")
    monkeypatch.setenv("FASTMETA_CPU_TASK_CHUNK", "8")
    model = _conv_net(torch.float64)
    T, K, Q = 3, 5, 4
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(T, K, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (T, K), generator=g),
             torch.randn(T, Q, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (T, Q), generator=g))
    meta = fastmeta.BatchedMAML(model, 0.3, 2, loss="cross_entropy")
    params = list(model.parameters())
    with fastmeta.use_backend("cpp"):
        got = torch.autograd.grad(meta(*batch), params)
    _, want, _ = loop_meta_grads(model, *batch, 0.3, 2, "cross_entropy", False)
    assert_rel_close(list(got), list(want), 1e-10, "meta-gradient, a call a task")


@pytest.mark.parametrize("value", ["yes", "c", "c0", "c3x", "2"])
def test_per_task_setting_is_checked(value, monkeypatch):
    monkeypatch.setenv("FASTMETA_CONV_PER_TASK", value)
    x, w, b = _case(2, 2, 3, 6, 6, 5, 3, False, "task", torch.float64)
    with fastmeta.use_backend("cpp"), pytest.raises(RuntimeError, match="FASTMETA_CONV_PER_TASK: expected 0, 1 or cN"):
        ops.batched_conv2d(x, w, b, padding=1)


def _autotune_env(monkeypatch, tune):
    monkeypatch.delenv("FASTMETA_CONV_PER_TASK", raising=False)
    if tune is None:
        monkeypatch.delenv("FASTMETA_CONV_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("FASTMETA_CONV_AUTOTUNE", tune)
    monkeypatch.setenv("FASTMETA_CONV_AUTOTUNE_LOG", "1")
    fastmeta._C._conv_autotune_clear()


def _second_order(x, w, b, fn):
    y = fn(x, w, b, padding=1)
    r = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    ins = [t for t in (x, w, b) if t is not None]
    gs = torch.autograd.grad((torch.tanh(y) * r).sum(), ins, create_graph=True)
    gg = torch.autograd.grad(sum((g * g.detach().flip(-1)).sum() for g in gs), ins)
    return [y.detach(), *[g.detach() for g in gs], *gg]


def test_autotune_times_each_shape_once_and_keeps_the_values(monkeypatch, capfd):
    """FASTMETA_CONV_AUTOTUNE=1: the first call of each op and shape times the grouped call against a
    call a task and keeps the faster (one log line and one choice a shape); values and derivatives
    to second order stay the reference's, and later calls of the same shapes time nothing more."""
    _autotune_env(monkeypatch, "1")
    x, w, b = _case(3, 2, 4, 7, 6, 5, 3, False, "task", torch.float64)
    want = _second_order(x, w, b, ops.batched_conv2d_ref)
    with fastmeta.use_backend("cpp"):
        got = _second_order(x, w, b, ops.batched_conv2d)
    assert_rel_close(got, want, 1e-12, "autotuned conv, to second order")
    choices = fastmeta._C._conv_autotune_choices()
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "batched_conv2d autotune" in ln]
    assert choices and len(lines) == len(choices), (choices, err)
    assert any(c.startswith("forward x [3, 2, 4, 7, 6], weight [3, 5, 4, 3, 3]") for c in choices), choices
    for c in choices:
        *_, grouped, per_task, pick = [p.strip() for p in c.split("|")]
        g_ms, p_ms = float(grouped.split()[1]), float(per_task.split()[2])
        assert g_ms > 0 and p_ms > 0 and pick == ("per task" if p_ms < g_ms else "grouped"), c
    with fastmeta.use_backend("cpp"):
        again = _second_order(x, w, b, ops.batched_conv2d)
    assert_rel_close(again, want, 1e-12, "autotuned conv, cached choices")
    assert fastmeta._C._conv_autotune_choices() == choices
    assert "batched_conv2d autotune" not in capfd.readouterr().err


@pytest.mark.parametrize("setting", [None, "0", "forced", "one task"])
def test_autotune_runs_only_where_it_should(setting, monkeypatch, capfd):
    """Off on CPU tensors unless FASTMETA_CONV_AUTOTUNE=1; off with =0; never where
    FASTMETA_CONV_PER_TASK forces the form, nor for one task (both forms are the same call)."""
    _autotune_env(monkeypatch, setting if setting in (None, "0") else "1")
    if setting == "forced":
        monkeypatch.setenv("FASTMETA_CONV_PER_TASK", "1")
    T = 1 if setting == "one task" else 2
    x, w, b = _case(T, 2, 3, 6, 6, 4, 3, False, "task", torch.float64)
    with fastmeta.use_backend("cpp"):
        got = _second_order(x, w, b, ops.batched_conv2d)
    assert_rel_close(got, _second_order(x, w, b, ops.batched_conv2d_ref), 1e-12, f"conv ({setting})")
    assert fastmeta._C._conv_autotune_choices() == []
    assert "batched_conv2d autotune" not in capfd.readouterr().err


def test_autotune_setting_is_checked(monkeypatch):
    monkeypatch.setenv("FASTMETA_CONV_AUTOTUNE", "yes")
    monkeypatch.delenv("FASTMETA_CONV_PER_TASK", raising=False)
    x, w, b = _case(2, 2, 3, 6, 6, 5, 3, False, "task", torch.float64)
    with fastmeta.use_backend("cpp"), pytest.raises(RuntimeError, match="FASTMETA_CONV_AUTOTUNE must be 0 or 1"):
        ops.batched_conv2d(x, w, b, padding=1)



def test_autotune_holds_no_more_memory_than_either_form(monkeypatch):
    """Tuning a shape keeps at most one form's result at a time: the first (timed) call's peak is
    within the larger of the two forms' own peaks (plus 5% of the output)."""
    from fastmeta.harness import step_peak_mb
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 48, 48, generator=g)
    w = torch.randn(4, 16, 8, 3, 3, generator=g)

    def call():
        with fastmeta.use_backend("cpp"), torch.no_grad():
            ops.batched_conv2d(x, w, None, padding=1)

    peaks = {}
    for form in ("0", "1"):
        monkeypatch.setenv("FASTMETA_CONV_PER_TASK", form)
        call()
        peaks[form] = step_peak_mb(call, "cpu")
    _autotune_env(monkeypatch, "1")
    tuned = step_peak_mb(call, "cpu")
    assert len(fastmeta._C._conv_autotune_choices()) == 1
    out_mb = 4 * 4 * 16 * 48 * 48 * 4 / 2**20
    assert peaks["0"] >= out_mb and tuned <= max(peaks.values()) + 0.05 * out_mb, (tuned, peaks, out_mb)


def test_public_autotune_report_and_reset(monkeypatch):
    """fastmeta.conv_autotune_choices() lists fastmeta._C's choices between its two forms (and the
    tuned primitives' between backends); fastmeta.clear_conv_autotune() forgets them, so the next
    call of a shape times again."""
    _autotune_env(monkeypatch, "1")
    x, w, b = _case(2, 2, 3, 6, 6, 4, 3, False, "task", torch.float64)

    def call():
        with fastmeta.use_backend("cpp"), torch.no_grad():
            ops.batched_conv2d(x, w, b, padding=1)

    call()
    report = fastmeta.conv_autotune_choices()
    assert set(report) == {"forms", "backends"} and report["backends"] == []
    assert len(report["forms"]) == 1 and report["forms"][0].startswith("forward x [2, 2, 3, 6, 6]"), report
    fastmeta.clear_conv_autotune()
    assert fastmeta.conv_autotune_choices() == {"forms": [], "backends": []}
    call()
    assert len(fastmeta.conv_autotune_choices()["forms"]) == 1


# --- FASTMETA_CONV_PRECISION=tf32x3: three TF32 products of the operands' high and low parts -------
def _ops_and_grads(x, w, b, kw):
    """Each op of fastmeta._C directly: forward, input and weight gradients, the one-call backward."""
    fm = torch.ops.fastmeta
    geom = (list(_pair(kw.get("stride", 1))), list(_pair(kw.get("padding", 0))),
            list(_pair(kw.get("dilation", 1))), kw.get("groups", 1))
    y = fm.batched_conv2d(x, w, b, *geom)
    gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y).sin()
    return [y, fm.batched_conv2d_input_grad(gy, w, list(x.shape), *geom),
            fm.batched_conv2d_weight_grad(x, gy, list(w.shape), *geom),
            *fm.batched_conv2d_backward(gy, x, w, *geom, [True, True, True])]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@pytest.mark.parametrize("per_task", ["0", "1"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[5]])
def test_tf32x3_drops_only_the_low_parts_product(case, per_task, monkeypatch):
    """FASTMETA_CONV_PRECISION=tf32x3 on float32: every op (forward, input gradient, weight gradient,
    the one-call backward with its bias gradient) in both forms against the float64 answer. On a CPU
    the three products of the parts run in float32, so what is left of the error is float32's and
    the dropped low x low product (~2^-22 relative): within 1e-6, where a missing low-part product
    (2^-11) would be ~1e-4 off. The results differ from the plain float32 ops' (the setting took)."""
    monkeypatch.setenv("FASTMETA_CONV_PER_TASK", per_task)
    *shape, kw = case
    x, w, b = (t.detach() for t in _case(*shape[:-2], False, "task", torch.float32, groups=kw.get("groups", 1)))
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "ieee")
    plain = _ops_and_grads(x, w, b, kw)
    exact = _ops_and_grads(x.double(), w.double(), b.double(), kw)
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "tf32x3")
    got = _ops_and_grads(x, w, b, kw)
    names = ["forward", "input grad", "weight grad", "backward gx", "backward gw", "backward gb"]
    for name, g, p, e in zip(names, got, plain, exact):
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        assert_rel_close([g.double()], [e], 1e-6, f"tf32x3 {name} vs float64")
    assert any(not torch.equal(g, p) for g, p in zip(got[:3], plain[:3])), "tf32x3 changed nothing"


def test_tf32x3_leaves_float64_alone(monkeypatch):
    monkeypatch.setenv("FASTMETA_CONV_PER_TASK", "0")
    *shape, kw = CASES[0]
    x, w, b = (t.detach() for t in _case(*shape[:-2], False, "task", torch.float64))
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "ieee")
    plain = _ops_and_grads(x, w, b, kw)
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "tf32x3")
    got = _ops_and_grads(x, w, b, kw)
    assert all(torch.equal(g, p) for g, p in zip(got, plain))


@pytest.mark.parametrize("value", ["tf32", "TF32X3", "x3"])
def test_precision_setting_is_checked(value, monkeypatch):
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", value)
    x, w, b = _case(2, 2, 3, 6, 6, 5, 3, False, "task", torch.float32)
    with fastmeta.use_backend("cpp"), pytest.raises(RuntimeError,
                                                    match="FASTMETA_CONV_PRECISION: expected ieee or tf32x3"):
        ops.batched_conv2d(x, w, b, padding=1)


@pytest.mark.parametrize("first_order", [False, True])
def test_tf32x3_conv_net_meta_gradient(first_order, monkeypatch):
    """BatchedMAML of the conv net with its convolutions (and every derivative of them, to second
    order) as tf32x3 products on the cpp backend: its float32 meta-gradient is as close to the
    float64 loop's as the plain float32 one is (within 2x, or 1e-5)."""
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "tf32x3")
    model = _conv_net(torch.float32)
    T, K, Q = 3, 5, 4
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(T, K, 1, 8, 8, generator=g), torch.randint(0, 5, (T, K), generator=g),
             torch.randn(T, Q, 1, 8, 8, generator=g), torch.randint(0, 5, (T, Q), generator=g))
    meta = fastmeta.BatchedMAML(model, 0.3, 2, first_order=first_order, loss="cross_entropy")
    params = list(model.parameters())
    with fastmeta.use_backend("cpp"):
        got = torch.autograd.grad(meta(*batch), params)
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "ieee")
    with fastmeta.use_backend("cpp"):
        plain = torch.autograd.grad(meta(*batch), params)
    import copy
    m64 = copy.deepcopy(model).double()
    b64 = (batch[0].double(), batch[1], batch[2].double(), batch[3])
    _, exact, _ = loop_meta_grads(m64, *b64, 0.3, 2, "cross_entropy", first_order)
    from fastmeta.harness import max_rel_err
    err, err_plain = max_rel_err(list(got), list(exact)), max_rel_err(list(plain), list(exact))
    assert err <= max(2 * err_plain, 1e-5), (err, err_plain)
    assert any(not torch.equal(a, c) for a, c in zip(got, plain)), "tf32x3 changed nothing"


def test_tf32x3_is_its_own_autotune_shape(monkeypatch, capfd):
    """The autotune keeps separate choices for the plain and the tf32x3 ops of one shape."""
    _autotune_env(monkeypatch, "1")
    x, w, b = (t.detach() for t in _case(3, 2, 4, 7, 6, 5, 3, False, "task", torch.float32))
    fm = torch.ops.fastmeta
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "ieee")
    fm.batched_conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1)
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "tf32x3")
    fm.batched_conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1)
    choices = fastmeta._C._conv_autotune_choices()
    assert len(choices) == 2 and sum(" tf32x3 |" in c for c in choices) == 1, choices


@pytest.mark.parametrize("dim", [0, 1, 3])
def test_tf32_parts(dim):
    """The tf32x3 operands: hi is t rounded to the nearest TF32 value (its low 13 mantissa bits zero,
    within half a TF32 step), lo = t - hi exactly; stacked along dim in the order asked, by the
    one-pass loop bit for bit as by ATen's ops, from a non-contiguous tensor too."""
    g = torch.Generator().manual_seed(dim)
    t = (torch.randn(4, 6, 5, 7, generator=g) * torch.logspace(-20, 20, 7)).transpose(1, 2)
    t[0, 0, 0, :3] = torch.tensor([1 + 2 ** -11, -(1 + 2 ** -11), 1 + 3 * 2 ** -12])  # ties, and above one
    for which in ([0], [1], [0, 1], [1, 0]):
        got = fastmeta._C._tf32_stack_parts(t, dim, which, False)
        assert got.is_contiguous() and torch.equal(got, fastmeta._C._tf32_stack_parts(t, dim, which, True))
        assert got.shape[dim] == len(which) * t.shape[dim]
        if len(which) < 2:
            continue
        parts = got.chunk(len(which), dim)
        hi, lo = parts[which.index(0)], parts[which.index(1)]
        assert all(torch.equal(parts[i], hi if w == 0 else lo) for i, w in enumerate(which))
        assert torch.equal(hi + lo, t)
        assert int((hi.view(torch.int32) & 0x1FFF).abs().sum()) == 0
        assert bool((lo.abs() <= t.abs() * 2.0 ** -11).all())
    assert fastmeta._C._tf32_stack_parts(t, 3, [0, 1], False)[0, 0, 0, :3].tolist() == [1 + 2 ** -10, -(1 + 2 ** -10),
                                                                                        1 + 2 ** -10]
    with pytest.raises(RuntimeError, match="float32"):
        fastmeta._C._tf32_stack_parts(t.double(), 0, [0, 1], False)
    with pytest.raises(RuntimeError, match="0 \\(hi\\) or 1 \\(lo\\)"):
        fastmeta._C._tf32_stack_parts(t, 0, [0, 2], False)
    with pytest.raises(RuntimeError, match="1 or 2 parts"):
        fastmeta._C._tf32_stack_parts(t, 0, [0, 1, 0], False)


def test_conv_precision_api(monkeypatch):
    """fastmeta.use_conv_precision / set_conv_precision / get_conv_precision: the setting the ops read
    (forward and backward inside the block take it, the previous one comes back after), checked
    values, and explain() saying so for a float32 conv model."""
    monkeypatch.delenv("FASTMETA_CONV_PRECISION", raising=False)
    assert fastmeta.get_conv_precision() == "ieee"
    x, w, b = _case(2, 2, 3, 6, 6, 5, 3, False, "task", torch.float32)

    def grads():
        with fastmeta.use_backend("cpp"):
            return torch.autograd.grad(ops.batched_conv2d(x, w, b, padding=1).square().sum(), (x, w))
    plain = grads()
    with fastmeta.use_conv_precision("tf32x3"):
        assert fastmeta.get_conv_precision() == "tf32x3"
        x3 = grads()
        assert "three TF32 products" in fastmeta.explain(_conv_net(torch.float32))
        assert "three TF32 products" not in fastmeta.explain(_conv_net(torch.float64))
    assert fastmeta.get_conv_precision() == "ieee" and "FASTMETA_CONV_PRECISION" not in os.environ
    assert "TF32" not in fastmeta.explain(_conv_net(torch.float32))
    assert all(not torch.equal(a, c) for a, c in zip(x3, plain))
    assert_rel_close(list(x3), list(plain), 1e-5, "tf32x3 vs float32")
    fastmeta.set_conv_precision("tf32x3")
    assert os.environ["FASTMETA_CONV_PRECISION"] == "tf32x3"
    fastmeta.set_conv_precision("ieee")
    with pytest.raises(ValueError, match="set_conv_precision: expected one of ieee, tf32x3"):
        fastmeta.set_conv_precision("tf32")
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "bf16")
    with pytest.raises(ValueError, match="FASTMETA_CONV_PRECISION"):
        fastmeta.get_conv_precision()


def test_tf32x3_rounds_like_float32_over_a_long_reduction(monkeypatch):
    """tf32x3 sums the main product hi*hi' in a call of its own (the cross products in another, added
    after), so the float32 rounding of its long sums is the plain op's: within 1.5x of the plain
    float32 op's error against float64 at a 64-channel 3x3 layer (576 terms a sum; one call over
    all three parts' terms measured 2.2x)."""
    monkeypatch.setenv("FASTMETA_CONV_PER_TASK", "0")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, 64, 14, 14, generator=g).relu()
    w = torch.randn(1, 64, 64, 3, 3, generator=g) * 0.05
    kw = dict(padding=1)
    exact = _ops_and_grads(x.double(), w.double(), None, kw)
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "ieee")
    plain = _ops_and_grads(x, w, None, kw)
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "tf32x3")
    got = _ops_and_grads(x, w, None, kw)
    from fastmeta.harness import max_rel_err
    for name, a, p, e in zip(["forward", "input grad", "weight grad"], got, plain, exact):
        err, err_plain = max_rel_err([a.double()], [e]), max_rel_err([p.double()], [e])
        assert err <= 1.5 * err_plain, f"{name}: tf32x3 {err:.2e}, float32 {err_plain:.2e}"


def test_tf32x3_cudnn_guard_restores_the_flag():
    """The guard tf32x3 ops hold on CUDA (its logic needs no GPU): cuDNN's TF32 on inside, as it was
    after, whether it was off or on; PyTorch's own conv and rnn settings set apart give a clear
    error rather than a guess."""
    cudnn = torch.backends.cudnn
    old = cudnn.allow_tf32
    try:
        for before in (False, True):
            cudnn.allow_tf32 = before
            assert fastmeta._C._cudnn_tf32_guard_probe() == [True, before]
            assert cudnn.allow_tf32 is before
        cudnn.allow_tf32 = False
        if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
            cudnn.rnn.fp32_precision = "tf32"  # conv stays off: settings apart
            with pytest.raises(RuntimeError, match="conv and rnn TF32 settings to agree"):
                fastmeta._C._cudnn_tf32_guard_probe()
    finally:
        cudnn.allow_tf32 = old
