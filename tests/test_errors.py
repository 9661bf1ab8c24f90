"""Bad input raises ValueError/TypeError naming the argument and the shapes, before any compute."""
import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import ops

from conftest import requires_cpp


def setup(loss="mse"):
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss=loss)
    xs, xq = torch.randn(4, 5, 2, dtype=torch.float64), torch.randn(4, 6, 2, dtype=torch.float64)
    if loss == "mse":
        ys, yq = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    else:
        ys, yq = torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (4, 6))
    return model, meta, xs, ys, xq, yq


def test_task_dim_mismatch_names_all_shapes():
    _, meta, xs, ys, xq, yq = setup()
    with pytest.raises(ValueError, match=r"task dim T differs.*xq \(3, 6, 2\)"):
        meta(xs, ys, xq[:3], yq)
    with pytest.raises(ValueError, match=r"xs \(4, 5, 2\) and ys \(4, 4, 3\)"):
        meta(xs, ys[:, :4], xq, yq)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_empty_meta_batch(backend):
    _, meta, xs, ys, xq, yq = setup()
    with fastmeta.use_backend(backend), pytest.raises(ValueError, match=r"xs \(0, 5, 2\) has no tasks"):
        meta(xs[:0], ys[:0], xq[:0], yq[:0])


def test_cross_entropy_needs_integer_labels():
    _, meta, xs, ys, xq, yq = setup("cross_entropy")
    with pytest.raises(TypeError, match="ys: cross_entropy needs integer class labels"):
        meta(xs, ys.double(), xq, yq)


@pytest.mark.parametrize("model", ["mlp", "conv"])
@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("cpp", marks=requires_cpp)])
def test_cross_entropy_labels_outside_the_classes(backend, model):
    """Labels outside [0, C) raise on every backend and path, naming the argument (F.cross_entropy's
    torch path took -100 as its ignore_index and gave another loss than the fused op's error)."""
    if model == "mlp":
        _, meta, xs, ys, xq, yq = setup("cross_entropy")
    else:
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(16, 3)).double()
        meta = fastmeta.BatchedMAML(net, 0.1, 2, loss="cross_entropy")
        xs, xq = torch.randn(4, 5, 1, 5, 5, dtype=torch.float64), torch.randn(4, 6, 1, 5, 5, dtype=torch.float64)
        ys, yq = torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (4, 6))
    with fastmeta.use_backend(backend):
        want = meta(xs, ys, xq, yq)
        for bad_ys, bad_yq, name in [(ys + 3, yq, "ys"), (ys, yq - 3, "yq"),
                                     (ys.masked_fill(ys == 0, -100), yq, "ys")]:
            for call in (meta, meta.value_and_grad, meta.task_losses):
                with pytest.raises(ValueError, match=rf"{name} \(4, \d\) has labels outside \[0, 3\)"):
                    call(xs, bad_ys, xq, bad_yq)
        with pytest.raises(ValueError, match=r"ys \(4, 5\) has labels outside \[0, 3\)"):
            meta.adapt(xs, ys - 1)
        # labels [T, N, 1] are [T, N] on every path
        torch.testing.assert_close(meta(xs, ys[..., None], xq, yq[..., None]), want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"cross_entropy: labels \(2, 3\) has labels outside \[0, 4\)"):
        ops.cross_entropy(torch.randn(2, 3, 4), torch.full((2, 3), 4))


def test_device_and_dtype_mismatch():
    _, meta, xs, ys, xq, yq = setup()
    with pytest.raises(TypeError, match="xs has dtype torch.float32"):
        meta(xs.float(), ys, xq, yq)
    with pytest.raises(TypeError, match="yq has dtype torch.float32"):
        meta(xs, ys, xq, yq.float())
    with pytest.raises(ValueError, match="xq is on meta"):
        meta(xs, ys, xq.to("meta"), yq)


def test_constructor_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="inner_steps: must be >= 0, got -1"):
        fastmeta.BatchedMAML(model, 0.1, -1)
    with pytest.raises(TypeError, match="inner_steps"):
        fastmeta.BatchedMAML(model, 0.1, 1.5)
    with pytest.raises(TypeError, match="inner_lr: expected a number or a tensor, got str"):
        fastmeta.BatchedMAML(model, "0.1")
    with pytest.raises(ValueError, match="inner_lr: a tensor inner_lr must have one element"):
        fastmeta.BatchedMAML(model, torch.ones(3))
    with pytest.raises(ValueError, match="loss"):
        fastmeta.BatchedMAML(model, 0.1, loss="hinge")
    with pytest.raises(TypeError, match="model"):
        fastmeta.BatchedMAML(42, 0.1)


