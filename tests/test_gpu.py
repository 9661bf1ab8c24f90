"""GPU checks (marked gpu; they skip without CUDA and run on the lent GPU through
benchmarks/gpu_check.sh): every path on CUDA against the per-task loop, float32 with TF32 off."""
import pytest
import torch

import fastmeta
from fastmeta import harness as H, ops
from conftest import RTOL, assert_rel_close, loop_meta_grads, make_mlp_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("tasks", [25, 1000])
def test_sine_on_gpu(backend, first_order, tasks):
    from fastmeta.backend import why_unavailable
    if backend == "cuda" and why_unavailable("cuda", "cuda"):
        pytest.fail(f"the cuda backend did not build: {why_unavailable('cuda', 'cuda')}")
    w = H.make_workload("sine", tasks=tasks, device="cuda")
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order)
        got = torch.autograd.grad(meta(w.xs, w.ys, w.xq, w.yq), list(w.model.parameters()))
    n = min(tasks, 50)  # the oracle loop on a subset keeps the test short: compare on that subset
    with fastmeta.use_backend(backend):
        sub = torch.autograd.grad(meta(w.xs[:n], w.ys[:n], w.xq[:n], w.yq[:n]), list(w.model.parameters()))
    _, want, _ = loop_meta_grads(w.model, w.xs[:n], w.ys[:n], w.xq[:n], w.yq[:n], w.inner_lr, w.steps,
                                 "mse", first_order)
    assert_rel_close(list(sub), want, 1e-4, "meta-grad")
    assert all(torch.isfinite(g).all() for g in got)
    with fastmeta.use_backend(backend):  # value_and_grad: the same gradients as values
        _, vg = meta.value_and_grad(w.xs[:n], w.ys[:n], w.xq[:n], w.yq[:n])
    assert_rel_close(list(vg), list(sub), 1e-5, "value_and_grad vs autograd")


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton", "triton-tf32x3", "cuda-tf32x3", "auto-tf32x3"])
@pytest.mark.parametrize("first_order", [False, True])
def test_omniglot_on_gpu(first_order, backend, monkeypatch):
    """The conv path on the GPU against the per-task loop (backend cuda: the convolutions on
    fastmeta::batched_conv2d and its gradient ops; -tf32x3: the convolutions as three TF32 products
    of their operands' high and low parts, FASTMETA_CONV_PRECISION). cuDNN's float32 convolutions (TF32 off)
    round differently in the two, so both float32 meta-gradients are also measured against the loop
    in float64: fastmeta passes within 1e-4 of the float32 loop, or else no further from the float64
    result than 2x the float32 loop's own distance from it."""
    import copy
    if backend.endswith("-tf32x3"):
        monkeypatch.setenv("FASTMETA_CONV_PRECISION", "tf32x3")
        backend = backend.split("-")[0]
    w = H.make_workload("omniglot", tasks=4, device="cuda")
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order, loss="cross_entropy")
    with fastmeta.use_backend(backend):
        got = list(torch.autograd.grad(meta(w.xs, w.ys, w.xq, w.yq), list(w.model.parameters())))
    _, want, _ = loop_meta_grads(w.model, w.xs, w.ys, w.xq, w.yq, w.inner_lr, w.steps, "cross_entropy",
                                 first_order)
    m64 = copy.deepcopy(w.model).double()
    _, exact, _ = loop_meta_grads(m64, w.xs.double(), w.ys, w.xq.double(), w.yq, w.inner_lr, w.steps,
                                  "cross_entropy", first_order)
    err_fm, err_loop = H.max_rel_err(got, exact), H.max_rel_err(list(want), exact)
    try:
        assert_rel_close(got, list(want), 1e-4, "meta-grad vs the float32 loop")
    except AssertionError as e:
        assert err_fm <= 2 * err_loop, (f"{e}; vs float64: fastmeta {err_fm:.2e}, float32 loop {err_loop:.2e}")


@pytest.mark.parametrize("backend", ["auto", "cuda", "torch", "triton"])
@pytest.mark.parametrize("first_order", [False, True])
def test_omniglot_on_gpu_float64(first_order, backend):
    """The conv path on the GPU in float64 against the per-task loop in float64, to 1e-9: the
    algorithm's agreement without float32's rounding, which moves with the convolution algorithm
    and, where a max-pooling window's two largest entries are within that rounding of each other,
    sends the window's gradient to the other entry (benchmarks/RESULTS.md, "Omniglot first order,
    T=8"). Both meta-gradient forms: loss + autograd.grad and value_and_grad."""
    w = H.make_workload("omniglot", tasks=3, device="cuda", dtype=torch.float64)
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order, loss="cross_entropy")
    params = list(w.model.parameters())
    with fastmeta.use_backend(backend):
        got = list(torch.autograd.grad(meta(w.xs, w.ys, w.xq, w.yq), params))
        _, vg = meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)
    _, want, _ = loop_meta_grads(w.model, w.xs, w.ys, w.xq, w.yq, w.inner_lr, w.steps, "cross_entropy",
                                 first_order)
    assert_rel_close(got, list(want), 1e-9, "meta-grad vs the float64 loop")
    assert_rel_close(list(vg), list(want), 1e-9, "value_and_grad vs the float64 loop")


@pytest.mark.parametrize("acts", [[1, 1, 0], [3, 4, 2]])
def test_mlp_forward_on_gpu(acts):
    """ops.mlp_forward (the drop-in learners' MLP forward, ATen calls in C++) on CUDA against its
    reference: values, gradients, the closed-form second-order product and a third-order one
    (float64); and fastmeta.MAML's meta-gradient through it against the per-task loop."""
    g = torch.Generator(device="cuda").manual_seed(0)
    widths = [3, 17, 9, 2]
    x = torch.randn(6, 3, device="cuda", dtype=torch.float64, generator=g)
    params = []
    for i in range(3):
        params += [torch.randn(widths[i + 1], widths[i], device="cuda", dtype=torch.float64, generator=g)
                   .requires_grad_(), torch.randn(widths[i + 1], device="cuda", dtype=torch.float64, generator=g)
                   .requires_grad_()]
    out = {}
    for backend in ("cuda", "torch"):
        with fastmeta.use_backend(backend):
            y = ops.mlp_forward(x, params, acts, 0.2)
        g1 = torch.autograd.grad(y.pow(2).sum(), params, create_graph=True)
        g2 = torch.autograd.grad(sum((t * t).sum() for t in g1), params, create_graph=True)
        g3 = torch.autograd.grad(sum(t.sum() for t in g2), params)
        out[backend] = [y, *g1, *g2, *g3]
    assert "MLPForward" in torch.ops.fastmeta.mlp_forward(x, params, acts, 0.2).grad_fn.name()
    assert_rel_close(out["cuda"], out["torch"], 1e-11, "mlp_forward on cuda")
    model = torch.nn.Sequential(torch.nn.Linear(3, 17), torch.nn.Tanh(), torch.nn.Linear(17, 2)).cuda().double()
    xs, ys, xq, yq = (torch.randn(3, n, d, device="cuda", dtype=torch.float64, generator=g)
                      for n, d in ((6, 3), (6, 2), (5, 3), (5, 2)))
    maml = fastmeta.MAML(model, lr=0.1)
    total = 0.0
    for t in range(3):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(torch.nn.functional.mse_loss(learner(xs[t]), ys[t]))
        total = total + torch.nn.functional.mse_loss(learner(xq[t]), yq[t])
    got = torch.autograd.grad(total / 3, list(model.parameters()))
    _, want, _ = loop_meta_grads(model, xs, ys, xq, yq, 0.1, 2, "mse", False)
    assert_rel_close(list(got), want, 1e-10, "MAML meta-gradient on cuda")


@pytest.mark.parametrize("first_order", [False, True])
def test_dropin_conv_learner_on_gpu(first_order):
    """fastmeta.MAML on a conv net on CUDA: the learner's forward on BatchedMAML's program of one
    task (the cuda convolution and bn_relu_pool ops) against the per-task loop (float64), and the
    BatchNorm running statistics against the module's own calls."""
    from fastmeta import maml as M
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.BatchNorm2d(5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(5, 4)).cuda().double())
    g = torch.Generator(device="cuda").manual_seed(1)
    xs, xq = (torch.randn(2, n, 1, 7, 7, device="cuda", dtype=torch.float64, generator=g) for n in (6, 5))
    ys, yq = (torch.randint(0, 4, (2, n), device="cuda", generator=g) for n in (6, 5))
    out = []
    for net, backend in zip(nets, ("auto", "torch")):
        with fastmeta.use_backend(backend):
            maml = fastmeta.MAML(net, lr=0.1, first_order=first_order)
            total = 0.0
            for t in range(2):
                learner = maml.clone()
                assert (M._conv_program(learner._root, learner.module, xs[t]) is not None) == (backend == "auto")
                learner.adapt(torch.nn.functional.cross_entropy(learner(xs[t]), ys[t]))
                total = total + torch.nn.functional.cross_entropy(learner(xq[t]), yq[t])
            out.append(torch.autograd.grad(total / 2, list(net.parameters())))
    assert_rel_close(list(out[0]), list(out[1]), 1e-10, "conv learner's meta-gradient on cuda")
    for a, b in zip(nets[0].buffers(), nets[1].buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_inner_update_on_gpu():
    p = [torch.randn(3, 37, device="cuda"), torch.randn(5, device="cuda").expand(4, 5)]
    g = [torch.randn(3, 37, device="cuda"), torch.randn(4, 5, device="cuda")]
    for backend in ("auto", "torch", "cuda"):
        with fastmeta.use_backend(backend):
            out = ops.inner_update(p, g, 0.3)
        for o, w in zip(out, ops.inner_update_ref(p, g, 0.3)):
            torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)  # FMA contraction: not bit-exact


def _fused_vs_reference(backend, params, batch, lr, steps, acts, loss, first_order, rtol, slope=0.01,
                        step_weights=None):
    """The backend's mlp_inner_loop against the torch reference on the GPU: per-task losses, and
    the meta-gradient (and learned-lr gradient) of a weighted sum of them."""
    lr_list = lr if isinstance(lr, list) else []
    out = {}
    for b in ("torch", backend):
        with fastmeta.use_backend(b):
            losses = ops.mlp_inner_loop(*batch, params, lr, steps, acts, slope, loss, first_order,
                                        step_weights=step_weights)
        w = torch.linspace(0.5, 1.5, losses.shape[0], dtype=losses.dtype, device=losses.device)
        out[b] = (losses.detach(), list(torch.autograd.grad((losses * w).sum(), params + lr_list)))
    assert_rel_close([out[backend][0]], [out["torch"][0]], rtol, f"{backend} losses")
    assert_rel_close(out[backend][1], out["torch"][1], rtol, f"{backend} meta-grad")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("T", [1, 3, 25])
def test_mlp_kernels_odd_widths_on_gpu(backend, dtype, first_order, T):
    from fastmeta.backend import why_unavailable
    if why_unavailable(backend, "cuda"):
        pytest.fail(f"{backend} unavailable: {why_unavailable(backend, 'cuda')}")
    params, batch = make_mlp_batch((1, 40, 37, 1), T, 10, 10, "mse", dtype, "cuda")
    _fused_vs_reference(backend, params, batch, 0.01, 5, ["relu", "relu", None], "mse", first_order, RTOL[dtype])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_kernels_propagate_nan_on_gpu(backend, first_order):
    """A NaN in one task's support set: that task's loss is NaN (relu(NaN) is NaN; a max-based
    ReLU, fmaxf or tl.maximum, drops it), the others equal the run without that task; Triton's fused
    batched_linear ReLU keeps a NaN too."""
    from fastmeta.backend import why_unavailable
    if why_unavailable(backend, "cuda"):
        pytest.fail(f"{backend} unavailable: {why_unavailable(backend, 'cuda')}")
    params, batch = make_mlp_batch((3, 20, 13, 2), 3, 6, 5, "mse", torch.float32, "cuda")
    batch = list(batch)
    batch[0] = batch[0].clone()
    batch[0][1, 0, 1] = float("nan")
    acts = ["relu", "relu", None]
    with fastmeta.use_backend(backend), torch.no_grad():
        losses = ops.mlp_inner_loop(*batch, params, 0.1, 2, acts, 0.0, "mse", first_order)
        rest = ops.mlp_inner_loop(*[t[[0, 2]] for t in batch], params, 0.1, 2, acts, 0.0, "mse", first_order)
    assert torch.isnan(losses[1]), f"task 1's loss {float(losses[1])} is not NaN"
    torch.testing.assert_close(losses[[0, 2]], rest)
    if backend == "triton":
        x = torch.randn(2, 4, 3, device="cuda")
        x[1, 2, 0] = float("nan")
        W, b = torch.randn(2, 5, 3, device="cuda"), torch.randn(2, 5, device="cuda")
        with fastmeta.use_backend("triton"):
            y = ops.batched_linear(x, W, b, "relu")
        assert torch.isnan(y[1, 2]).all() and not torch.isnan(y[0]).any() and not torch.isnan(y[1, [0, 1, 3]]).any()


@pytest.mark.parametrize("steps,lr_kind", [(0, "scalar"), (1, "scalar"), (1, "learned"), (2, "scalar"),
                                           (2, "learned")])