def test_non_finite_loss_with_check_finite():
    model = nn.Sequential(nn.Linear(2, 3)).double()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, check_finite=True)
    xs = torch.randn(3, 4, 2, dtype=torch.float64)
    xs[1, 0, 0] = float("inf")
    y = torch.randn(3, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"non-finite support loss at inner step 0 for task\(s\) \[1\]"):
        meta(xs, y, xs, y)


def test_strict_unsupported_module():
    model = nn.Sequential(nn.Linear(2, 3), nn.Softmax(dim=None), nn.Linear(3, 1))
    with pytest.raises(fastmeta.UnsupportedModule, match=r"module '1' \(Softmax\): Softmax\(dim=None\)"):
        fastmeta.BatchedMAML(model, 0.1, strict=True)
    assert isinstance(fastmeta.UnsupportedModule("x"), TypeError)
    fastmeta.BatchedMAML(model, 0.1)  # not strict: falls back


def test_op_argument_errors():
    with pytest.raises(ValueError, match=r"params has 2 tensors but grads has 1"):
        ops.inner_update([torch.ones(2), torch.ones(3)], [torch.ones(2)], 0.1)
    with pytest.raises(ValueError, match=r"params\[0\] \(2,\) and grads\[0\] \(3,\) do not broadcast"):
        ops.inner_update([torch.ones(2)], [torch.ones(3)], 0.1)
    with pytest.raises(TypeError, match="lr: expected a number or a tensor"):
        ops.inner_update([torch.ones(2)], [torch.ones(2)], "x")
    with pytest.raises(ValueError, match=r"lr\[0\] \(3,\) does not broadcast to grads\[0\] \(2,\)"):
        ops.inner_update([torch.ones(2)], [torch.ones(2)], [torch.ones(3)])
    with pytest.raises(TypeError, match=r"lr\[1\]: expected a floating-point tensor, got dtype torch.int64"):
        ops.inner_update([torch.ones(2)] * 2, [torch.ones(2)] * 2, [torch.ones(2), torch.ones(2, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"lr has 1 tensors but params has 2"):
        ops.inner_update([torch.ones(2)] * 2, [torch.ones(2)] * 2, [torch.ones(2)])
    with pytest.raises(ValueError, match=r"W \(3, 4\) does not match x \(2, 5, 3\)"):
        ops.batched_linear(torch.ones(2, 5, 3), torch.ones(3, 4))
    with pytest.raises(TypeError, match="labels must be integer"):
        ops.cross_entropy(torch.ones(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"weight \(2, 4, 2, 3, 3\) with groups=1 expects 2 input channels"):
        ops.batched_conv2d(torch.ones(2, 1, 3, 5, 5), torch.ones(2, 4, 2, 3, 3))


def test_predict_argument_errors():
    _, meta, xs, ys, xq, yq = setup()
    P = meta.adapt(xs, ys)
    with pytest.raises(ValueError, match=r"has T=4 but x \(2, 6, 2\) has T=2"):
        meta.predict(P, xq[:2])
    with pytest.raises(TypeError, match="params"):
        meta.predict([1], xq)


def test_settings_changed_after_a_call_take_effect():
    """A batch of an already checked signature skips the checks, but not a changed setting."""
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    meta = fastmeta.BatchedMAML(model, 0.1, 2)
    xs = torch.randn(3, 4, 2, dtype=torch.float64)
    y = torch.randn(3, 4, 3, dtype=torch.float64)
    meta(xs, y, xs, y)
    xs[1, 0, 0] = float("inf")
    meta.check_finite = True
    with pytest.raises(ValueError, match="non-finite support loss"):
        meta(xs, y, xs, y)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_settings_assigned_later_are_checked(backend):
    """meta.inner_steps = 10 (a longer adaptation at meta-test time) and the other settings are
    checked where they are assigned, as by the constructor; an inner_lr assigned later is checked
    by the next call. Before, a negative step count ran no step on the torch ops, and a NaN rate
    gave NaN on the fused kernel where the torch ops raised."""
    _, meta, xs, ys, xq, yq = setup()
    with fastmeta.use_backend(backend):
        meta(xs, ys, xq, yq)  # (a checked signature: the next calls skip the batch checks)
        bad = [("inner_steps", -1, ValueError, "inner_steps: must be >= 0, got -1"),
               ("inner_steps", 2.5, TypeError, "inner_steps: expected an int, got float"),
               ("inner_steps", True, TypeError, "inner_steps: expected an int, got bool"),
               ("first_order", None, TypeError, "first_order: expected True or False, got None"),
               ("loss", "hinge", ValueError, "loss: expected one of"),
               ("task_chunk", 0, ValueError, "task_chunk: expected None or an int >= 1, got 0"),
               ("recompute", "yes", TypeError, "recompute: expected True or False"),
               ("checkpoint_steps", 2, TypeError, "checkpoint_steps: expected True or False"),
               ("check_finite", [], TypeError, "check_finite: expected True or False")]
        for name, value, error, message in bad:
            before = getattr(meta, name)
            with pytest.raises(error, match=message):
                setattr(meta, name, value)
            assert getattr(meta, name) == before, name
        want = fastmeta.BatchedMAML(meta.model, 0.1, 4, first_order=True)(xs, ys, xq, yq)
        meta.inner_steps, meta.first_order = 4, 1
        assert (meta.inner_steps, meta.first_order) == (4, True)
        torch.testing.assert_close(meta(xs, ys, xq, yq), want, rtol=1e-12, atol=0)
        for lr, error, message in [(float("nan"), ValueError, "inner_lr: expected a finite number, got nan"),
                                   ("0.1", TypeError, "inner_lr: expected a number or a tensor, got str"),
                                   (torch.ones(2), ValueError, "inner_lr: a tensor inner_lr must have one")]:
            meta.inner_lr = lr
            for call in (meta, meta.value_and_grad, meta.task_losses):
                with pytest.raises(error, match=message):
                    call(xs, ys, xq, yq)
        meta.inner_lr = 0.1
        torch.testing.assert_close(meta(xs, ys, xq, yq), want, rtol=1e-12, atol=0)


def test_settings_of_a_module_pickled_before_they_were_checked():
    """A BatchedMAML pickled when its settings were plain attributes loads with them."""
    _, meta, xs, ys, xq, yq = setup()
    meta.inner_steps, meta.task_chunk = 3, 2
    state = meta.__getstate__()
    for name in ("inner_steps", "first_order", "loss", "task_chunk", "recompute", "checkpoint_steps",
                 "check_finite"):
        state[name] = state.pop("_" + name)
    old = fastmeta.BatchedMAML.__new__(fastmeta.BatchedMAML)
    old.__setstate__(state)
    assert (old.inner_steps, old.task_chunk, old.loss, old.first_order) == (3, 2, "mse", False)
    assert "inner_steps" not in old.__dict__
    torch.testing.assert_close(old(xs, ys, xq, yq), meta(xs, ys, xq, yq), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("call", ["forward", "value_and_grad"])
def test_query_features_must_match_the_support(backend, call):
    """xq with other features than xs is refused on every path, also on a second call of the
    same (bad) signature: a failed call leaves nothing for later calls to skip the checks with
    (the fused kernel would read xq with xs's row width)."""
    _, meta, xs, ys, xq, yq = setup()
    bad = torch.randn(4, 6, 3, dtype=torch.float64)
    fn = meta if call == "forward" else meta.value_and_grad
    with fastmeta.use_backend(backend):
        fn(xs, ys, xq, yq)
        for _ in range(2):
            with pytest.raises(ValueError, match=r"\(4, 6, 3\)"):
                fn(xs, ys, bad, yq)
        fn(xs, ys, xq, yq)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_inputs_of_another_width_than_the_first_layer(backend):
    """Inputs whose samples have another width than the model's first Linear layer takes (here 2):
    the error names the inputs, their shapes and the layer (before, the fused op's check said the
    layer's weight was wrong, and the batched ops named only their own W and x); a [T, K] input
    given for [T, K, 1] too, and predict's x."""
    model, meta, xs, ys, xq, yq = setup()
    with fastmeta.use_backend(backend):
        for bad_xs, bad_xq, named in ((torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64),
                                       r"xs \(4, 5, 3\) and xq \(4, 6, 3\): the model's first layer '0' \(weight "
                                       r"\(8, 2\)\) takes 2 features a sample, got 3"),
                                      (xs[..., 0], xq[..., 0], r"xs \(4, 5\) and xq \(4, 6\): .* takes 2 features a "
                                                              r"sample, got 5")):
            for fn in (meta, meta.value_and_grad):
                with pytest.raises(ValueError, match=named):
                    fn(bad_xs, ys, bad_xq, yq)
        params = meta.adapt(xs, ys)
        with pytest.raises(ValueError, match=r"x \(4, 6, 3\): the model's first layer '0' .* got 3"):
            meta.predict(params, torch.randn(4, 6, 3, dtype=torch.float64))
        assert meta.predict(params, xq).shape == (4, 6, 3)
    # what the layer takes is read once, and again where its weight is replaced; a module that has
    # checked a batch still pickles (the reading is not part of its state)
    import pickle
    pickle.loads(pickle.dumps(meta))
    model[0].weight = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))
    x3s, x3q = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    with fastmeta.use_backend(backend):
        assert meta.adapt(x3s, ys)["0.weight"].shape == (4, 8, 3)
        assert meta(x3s, ys, x3q, yq).shape == ()
        with pytest.raises(ValueError, match=r"xs \(4, 5, 2\) and xq \(4, 6, 2\): .* takes 3 features"):
            meta(xs, ys, xq, yq)
    model[0].weight = nn.Parameter(torch.randn(8, 2, dtype=torch.float64))
    # the fused op's own check (ops.mlp_inner_loop called directly) names the inputs too
    W = [p.detach() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"xs \(4, 5, 3\) and xq \(4, 6, 3\) have 3 features a sample, but the "
                                         r"first layer's W \(8, 2\) takes 2"):
        ops.mlp_inner_loop(torch.randn(4, 5, 3, dtype=torch.float64), ys, torch.randn(4, 6, 3, dtype=torch.float64), yq,
                           W, 0.1, 1, ["relu", None])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_images_of_other_channels_than_the_first_conv(backend):
    """A conv net's inputs with other channels than its first Conv2d takes (here 1), or without
    the channel dim: the error names the inputs and the layer."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 5)).double()
    meta = fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")
    ys, yq = torch.randint(0, 5, (3, 5)), torch.randint(0, 5, (3, 7))
    with fastmeta.use_backend(backend):
        meta(torch.randn(3, 5, 1, 6, 6, dtype=torch.float64), ys, torch.randn(3, 7, 1, 6, 6, dtype=torch.float64), yq)
        for shape in ((3, 6, 6), (6, 6)):
            xs, xq = (torch.randn(3, n, *shape, dtype=torch.float64) for n in (5, 7))
            with pytest.raises(ValueError, match=rf"xs \(3, 5, {', '.join(map(str, shape))}\) and xq .*: the model's "
                                                 r"first layer '0' \(weight \(4, 1, 3, 3\)\) takes \[T, N, 1, H, W\]"):
                meta(xs, ys, xq, yq)


def test_empty_support_or_query():
    _, meta, xs, ys, xq, yq = setup()
    with pytest.raises(ValueError, match=r"xs \(4, 0, 2\) has no support samples for inner_steps=2"):
        meta(xs[:, :0], ys[:, :0], xq, yq)
    with pytest.raises(ValueError, match=r"xq \(4, 0, 2\) has no query samples"):
        meta.value_and_grad(xs, ys, xq[:, :0], yq[:, :0])
    meta.inner_steps = 0  # no inner step: no support set needed
    meta(xs[:, :0], ys[:, :0], xq, yq)


def test_non_finite_learning_rates():
    with pytest.raises(ValueError, match="inner_lr: expected a finite number, got nan"):
        fastmeta.BatchedMAML(nn.Linear(2, 2), float("nan"))
    with pytest.raises(ValueError, match="lr: expected a finite number, got inf"):
        fastmeta.MAML(nn.Linear(2, 2), lr=float("inf"))
    with pytest.raises(ValueError, match=r"lr: the initial value of every rate.*got shape \(2,\)"):
        fastmeta.MetaSGD(nn.Linear(2, 2), lr=torch.tensor([0.1, 0.2]))
    fastmeta.MetaSGD(nn.Linear(2, 2), lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match="lr: expected a finite number, got inf"):
        ops.inner_update([torch.ones(2)], [torch.ones(2)], float("inf"))


@requires_cpp
def test_fused_mlp_op_checks_its_arguments():
    """fastmeta::mlp_inner_loop and ::mlp_meta_grad called directly (the C++ checks of every
    call, which BatchedMAML's repeated calls rely on): a mismatched tensor raises with its shape."""
    import fastmeta._C  # noqa: F401  (registers the ops)
    params = [torch.randn(8, 2), torch.randn(8), torch.randn(3, 8), torch.randn(3)]
    xs, ys, xq, yq = torch.randn(4, 5, 2), torch.randn(4, 5, 3), torch.randn(4, 6, 2), torch.randn(4, 6, 3)
    labels = torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (4, 6))

    def call(op, xs=xs, ys=ys, xq=xq, yq=yq, params=params, loss=0, steps=1):
        return op(xs, ys, xq, yq, params, [], 0.1, steps, [1, 0], 0.01, loss, False, False)

    for op in (torch.ops.fastmeta.mlp_inner_loop, torch.ops.fastmeta.mlp_meta_grad):
        call(op)
        call(op, ys=labels[0], yq=labels[1], loss=1)
        cases = [
            (dict(xq=torch.randn(4, 6, 3)), r"xq \[4, 6, 3\].*must be \[T=4, Q, 2\]"),
            (dict(xq=torch.randn(2, 6, 2)), r"xq \[2, 6, 2\].*must be \[T=4, Q, 2\]"),
            (dict(yq=torch.randn(4, 5, 3)), r"yq \[4, 5, 3\].*must be \[4, 6, 3\]"),
            (dict(ys=torch.randn(4, 5, 2)), r"ys \[4, 5, 2\].*must be \[4, 5, 3\]"),
            (dict(ys=labels[0].unsqueeze(-1), yq=labels[1], loss=1), r"ys \[4, 5, 1\].*int64 class labels"),
            (dict(ys=labels[0].int(), yq=labels[1], loss=1), r"ys \[4, 5\] \(Int.*int64 class labels"),
            (dict(xs=xs[0]), r"xs must be a floating \[T, K, d_0\] tensor, got \[5, 2\]"),
            (dict(xs=xs.double(), ys=ys.double()), r"params\[0\] is Float on cpu but xs is Double"),
            (dict(params=[params[0], params[1], torch.randn(3, 7), params[3]]), r"layer 1 has W \[3, 7\]"),
            (dict(xs=xs[:, :0], ys=ys[:, :0]), r"xs \[4, 0, 2\] has no support rows for 1 steps"),
            (dict(xq=xq[:, :0], yq=yq[:, :0]), r"xq \[4, 0, 2\] has no query rows"),
        ]
        for kw, pattern in cases:
            with pytest.raises(RuntimeError, match=pattern):
                call(op, **kw)
        call(op, xs=xs[:, :0], ys=ys[:, :0], steps=0)  # no steps: no support rows needed


@requires_cpp
def test_conv_and_update_ops_check_their_arguments():
    """fastmeta::batched_conv2d's gradient ops and fastmeta::inner_update_* called directly: sizes
    that do not fit each other raise with the shapes, not an error of the library underneath."""
    import fastmeta._C  # noqa: F401  (registers the ops)
    F = torch.ops.fastmeta
    x, w = torch.randn(2, 3, 4, 6, 6), torch.randn(2, 5, 4, 3, 3)
    geom = ([1, 1], [1, 1], [1, 1], 1)
    gy = F.batched_conv2d(x, w, None, *geom)
    F.batched_conv2d_backward(gy, x, w, *geom, [True, True, True])
    with pytest.raises(RuntimeError, match=r"weight \[2, 5, 3, 3, 3\] with groups=1 needs x \[T=2, N, C=3"):
        F.batched_conv2d(x, torch.randn(2, 5, 3, 3, 3), None, *geom)
    with pytest.raises(RuntimeError, match=r"\(input grad\): gy \[2, 3, 5, 7, 7\] must be \[2, 3, 5, 6, 6\]"):
        F.batched_conv2d_input_grad(torch.randn(2, 3, 5, 7, 7), w, list(x.shape), *geom)
    with pytest.raises(RuntimeError, match=r"\(weight grad\): gy \[2, 3, 5, 5, 5\] must be \[2, 3, 5, 6, 6\]"):
        F.batched_conv2d_weight_grad(x, gy[..., :5, :5], list(w.shape), *geom)
    with pytest.raises(RuntimeError, match=r"\(backward\): gy \[2, 3, 4, 6, 6\] must be \[2, 3, 5, 6, 6\]"):
        F.batched_conv2d_backward(gy[:, :, :4], x, w, *geom, [True, True, True])
    with pytest.raises(RuntimeError, match=r"give no output"):
        F.batched_conv2d(x[..., :1, :1], w, None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"params\[0\] \(Float, cpu\) and grads\[0\] \(Double, cpu\) differ"):
        F.inner_update_scalar([torch.ones(2)], [torch.ones(2, dtype=torch.float64)], 0.1)
    with pytest.raises(RuntimeError, match=r"lrs and grads differ in length \(2 vs 1\)"):
        F.inner_update_tensor([torch.ones(2)], [torch.ones(2)], [torch.ones(2), torch.ones(2)])
    with pytest.raises(RuntimeError, match=r"lrs\[0\] \(Long, cpu\) must be floating"):
        F.inner_update_tensor([torch.ones(2)], [torch.ones(2)], [torch.ones(2, dtype=torch.long)])