@pytest.mark.parametrize("first_order", [False, True])
def test_cuda_kernel_workspace_slots(steps, first_order, lr_kind):
    """The CUDA kernel's workspace slots at their edges: 0, 1 and 2 inner steps (first order keeps
    two parameter sets and one step's activations), per-step gradients kept only for learned rates
    (with 0 steps the rates do not enter the loss, so the reference has no gradient for them)."""
    params, batch = make_mlp_batch((2, 19, 3), 5, 6, 4, "mse", torch.float64, "cuda")
    lr = 0.05 if lr_kind == "scalar" else [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_()
                                           for p in params]
    _fused_vs_reference("cuda", params, batch, lr, steps, ["tanh", None], "mse", first_order, RTOL[torch.float64])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_kernels_cross_entropy_and_meta_sgd_on_gpu(backend, first_order):
    params, batch = make_mlp_batch((3, 37, 11, 5), 3, 7, 9, "cross_entropy", torch.float64, "cuda")
    _fused_vs_reference(backend, params, batch, 0.1, 3, ["sigmoid", "leaky_relu", "tanh"], "cross_entropy",
                        first_order, RTOL[torch.float64], slope=0.2)
    for dtype in (torch.float64, torch.float32):
        params, batch = make_mlp_batch((2, 37, 3), 3, 6, 5, "mse", dtype, "cuda")
        lrs = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_() for p in params]
        _fused_vs_reference(backend, params, batch, lrs, 4, ["tanh", None], "mse", first_order, RTOL[dtype])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_kernels_gelu_and_silu_on_gpu(backend, first_order):
    """GELU (both forms) and SiLU on the GPU kernels, with Meta-SGD rates, float64 and float32 (T=40:
    more tasks than one block count), against the reference."""
    for dtype, T in ((torch.float64, 3), (torch.float32, 40)):
        params, batch = make_mlp_batch((3, 37, 11, 5), T, 7, 9, "cross_entropy", dtype, "cuda")
        lrs = [torch.empty_like(p).uniform_(0.05, 0.2).requires_grad_() for p in params]
        for acts in (["gelu", "silu", None], ["gelu_tanh", "gelu", "silu"]):
            _fused_vs_reference(backend, params, batch, lrs, 3, acts, "cross_entropy", first_order, RTOL[dtype])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("rates", ["scalar", "per_entry", "per_step"])
def test_mlp_kernels_per_step_rates_and_step_losses(rates, first_order, backend):
    """MAML++'s settings on the GPU kernels: the multi-step loss (a weight of 0 included) with a
    scalar rate, per-entry and per-step rates, MSE and cross-entropy, several tasks a block count."""
    for dtype, T in ((torch.float64, 3), (torch.float32, 40)):
        params, batch = make_mlp_batch((1, 40, 37, 1), T, 10, 10, "mse", dtype, "cuda")
        lead = (4,) if rates == "per_step" else ()
        lr = (0.01 if rates == "scalar" else
              [torch.empty(*lead, *p.shape, dtype=dtype, device="cuda").uniform_(0.005, 0.02).requires_grad_()
               for p in params])
        for weights in ([0.1, 0.2, 0.0, 0.7], [0.5, 0.5, 0.0, 0.0], None if rates == "per_step" else [0.25] * 4):
            _fused_vs_reference(backend, params, batch, lr, 4, ["relu", "tanh", None], "mse", first_order,
                                RTOL[dtype], step_weights=weights)
    params, batch = make_mlp_batch((3, 37, 11, 5), 3, 7, 9, "cross_entropy", torch.float64, "cuda")
    lr = [torch.empty(3, *p.shape, dtype=torch.float64, device="cuda").uniform_(0.05, 0.2).requires_grad_()
          for p in params] if rates == "per_step" else 0.1
    _fused_vs_reference(backend, params, batch, lr, 3, ["sigmoid", "leaky_relu", "tanh"], "cross_entropy",
                        first_order, RTOL[torch.float64], slope=0.2, step_weights=[0.3, 0.3, 0.4])


@pytest.mark.parametrize("rates", ["scalar", "per_step"])
def test_cuda_adapt_and_reptile(rates):
    """fastmeta::mlp_adapt on CUDA (the kernel's inner loop alone) against the reference, no steps
    and five; BatchedMAML.reptile_grad on it against the batched ops."""
    for dtype, T in ((torch.float64, 3), (torch.float32, 40)):
        params, batch = make_mlp_batch((1, 40, 37, 1), T, 10, 10, "mse", dtype, "cuda")
        for S in (0, 5):
            lr = (0.01 if rates == "scalar" else
                  [torch.empty(S, *p.shape, dtype=dtype, device="cuda").uniform_(0.005, 0.02) for p in params])
            with fastmeta.use_backend("cuda"):
                got, got_loss = ops.mlp_adapt(batch[0], batch[1], params, lr, S, ["relu", "tanh", None])
            want, want_loss = ops.mlp_adapt_ref(batch[0], batch[1], params, lr, S, ["relu", "tanh", None])
            assert_rel_close(got, want, RTOL[dtype], "theta_S")
            assert_rel_close([got_loss], [want_loss], RTOL[dtype], "loss at theta_0")
    model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1)).cuda()
    xs, ys = torch.randn(25, 10, 1, device="cuda"), torch.randn(25, 10, 1, device="cuda")
    meta = fastmeta.BatchedMAML(model, 0.01, 5, learn_inner_lr="per_layer_step" if rates == "per_step" else False)
    value, grads = meta.reptile_grad(xs, ys)
    with fastmeta.use_backend({"mlp_inner_loop": "torch"}):
        want_value, want = meta.reptile_grad(xs, ys)
    assert_rel_close([value], [want_value], RTOL[torch.float32], "Reptile loss")
    assert_rel_close(grads, want, 1e-3, "Reptile update (a difference of float32 parameters)")


@pytest.mark.parametrize("kind", [True, "per_layer", "per_layer_step"], ids=str)
@pytest.mark.parametrize("weights", [None, [0.3, 0.3, 0.4]], ids=["last", "weighted"])
def test_learned_rates_direct_calls_on_gpu(kind, weights):
    """BatchedMAML with learned rates on CUDA (float64): the checked calls (Meta-SGD's rates to the
    op as they are; layer rates expanded and summed back in fastmeta._C around the cuda op) give
    the per-task loop's loss and meta-gradients, from value_and_grad and from forward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 37), torch.nn.Tanh(), torch.nn.Linear(37, 3)).cuda().double()
    g = torch.Generator(device="cuda").manual_seed(1)
    batch = [torch.randn(5, n, d, device="cuda", dtype=torch.float64, generator=g) for n, d in
             ((6, 2), (6, 3), (7, 2), (7, 3))]
    meta = fastmeta.BatchedMAML(model, 0.1, 3, learn_inner_lr=kind, step_loss_weights=weights)
    with torch.no_grad():
        for r in meta.lrs.values():
            r.uniform_(0.02, 0.2, generator=g)
    names = meta._adapt_names
    lrs = {n: meta.lrs[meta._lr_key(n)] for n in names}
    want_loss, want, want_lr = loop_meta_grads(model, *batch, 0.1, 3, lrs=lrs, per_step=kind == "per_layer_step",
                                               step_weights=weights)
    want = list(want) + list(want_lr)
    params = list(meta.parameters())
    with fastmeta.use_backend("cuda"):
        for _ in range(2):  # the second: a checked signature, the direct calls
            value, grads = meta.value_and_grad(*batch)
            assert_rel_close([value], [want_loss], 1e-10, f"value_and_grad loss {kind}")
            assert_rel_close(grads, want, 1e-10, f"value_and_grad {kind}")
            loss = meta(*batch)
            assert_rel_close(list(torch.autograd.grad(2.0 * loss, params)), [2.0 * w for w in want], 1e-10,
                             f"forward's gradients {kind}")
        assert (meta._direct_layer is not None) == (kind != True)  # noqa: E712


@pytest.mark.parametrize("lr_kind", ["scalar", "learned"])
def test_meta_loss_op_on_gpu(lr_kind):
    """fastmeta::mlp_meta_loss on CUDA (per-task rows of the cuda kernel summed in C++) against the
    mean of the reference's task losses, with a non-unit incoming gradient."""
    params, batch = make_mlp_batch((1, 40, 37, 1), 37, 10, 10, "mse", torch.float64, "cuda")
    lr = [torch.full_like(p, 0.02).requires_grad_() for p in params] if lr_kind == "learned" else 0.02
    extra = lr if isinstance(lr, list) else []
    got, want = {}, {}
    for b, out in (("cuda", got), ("torch", want)):
        with fastmeta.use_backend(b):
            loss = ops.mlp_meta_loss(*batch, params, lr, 3, ["tanh", "relu", None])
        out["loss"] = loss.detach()
        out["grads"] = list(torch.autograd.grad(2.5 * loss, params + extra))
    assert got["loss"].dim() == 0
    assert_rel_close([got["loss"]], [want["loss"]], 1e-10, "meta-loss")
    assert_rel_close(got["grads"], want["grads"], 1e-10, "meta-grad")
    with fastmeta.use_backend("cuda"):  # fastmeta::mlp_meta_grad: the same values, no graph
        loss, g, glr = ops.mlp_meta_grad(*batch, params, lr, 3, ["tanh", "relu", None])
    assert not loss.requires_grad and loss.is_cuda
    assert_rel_close([loss], [want["loss"]], 1e-10, "mlp_meta_grad loss")
    assert_rel_close([2.5 * t for t in list(g) + list(glr or [])], want["grads"], 1e-10, "mlp_meta_grad")


def test_inner_update_meta_sgd_gradgrad_on_gpu():
    """The cuda inner_update with per-parameter rates: values, and gradcheck / gradgradcheck of its
    differentiable backward (float64)."""
    p = [torch.randn(3, 37, device="cuda", dtype=torch.float64, requires_grad=True),
         torch.randn(5, device="cuda", dtype=torch.float64, requires_grad=True)]
    g = [torch.randn(3, 37, device="cuda", dtype=torch.float64, requires_grad=True),
         torch.randn(2, 5, device="cuda", dtype=torch.float64, requires_grad=True)]
    lrs = [torch.rand(3, 37, device="cuda", dtype=torch.float64, requires_grad=True),
           torch.rand(5, device="cuda", dtype=torch.float64, requires_grad=True)]

    def f(*args):
        with fastmeta.use_backend("cuda"):
            return tuple(ops.inner_update(list(args[0:2]), list(args[2:4]), list(args[4:6])))
    for o, w in zip(f(*p, *g, *lrs), ops.inner_update_ref(p, g, lrs)):
        torch.testing.assert_close(o, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f, (*p, *g, *lrs))
    assert torch.autograd.gradgradcheck(f, (*p, *g, *lrs))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("setting", ["s0", "s1", "s2", "t32", "t32-s0", "t256", "o8", "o8-t64", "o8-s0", "o8-t32-s0"])
def test_cuda_kernel_placements_and_block_sizes(setting, first_order, monkeypatch):
    """The CUDA kernel with each placement of a task's slots forced (FASTMETA_CUDA_MLP_SMEM=0/1/2:
    global memory, working set in shared memory, all in shared memory, each where it fits), other
    block sizes (FASTMETA_CUDA_MLP_THREADS; 32: one warp a task) and the occupancy build
    (FASTMETA_CUDA_MLP_OCC=8): same results as the reference."""
    keys = {"s": "FASTMETA_CUDA_MLP_SMEM", "t": "FASTMETA_CUDA_MLP_THREADS", "o": "FASTMETA_CUDA_MLP_OCC"}
    for part in setting.split("-"):
        monkeypatch.setenv(keys[part[0]], part[1:])
    for dtype in (torch.float32, torch.float64):
        params, batch = make_mlp_batch((1, 40, 37, 1), 25, 10, 10, "mse", dtype, "cuda")
        _fused_vs_reference("cuda", params, batch, 0.01, 5, ["relu", "relu", None], "mse", first_order, RTOL[dtype])
    params, batch = make_mlp_batch((3, 37, 11, 5), 3, 7, 9, "cross_entropy", torch.float64, "cuda")
    lrs = [torch.empty_like(p).uniform_(0.01, 0.1).requires_grad_() for p in params]
    _fused_vs_reference("cuda", params, batch, lrs, 3, ["sigmoid", "leaky_relu", "tanh"], "cross_entropy",
                        first_order, RTOL[torch.float64], slope=0.2)


@pytest.mark.parametrize("env", [{"FASTMETA_CUDA_MLP_SMEM": "3"}, {"FASTMETA_CUDA_MLP_THREADS": "100"},
                                 {"FASTMETA_CUDA_MLP_OCC": "4"},
                                 {"FASTMETA_CUDA_MLP_THREADS": "256", "FASTMETA_CUDA_MLP_OCC": "8"},
                                 {"FASTMETA_CUDA_MLP_AUTOTUNE": "2"}],
                         ids=["smem3", "threads100", "occ4", "occ8-threads256", "autotune2"])
def test_cuda_kernel_settings_are_checked(env, monkeypatch):
    params, batch = make_mlp_batch((1, 8, 1), 2, 3, 3, "mse", torch.float32, "cuda")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match=list(env)[-1]):
        with fastmeta.use_backend("cuda"):
            ops.mlp_inner_loop(*batch, params, 0.1, 1, ["relu", None], 0.01, "mse", False)


@pytest.mark.parametrize("first_order", [False, True])
def test_cuda_kernel_autotune(first_order, monkeypatch, capfd):
    """More tasks than SMs: the first launch of a shape times the candidate configurations and keeps
    the fastest (FASTMETA_CUDA_MLP_AUTOTUNE_LOG=1 prints that timing, once a shape); its results
    equal those of the default configuration (FASTMETA_CUDA_MLP_AUTOTUNE=0) and of the reference,
    also replayed in a CUDA graph captured after it."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    T = 4 * sms + 3
    params, batch = make_mlp_batch((1, 40, 40, 1), T, 10, 10, "mse", torch.float32, "cuda")
    monkeypatch.setenv("FASTMETA_CUDA_MLP_AUTOTUNE", "0")
    with fastmeta.use_backend("cuda"):
        plain = ops.mlp_inner_loop(*batch, params, 0.01, 5, ["relu", "relu", None], 0.01, "mse", first_order)
    monkeypatch.setenv("FASTMETA_CUDA_MLP_AUTOTUNE", "1")
    monkeypatch.setenv("FASTMETA_CUDA_MLP_AUTOTUNE_LOG", "1")
    capfd.readouterr()
    outs = []
    with fastmeta.use_backend("cuda"):
        for _ in range(2):
            outs.append(ops.mlp_inner_loop(*batch, params, 0.01, 5, ["relu", "relu", None], 0.01, "mse", first_order))
    torch.cuda.synchronize()
    err = capfd.readouterr().err
    assert err.count("autotune") == 1, err
    for out in outs:
        assert_rel_close([out.detach()], [plain.detach()], 1e-5, "tuned vs default losses")
    _fused_vs_reference("cuda", params, batch, 0.01, 5, ["relu", "relu", None], "mse", first_order,
                        RTOL[torch.float32])
    w = H.make_workload("sine", tasks=T, device="cuda")
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order)
    step = fastmeta.graphed(meta, w.xs, w.ys, w.xq, w.yq)
    _check_replay(step, meta, w, 0, 1e-5, 1e-4)


def test_cuda_error_messages_keep_their_numbers():
    """A C++ error whose message formats numbers, raised on CUDA tensors: raised whole (a build that
    links its own libstdc++ crashed the process here; setup.py, tests/test_portable_build.py)."""
    import fastmeta._C  # noqa: F401  (registers the op)
    x = torch.randn(2, 3, 4, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"must be \[T=2, C=4\] of x's dtype, got \[2, 5\]"):
        torch.ops.fastmeta.bn_relu_pool(x, torch.randn(2, 5, device="cuda"), torch.randn(2, 5, device="cuda"), 1e-5)


@pytest.mark.parametrize("value", ["0", "-2", "three"])
def test_cuda_bn_relu_pool_slices_setting_is_checked(value, monkeypatch):
    monkeypatch.setenv("FASTMETA_CUDA_BRP_SLICES", value)
    x = torch.randn(2, 3, 4, 4, 4, device="cuda")
    w = torch.ones(2, 4, device="cuda")
    with pytest.raises(RuntimeError, match="FASTMETA_CUDA_BRP_SLICES must be a whole number >= 1"):
        with fastmeta.use_backend("cuda"):
            ops.bn_relu_pool(x, w, torch.zeros_like(w))


def _check_replay(step, meta, w, i, rtol_loss, rtol_grad):
    """Replay i of a graphed step on the workload's batch shifted by 0.1 i, against value_and_grad
    on the same batch; returns the replay's gradients."""
    batch = [t + 0.1 * i if t.is_floating_point() else t for t in (w.xs, w.ys, w.xq, w.yq)]
    loss, grads = step(*batch)
    want_loss, want = meta.value_and_grad(*batch)
    assert_rel_close([loss.clone()], [want_loss], rtol_loss, f"loss, replay {i}")
    assert_rel_close([g.clone() for g in grads], list(want), rtol_grad, f"meta-grad, replay {i}")
    return grads


def test_graphed_step_matches_value_and_grad():
    """fastmeta.graphed on the fused sine MLP: each replay equals value_and_grad on the same batch
    and parameters, after in-place optimizer steps and for new batch values; a batch of another
    shape, a replaced parameter and a changed inner_lr raise."""
    from torch import nn
    w = H.make_workload("sine", tasks=25, device="cuda")
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps)
    step = fastmeta.graphed(meta, w.xs, w.ys, w.xq, w.yq)
    opt = torch.optim.SGD(meta.parameters(), lr=1e-2)
    for i in range(3):
        grads = _check_replay(step, meta, w, i, 1e-6, 1e-6)
        for p, g in zip(meta.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    with pytest.raises(ValueError, match="xs"):
        step(w.xs[:5], w.ys[:5], w.xq[:5], w.yq[:5])
    meta.inner_lr = 0.02
    with pytest.raises(RuntimeError, match="inner_lr"):
        step(w.xs, w.ys, w.xq, w.yq)
    meta.inner_lr = w.inner_lr
    w.model[0].requires_grad_(False)  # the captured step adapts every parameter
    with pytest.raises(RuntimeError, match="require grad"):
        step(w.xs, w.ys, w.xq, w.yq)
    w.model[0].requires_grad_(True)
    w.model[0].weight = nn.Parameter(w.model[0].weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced"):
        step(w.xs, w.ys, w.xq, w.yq)
    last = len(w.model) - 1
    w.model[last] = nn.Linear(w.model[last].in_features, 1).cuda()  # a new head: another structure
    with pytest.raises(RuntimeError, match="structure changed"):
        step(w.xs, w.ys, w.xq, w.yq)


@pytest.mark.parametrize("kind, weights", [(True, None), ("per_layer", None), ("per_layer_step", None),
                                           ("per_layer_step", [0.2, 0.2, 0.2, 0.2, 0.2])],
                         ids=["meta_sgd", "per_layer", "per_layer_step", "lslr_msl"])
def test_graphed_step_with_learned_rates(kind, weights):
    """fastmeta.graphed with learned rates on the fused sine MLP (value_and_grad's direct calls
    captured: Meta-SGD's rates as they are, layer rates expanded and summed in fastmeta._C): each
    replay equals value_and_grad after in-place optimizer steps on the parameters and the rates."""
    w = H.make_workload("sine", tasks=25, device="cuda")
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, learn_inner_lr=kind, step_loss_weights=weights)
    step = fastmeta.graphed(meta, w.xs, w.ys, w.xq, w.yq)
    opt = torch.optim.SGD(meta.parameters(), lr=1e-2)
    for i in range(3):
        grads = _check_replay(step, meta, w, i, 1e-6, 1e-5)
        assert len(grads) == 2 * len(list(w.model.parameters()))
        for p, g in zip(meta.parameters(), grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_graphed_conv_step_matches_value_and_grad(backend):
    """fastmeta.graphed on the conv path (Omniglot shape, T=2, second order): the replay equals
    value_and_grad; with the triton backend the graph holds the Triton conv and bn_relu_pool kernels."""
    w = H.make_workload("omniglot", tasks=2, device="cuda")
    with fastmeta.use_backend(backend):
        meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy")
        step = fastmeta.graphed(meta, w.xs, w.ys, w.xq, w.yq)
        loss, grads = step(w.xs, w.ys, w.xq, w.yq)
        want_loss, want = meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)
    assert_rel_close([loss.clone()], [want_loss], 1e-5, "loss")
    assert_rel_close([g.clone() for g in grads], list(want), 1e-4, "meta-grad")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_recompute_on_gpu(backend):
    """BatchedMAML(recompute=True) on the GPU (Omniglot shape, T=4, second order, float64 so that
    rounding does not hide a wrong term): the meta-gradient equals the float64 loop's, graphed too,
    at a lower peak than without it."""
    from conftest import loop_meta_grads
    w = H.make_workload("omniglot", tasks=4, device="cuda", dtype=torch.float64)
    peaks = {}
    for rc in (False, True):
        meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy", recompute=rc)
        with fastmeta.use_backend(backend):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _, got = meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)
            torch.cuda.synchronize()
            peaks[rc] = torch.cuda.max_memory_allocated() - base
            if rc:
                replay = fastmeta.graphed(meta, w.xs, w.ys, w.xq, w.yq)(w.xs, w.ys, w.xq, w.yq)[1]
    _, want, _ = loop_meta_grads(w.model, w.xs, w.ys, w.xq, w.yq, w.inner_lr, w.steps, "cross_entropy", False)
    assert_rel_close(list(got), list(want), 1e-10, "meta-gradient, recompute")
    assert_rel_close([g.clone() for g in replay], list(want), 1e-10, "graphed meta-gradient, recompute")
    assert peaks[True] < peaks[False], peaks


def test_graphed_step_in_task_chunks():
    """fastmeta.graphed with task_chunk=2 over T=5 (two graphs: chunks of 2 and the last of 1),
    replayed twice on new batch values: equals value_and_grad, at less peak memory than the
    graph of all 5 tasks at once. Float64: in float32 the two differ by the rounding of cuDNN's
    algorithms (1.05e-4 on the first convolution's weight on an H200), which says nothing about
    the replay."""
    w = H.make_workload("omniglot", tasks=5, device="cuda", dtype=torch.float64)
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy", task_chunk=2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = fastmeta.graphed(meta, w.xs, w.ys, w.xq, w.yq)
    chunked_peak = torch.cuda.max_memory_allocated() - base
    for i in range(2):
        _check_replay(step, meta, w, i, 1e-12, 1e-10)
    del step
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    whole = fastmeta.graphed(fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy"),
                             w.xs, w.ys, w.xq, w.yq)
    assert chunked_peak < torch.cuda.max_memory_allocated() - base
    del whole


def test_graphed_step_checks_cross_entropy_labels():
    from torch import nn
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4)).cuda()
    d = dict(device="cuda")
    xs, xq = torch.randn(5, 6, 3, **d), torch.randn(5, 7, 3, **d)
    ys, yq = torch.randint(0, 4, (5, 6), **d), torch.randint(0, 4, (5, 7), **d)
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy")
    step = fastmeta.graphed(meta, xs, ys, xq, yq)
    loss, grads = step(xs, ys, xq, yq)
    want_loss, want = meta.value_and_grad(xs, ys, xq, yq)
    assert_rel_close([g.clone() for g in grads], list(want), 1e-5, "meta-grad")
    with pytest.raises(ValueError, match=r"ys \(5, 6\) has labels outside \[0, 4\)"):
        step(xs, ys + 4, xq, yq)
    with pytest.raises(ValueError, match=r"yq \(5, 7\) has labels outside"):
        step(xs, ys, xq, yq - 4)
    # a conv net (not the fused MLP op): the number of classes comes from the first warmup call
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3)).cuda()
    cx, cq = torch.randn(5, 6, 1, 5, 5, **d), torch.randn(5, 7, 1, 5, 5, **d)
    cy, cyq = torch.randint(0, 3, (5, 6), **d), torch.randint(0, 3, (5, 7), **d)
    step = fastmeta.graphed(fastmeta.BatchedMAML(conv, 0.1, 1, loss="cross_entropy"), cx, cy, cq, cyq)
    step(cx, cy, cq, cyq)
    with pytest.raises(ValueError, match=r"yq \(5, 7\) has labels outside \[0, 3\)"):
        step(cx, cy, cq, cyq + 3)
    with pytest.raises(ValueError, match=r"ys \(5, 6\) has labels outside \[0, 3\)"):
        fastmeta.graphed(fastmeta.BatchedMAML(conv, 0.1, 1, loss="cross_entropy"), cx, cy - 100, cq, cyq)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=1), dict(groups=2, dilation=2, padding=2)])
def test_cuda_conv_ops_to_second_order(kw):
    """fastmeta::batched_conv2d and its gradient ops on CUDA (cuDNN underneath) against the grouped
    reference in float64: values, first and second derivatives."""
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(3, 2, 4, 9, 7, generator=g, **d).cuda().requires_grad_()
    w = torch.randn(3, 6, 4 // kw.get("groups", 1), 3, 3, generator=g, **d).cuda().requires_grad_()
    b = torch.randn(3, 6, generator=g, **d).cuda().requires_grad_()
    with fastmeta.use_backend("cuda"):
        y = ops.batched_conv2d(x, w, b, **kw)
    ref = ops.batched_conv2d_ref(x, w, b, **kw)
    torch.testing.assert_close(y, ref)
    r = torch.randn(y.shape, generator=g, **d).cuda()
    g1 = torch.autograd.grad((torch.tanh(y) * r).sum(), [x, w, b], create_graph=True)
    g2 = torch.autograd.grad((torch.tanh(ref) * r).sum(), [x, w, b], create_graph=True)
    assert_rel_close([t.detach() for t in g1], [t.detach() for t in g2], 1e-10, "first derivatives")
    h1 = torch.autograd.grad(sum((t * t.detach().flip(-1)).sum() for t in g1), [x, w])
    h2 = torch.autograd.grad(sum((t * t.detach().flip(-1)).sum() for t in g2), [x, w])
    assert_rel_close(list(h1), list(h2), 1e-10, "second derivatives")


def test_cuda_conv_autotune(monkeypatch, capfd):
    """On CUDA the convolution ops' autotune is on by default: the first call of a shape times the
    grouped call against a call a task and records the faster, and the values are the reference's;
    a new shape met inside a CUDA graph capture is timed not at all (the grouped call is captured,
    nothing recorded) and the replay gives the reference's values."""
    for name in ("FASTMETA_CONV_PER_TASK", "FASTMETA_CONV_AUTOTUNE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FASTMETA_CONV_AUTOTUNE_LOG", "1")
    fastmeta._C._conv_autotune_clear()
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(3, 4, 5, 9, 7, generator=g, **d).cuda()
    w = torch.randn(3, 6, 5, 3, 3, generator=g, **d).cuda()
    b = torch.randn(3, 6, generator=g, **d).cuda()
    with fastmeta.use_backend("cuda"), torch.no_grad():
        y = ops.batched_conv2d(x, w, b, padding=1)
    torch.testing.assert_close(y, ops.batched_conv2d_ref(x, w, b, padding=1))
    choices = fastmeta._C._conv_autotune_choices()
    assert len(choices) == 1 and choices[0].startswith("forward x [3, 4, 5, 9, 7]"), choices
    assert "batched_conv2d autotune (cuda" in capfd.readouterr().err
    x2 = torch.randn(3, 4, 5, 8, 8, generator=g, **d).cuda()
    with fastmeta.use_backend("cuda"), torch.no_grad():
        monkeypatch.setenv("FASTMETA_CONV_PER_TASK", "0")  # cuDNN warmed for the new shape, nothing timed
        ops.batched_conv2d(x2, w, b, padding=1)
        torch.cuda.synchronize()
        monkeypatch.delenv("FASTMETA_CONV_PER_TASK")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y2 = ops.batched_conv2d(x2, w, b, padding=1)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y2, ops.batched_conv2d_ref(x2, w, b, padding=1))
    assert fastmeta._C._conv_autotune_choices() == choices
    assert "batched_conv2d autotune" not in capfd.readouterr().err


@pytest.mark.parametrize("per_task", ["0", "1"])
def test_cuda_conv_tf32x3(per_task, monkeypatch):
    """FASTMETA_CONV_PRECISION=tf32x3 on CUDA (cuDNN's TF32 convolutions on the stacked high and
    low parts): every op within 1e-5 of the float64 answer (float32's own rounding over sums of up to
    1568 terms is ~1e-6), where one TF32 product (the float32 ops with TF32 allowed) is ~1e-4 off;
    cuDNN's TF32 flag is as it was after each call."""
    monkeypatch.setenv("FASTMETA_CONV_PER_TASK", per_task)
    fm = torch.ops.fastmeta
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 16, 14, 14, generator=g).cuda()
    w = torch.randn(3, 32, 16, 3, 3, generator=g).cuda()
    b = torch.randn(3, 32, generator=g).cuda()
    geom = ([1, 1], [1, 1], [1, 1], 1)

    def run(x, w, b):
        y = fm.batched_conv2d(x, w, b, *geom)
        gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device="cuda").view_as(y).sin()
        return [y, fm.batched_conv2d_input_grad(gy, w, list(x.shape), *geom),
                fm.batched_conv2d_weight_grad(x, gy, list(w.shape), *geom),
                *fm.batched_conv2d_backward(gy, x, w, *geom, [True, True, True])]

    exact = run(x.double(), w.double(), b.double())
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "tf32x3")
    assert not torch.backends.cudnn.allow_tf32
    got = run(x, w, b)
    assert not torch.backends.cudnn.allow_tf32
    for name, a, e in zip(["forward", "input grad", "weight grad", "gx", "gw", "gb"], got, exact):
        assert_rel_close([a.double()], [e], 1e-5, f"tf32x3 {name}")
    monkeypatch.setenv("FASTMETA_CONV_PRECISION", "ieee")
    torch.backends.cudnn.allow_tf32 = True
    try:
        one = run(x, w, b)
    finally:
        torch.backends.cudnn.allow_tf32 = False
    errs = [H.max_rel_err([a], [e]) for a, e in zip(one[:3], exact[:3])]
    assert max(errs) > 5e-5, f"TF32 alone was as exact as tf32x3 ({errs}): were TF32 kernels run?"


def test_cuda_conv_autotune_memory(monkeypatch):
    """Tuning a shape holds one form's result at a time: the first (timed) call's peak is within
    the larger of the two forms' own peaks (plus 5% of the output)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 16, 40, 40, generator=g).cuda()
    w = torch.randn(8, 32, 16, 3, 3, generator=g).cuda()

    def call():
        with fastmeta.use_backend("cuda"), torch.no_grad():
            ops.batched_conv2d(x, w, None, padding=1)

    def peak_mb():
        return H.step_peak_mb(call, "cuda")

    monkeypatch.delenv("FASTMETA_CONV_AUTOTUNE", raising=False)
    peaks = {}
    for form in ("0", "1"):
        monkeypatch.setenv("FASTMETA_CONV_PER_TASK", form)
        peak_mb()
        peaks[form] = peak_mb()
    monkeypatch.delenv("FASTMETA_CONV_PER_TASK")
    fastmeta._C._conv_autotune_clear()
    tuned = peak_mb()
    assert len(fastmeta._C._conv_autotune_choices()) == 1
    out_mb = 8 * 16 * 32 * 40 * 40 * 4 / 2**20
    assert tuned <= max(peaks.values()) + 0.05 * out_mb, (tuned, peaks, out_mb)


def test_tune_on_gpu():
    """fastmeta.tune on the conv path (Omniglot shape, T=2): the CUDA backends are timed (or say why
    not) and the chosen one's meta-gradient equals auto's."""
    w = H.make_workload("omniglot", tasks=2, device="cuda")
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy")
    result = fastmeta.tune(meta, w.xs, w.ys, w.xq, w.yq, backends=["auto", "cuda", "torch"], reps=2, warmup=1)
    print(result)
    assert "auto" in result.times()
    assert "cuda" in result.times(), result
    _, got = meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)
    with fastmeta.use_backend("auto"):
        meta.backend, keep = None, meta.backend
        _, want = meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)
        meta.backend = keep
    assert_rel_close([g for g in got], list(want), 1e-3, "tuned vs auto meta-grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 4, 7, 6), (4, 80, 64, 28, 28)])
@pytest.mark.parametrize("layout", ["task-major", "task-inner"])
@pytest.mark.parametrize("slices", ["auto", "1", "3"])
def test_cuda_bn_relu_pool(shape, dtype, layout, slices, monkeypatch):
    """fastmeta::bn_relu_pool's CUDA kernels (backend cuda; blocks a task and channel as the GPU's
    size picks them, one, or three, FASTMETA_CUDA_BRP_SLICES): values, the gradients of x, weight
    and bias (the backward kernel, and the differentiable backward) and second derivatives (the
    double-backward kernel), against the reference in float64, and in float32 against the C++ CPU
    kernels on the same data (both take z = x * scale + shift as one fused multiply-add, so their
    windows pick the same maxima, where the reference's rounding may pick the other of a near-tie);
    x task-major or task-inner (as batched_conv2d returns it: the outputs then are too)."""
    from fastmeta.ops.bn_relu_pool import task_inner
    if slices != "auto":
        monkeypatch.setenv("FASTMETA_CUDA_BRP_SLICES", slices)
    g = torch.Generator().manual_seed(0)
    T, N, C, H, W = shape
    d = dict(dtype=dtype)
    x = torch.randn(shape, generator=g, **d)
    if layout == "task-inner":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    x.requires_grad_()
    w = torch.randn(T, C, generator=g, **d).requires_grad_()
    b = torch.randn(T, C, generator=g, **d).requires_grad_()
    xc = x.detach().transpose(0, 1).cuda().transpose(0, 1) if layout == "task-inner" else x.detach().cuda()
    assert task_inner(xc) == (layout == "task-inner")
    xc.requires_grad_()
    wc, bc = (t.detach().cuda().requires_grad_() for t in (w, b))
    with fastmeta.use_backend("cuda"):
        y = ops.bn_relu_pool(xc, wc, bc)
    assert task_inner(y) == (layout == "task-inner")
    if dtype == torch.float64:
        want, tol = ops.bn_relu_pool_ref(x, w, b), 1e-10
    else:
        with fastmeta.use_backend("cpp"):
            want, tol = ops.bn_relu_pool(x, w, b), 1e-5
    assert_rel_close([y.detach().cpu()], [want.detach()], tol, "values")
    r = torch.randn(y.shape, generator=g, **d)
    g0 = torch.autograd.grad((y * r.cuda()).sum(), [xc, wc, bc], retain_graph=True)  # the backward kernel
    assert task_inner(g0[0]) == (layout == "task-inner")
    g1 = torch.autograd.grad((y * r.cuda()).sum(), [xc, wc, bc], create_graph=True)
    g2 = torch.autograd.grad((want * r).sum(), [x, w, b], create_graph=True)
    assert_rel_close([t.cpu() for t in g0], [t.detach() for t in g2], 10 * tol, "gradients (kernel)")
    assert_rel_close([t.detach().cpu() for t in g1], [t.detach() for t in g2], 10 * tol, "gradients")
    # second order: the create_graph backward is an op whose derivative is the CUDA double-backward kernel
    h1 = torch.autograd.grad(sum((t * t.detach()).sum() for t in g1), [xc, wc])
    h2 = torch.autograd.grad(sum((t * t.detach()).sum() for t in g2), [x, w])
    assert_rel_close([t.cpu() for t in h1], list(h2), 100 * tol, "second derivatives")


def test_checkpoint_steps_on_gpu():
    """BatchedMAML(checkpoint_steps=True) on CUDA (Omniglot shape, T=3, float64 so that only the
    algorithm can differ): value_and_grad and a graphed replay (the backward's recomputation inside
    the capture) equal value_and_grad without it; in float32 (T=4, S=3) its peak memory is lower."""
    w = H.make_workload("omniglot", tasks=3, steps=2, device="cuda", dtype=torch.float64)
    plain = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy")
    ck = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy", checkpoint_steps=True)
    want_loss, want = plain.value_and_grad(w.xs, w.ys, w.xq, w.yq)
    loss, got = ck.value_and_grad(w.xs, w.ys, w.xq, w.yq)
    assert_rel_close([loss], [want_loss], 1e-12, "meta-loss")
    assert_rel_close(list(got), list(want), 1e-10, "meta-grad")
    step = fastmeta.graphed(ck, w.xs, w.ys, w.xq, w.yq)
    g_loss, g_grads = step(w.xs, w.ys, w.xq, w.yq)
    assert_rel_close([g_loss.clone()], [want_loss], 1e-12, "graphed meta-loss")
    assert_rel_close([g.clone() for g in g_grads], list(want), 1e-10, "graphed meta-grad")
    del step
    w = H.make_workload("omniglot", tasks=4, steps=3, device="cuda")
    peaks = {}
    for flag in (False, True):
        meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy", checkpoint_steps=flag)
        meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        meta.value_and_grad(w.xs, w.ys, w.xq, w.yq)
        torch.cuda.synchronize()
        peaks[flag] = torch.cuda.max_memory_allocated() - base
    assert peaks[True] < peaks[False], peaks


def test_tune_memory_on_gpu():
    """fastmeta.tune(memory_mb=...) on CUDA (peaks from the caching allocator): with a budget under
    the all-at-once peak it sets a leaner setting whose measured peak fits."""
    w = H.make_workload("omniglot", tasks=4, steps=2, device="cuda")
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, loss="cross_entropy")
    batch = (w.xs, w.ys, w.xq, w.yq)
    meta.value_and_grad(*batch)
    whole = H.step_peak_mb(lambda: meta.value_and_grad(*batch), "cuda")
    budget = 0.6 * whole
    result = fastmeta.tune(meta, *batch, backends=["auto"], reps=2, warmup=1, per_op=False, memory_mb=budget,
                           rtol=1e-2)
    assert result.best.startswith("memory:"), str(result)
    assert (meta.task_chunk, meta.recompute, meta.checkpoint_steps) != (None, False, False)
    assert H.step_peak_mb(lambda: meta.value_and_grad(*batch), "cuda") <= budget * 1.05, str(result)


def test_graphed_step_updates_batch_norm_running_stats_as_value_and_grad():
    """A replay updates tracked BatchNorm running statistics as an eager value_and_grad call does
    (the loop's order); capturing (its warmup calls) leaves them as they were."""
    import copy
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 4, 5)).cuda().double()
    d = dict(device="cuda")
    xs, xq = torch.randn(4, 5, 1, 8, 8, dtype=torch.float64, **d), torch.randn(4, 7, 1, 8, 8, dtype=torch.float64, **d)
    ys, yq = torch.randint(0, 5, (4, 5), **d), torch.randint(0, 5, (4, 7), **d)
    eager = copy.deepcopy(net)
    meta = fastmeta.BatchedMAML(net, 0.1, 2, loss="cross_entropy")
    before = [b.clone() for b in net.buffers()]
    step = fastmeta.graphed(meta, xs, ys, xq, yq)
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), before))
    em = fastmeta.BatchedMAML(eager, 0.1, 2, loss="cross_entropy")
    for _ in range(2):
        step(xs, ys, xq, yq)
        em.value_and_grad(xs, ys, xq, yq)
    for a, b in zip(net.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int(net[1].num_batches_tracked) == 2 * 4 * 3


@pytest.mark.parametrize("first_order", [False, True])
def test_fused_mlp_meta_loss_under_torch_compile_on_cuda(first_order):
    """fastmeta::mlp_meta_loss traced by torch.compile on CUDA (its forward is fastmeta::mlp_meta_grad,
    whose CUDA path reduces the kernel's per-task rows into views of one buffer; the backward scales
    them with one _foreach_mul): loss and meta-gradient equal to the eager op's, also for an incoming
    gradient other than 1; and a compiled step holding a BatchedMAML call equals the eager step."""
    params, batch = make_mlp_batch((1, 40, 40, 1), 25, 10, 10, "mse", torch.float32, "cuda")

    def step(xs, ys, xq, yq):
        return ops.mlp_meta_loss(xs, ys, xq, yq, params, 0.01, 5, ["relu", "relu", None], first_order=first_order)

    with fastmeta.use_backend("cuda"):
        want_loss = step(*batch)
        want = torch.autograd.grad(want_loss * 3, params)
        torch._dynamo.reset()
        loss = torch.compile(step, backend="aot_eager")(*batch)
        got = torch.autograd.grad(loss * 3, params)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert_rel_close(list(got), list(want), 1e-5, "meta-grad")
    w = H.make_workload("sine", tasks=25, device="cuda")
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order)
    wanted = list(meta.parameters())
    want = torch.autograd.grad(meta(w.xs, w.ys, w.xq, w.yq), wanted)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(lambda *b: meta(*b), backend="aot_eager")(w.xs, w.ys, w.xq, w.yq), wanted)
    assert_rel_close(list(got), list(want), 1e-6, "meta-grad")


def test_graphed_step_with_dropout():
    """The lowered nn.Dropout inside a captured step: in eval mode a replay equals value_and_grad;
    in training mode each replay draws new masks (CUDA graphs advance the generator's offset a
    replay), so two replays of the same batch differ, and each is finite; a replay after the model
    was switched to eval() raises (the graph holds the mode it was captured in)."""
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5)).cuda().double()
    d = dict(device="cuda", dtype=torch.float64)
    xs, xq = torch.randn(6, 5, 4, **d), torch.randn(6, 7, 4, **d)
    ys, yq = torch.randint(0, 5, (6, 5), device="cuda"), torch.randint(0, 5, (6, 7), device="cuda")
    meta = fastmeta.BatchedMAML(net, 0.3, 2, loss="cross_entropy")
    assert not meta.program.fallbacks
    net.eval()
    loss, grads = fastmeta.graphed(meta, xs, ys, xq, yq)(xs, ys, xq, yq)
    want_loss, want = meta.value_and_grad(xs, ys, xq, yq)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    net.train()
    step = fastmeta.graphed(meta, xs, ys, xq, yq)
    first = step(xs, ys, xq, yq)[0].clone()
    second = step(xs, ys, xq, yq)[0].clone()
    assert torch.isfinite(first) and torch.isfinite(second)
    assert not torch.equal(first, second)
    net.eval()  # the captured graph draws masks: a replay in eval mode would still drop
    with pytest.raises(RuntimeError, match="training mode"):
        step(xs, ys, xq, yq)
