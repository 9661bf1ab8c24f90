"""Modules lowered onto batched per-task ops beyond the conv4 / MLP set: the parameter-free
elementwise activations (GELU, SiLU, ELU, Softplus, Mish, ...), PReLU with per-task slopes, Softmax /
LogSoftmax, LayerNorm, GroupNorm and InstanceNorm (without running statistics) with per-task affine
weights, Embedding (token inputs), Conv1d (as a Conv2d of height 1), the 1d pools and the
adaptive pools. Each model runs without a vmap fallback (strict lowering) and its loss and
meta-gradient equal the per-task loop's (float64; both orders, MAML and Meta-SGD, torch and cpp
backends). An MLP with GELU or SiLU runs the fused MLP kernel (cpp here)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import plan
from fastmeta.backend import why_unavailable
from conftest import assert_meta_sgd_case_matches_loop, assert_rel_close, has_cpp, loop_meta_grads

BACKENDS = ["torch"] + (["cpp"] if has_cpp() else [])


def _mlps():
    return {
        "gelu": lambda: nn.Sequential(nn.Linear(3, 16), nn.GELU(), nn.Linear(16, 2)),
        "gelu_tanh_silu": lambda: nn.Sequential(nn.Linear(3, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 9),
                                                nn.SiLU(), nn.Linear(9, 2)),
        "elu_softplus_mish": lambda: nn.Sequential(nn.Linear(3, 8), nn.ELU(0.7), nn.Linear(8, 8),
                                                   nn.Softplus(beta=2.0), nn.Linear(8, 8), nn.Mish(),
                                                   nn.Linear(8, 2)),
        "hard_and_shrink": lambda: nn.Sequential(nn.Linear(3, 8), nn.Hardswish(), nn.Linear(8, 8),
                                                 nn.CELU(0.5), nn.SELU(), nn.Softsign(), nn.Linear(8, 8),
                                                 nn.Hardtanh(-0.5, 2.0), nn.Linear(8, 2)),
        "layernorm": lambda: nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2)),
        "layernorm_plain": lambda: nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16, elementwise_affine=False),
                                                 nn.GELU(), nn.Linear(16, 2)),
        "layernorm_no_bias": lambda: nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16, bias=False), nn.Tanh(),
                                                   nn.Linear(16, 2)),
        "log_softmax": lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4), nn.LogSoftmax(dim=1)),
        "prelu": lambda: nn.Sequential(nn.Linear(3, 8), nn.PReLU(), nn.Linear(8, 6), nn.PReLU(6, init=0.1),
                                       nn.Linear(6, 2)),
        "inplace": lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU6(inplace=True), nn.LayerNorm(8),
                                         nn.SiLU(inplace=True), nn.Linear(8, 2)),
    }


def _convs():
    return {
        "groupnorm": lambda: nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
                                           nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1),
                                           nn.GroupNorm(1, 4, affine=False), nn.SiLU(), nn.Flatten(),
                                           nn.Linear(4 * 3 * 3, 3)),
        "instance_groupnorm_adaptive": lambda: nn.Sequential(nn.Conv2d(2, 5, 3), nn.GroupNorm(5, 5), nn.GELU(),
                                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                             nn.Linear(5, 3)),
        "bn_adaptive_max": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                                 nn.AdaptiveMaxPool2d((2, 3)), nn.Flatten(), nn.Linear(24, 3)),
        "prelu_channels": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.PReLU(4), nn.MaxPool2d(2),
                                                nn.Flatten(), nn.Linear(4 * 3 * 3, 3)),
        "instancenorm": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True),
                                              nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                                              nn.InstanceNorm2d(4), nn.GELU(), nn.Flatten(), nn.Linear(36, 3)),
        # in-place activations on a convolution's output and on its flattened view (the cpp
        # convolution's output is a strided view of its kernel's: it must accept them)
        "inplace": lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True),
                                         nn.Conv2d(4, 4, 3, padding=1), nn.ELU(inplace=True), nn.MaxPool2d(2),
                                         nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LeakyReLU(0.2, inplace=True),
                                         nn.Linear(4, 3)),
    }


def _conv1ds():
    return {
        "conv1d": lambda: nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
                                        nn.Conv1d(6, 4, 3, stride=2, dilation=2, padding=2, groups=2), nn.GELU(),
                                        nn.AvgPool1d(2), nn.Flatten(), nn.Linear(4 * 2, 3)),
        "conv1d_same_adaptive": lambda: nn.Sequential(nn.Conv1d(2, 4, 5, padding="same", bias=False),
                                                      nn.GroupNorm(2, 4), nn.ELU(), nn.AdaptiveMaxPool1d(3),
                                                      nn.Flatten(), nn.Linear(12, 3)),
        "conv1d_adaptive_avg": lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool1d(1),
                                                     nn.Flatten(), nn.Linear(4, 3)),
        "conv1d_layernorm": lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.LayerNorm([4, 17]), nn.GELU(),
                                                  nn.Flatten(), nn.Linear(4 * 17, 3)),
        "conv1d_batchnorm": lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                                                  nn.MaxPool1d(2), nn.Flatten(), nn.Linear(4 * 8, 3)),
        "conv1d_instancenorm": lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.InstanceNorm1d(4, affine=True),
                                                     nn.ELU(), nn.Flatten(), nn.Linear(4 * 17, 3)),
        "conv1d_inplace": lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Hardtanh(-0.5, 0.5, inplace=True),
                                                nn.Flatten(), nn.SiLU(inplace=True), nn.Linear(4 * 17, 3)),
    }


def _batch(kind, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    K, Q = 4, 5
    if kind == "mlp":
        shape = (3,)
    elif kind == "conv":
        shape = (2, 7, 7)
    else:
        shape = (2, 17)
    xs = torch.randn(T, K, *shape, generator=g, dtype=torch.float64)
    xq = torch.randn(T, Q, *shape, generator=g, dtype=torch.float64)
    return xs, xq


CASES = ([("mlp", n) for n in _mlps()] + [("conv", n) for n in _convs()] + [("conv1d", n) for n in _conv1ds()])


def _model(kind, name):
    torch.manual_seed(1)
    table = {"mlp": _mlps, "conv": _convs, "conv1d": _conv1ds}[kind]()
    model = table[name]().double()
    with torch.no_grad():  # affine weights away from their 1 / 0 start, so that their gradients count
        for n, p in model.named_parameters():
            if p.dim() == 1 and "weight" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


# the Triton convolution (under TRITON_INTERPRET=1 without a GPU: slow) on the Conv1d model, whose
# height-1 convolutions it runs; the other lowerings are torch ops on every backend
TRITON = ([pytest.param("conv1d", "conv1d", "triton", id="conv1d-conv1d-triton")]
          if why_unavailable("triton", "cpu") is None else [])


@pytest.mark.parametrize("kind,name,backend", [(k, n, b) for k, n in CASES for b in BACKENDS] + TRITON)
def test_module_lowered_and_exact(kind, name, backend):
    model = _model(kind, name)
    plan.lower(model, strict=True)  # no vmap fallback
    T, steps, lr = 3, 2, 0.3
    xs, xq = _batch(kind, T)
    g = torch.Generator().manual_seed(2)
    if name == "log_softmax":  # class labels for the log-probabilities (cross-entropy of them: the same NLL)
        loss = "cross_entropy"
        ys, yq = torch.randint(0, 4, (T, 4), generator=g), torch.randint(0, 4, (T, 5), generator=g)
    elif kind == "mlp":
        loss = "mse"
        ys, yq = torch.randn(T, 4, 2, generator=g, dtype=torch.float64), torch.randn(T, 5, 2, generator=g,
                                                                                      dtype=torch.float64)
    else:
        loss = "cross_entropy"
        ys, yq = torch.randint(0, 3, (T, 4), generator=g), torch.randint(0, 3, (T, 5), generator=g)
    # (the interpreted Triton convolution: second-order Meta-SGD only, the slowest and widest case)
    combos = [(False, True)] if backend == "triton" else [(fo, ms) for fo in (False, True) for ms in (False, True)]
    for first_order, meta_sgd in combos:
        assert_meta_sgd_case_matches_loop(model, (xs, ys, xq, yq), lr, steps, loss, backend, first_order, meta_sgd, g,
                                          f"{name} first_order={first_order} meta_sgd={meta_sgd}")


def test_explain_names_the_lowerings():
    text = fastmeta.explain(_model("conv1d", "conv1d_same_adaptive"))
    assert "batched_conv2d (1d)" in text and "group_norm" in text and "AdaptiveMaxPool1d" in text
    assert "vmap(" not in text
    text = fastmeta.explain(_model("mlp", "layernorm"))
    assert "layer_norm" in text and "vmap(" not in text
    # GELU (either form) and SiLU are activations of the fused MLP kernel; the others are not
    for name, fused in (("gelu", True), ("gelu_tanh_silu", True), ("elu_softplus_mish", False)):
        model = _model("mlp", name)
        assert (plan.lower(model).mlp is not None) == fused, name
        assert ("fused mlp_inner_loop op" in fastmeta.explain(model)) == fused, name
    spec = plan.lower(_model("mlp", "gelu_tanh_silu")).mlp
    assert spec.activations == ["gelu_tanh", "silu", None]


@pytest.mark.parametrize("layout", ["task_major", "task_inner"])
def test_group_norm_in_both_layouts(layout):
    """plan._group_norm on [T, N, C, H, W] stored task-major and as the batched ops return it
    ([N, T, C, H, W] in memory), with per-task affine weights and without, equals each task's
    F.group_norm."""
    g = torch.Generator().manual_seed(0)
    T, N, C, G = 3, 4, 6, 2
    base = torch.randn(T, N, C, 5, 5, generator=g, dtype=torch.float64)
    x = base if layout == "task_major" else base.transpose(0, 1).contiguous().transpose(0, 1)
    assert x.transpose(0, 1).is_contiguous() == (layout == "task_inner")
    w, b = torch.randn(T, C, generator=g, dtype=torch.float64), torch.randn(T, C, generator=g, dtype=torch.float64)
    got = plan._group_norm(x, G, 1e-5, w, b)
    want = torch.stack([F.group_norm(base[t], G, w[t], b[t], eps=1e-5) for t in range(T)])
    assert_rel_close([got], [want], 1e-12, "group_norm")
    got = plan._group_norm(x, G, 1e-5)
    want = torch.stack([F.group_norm(base[t], G, eps=1e-5) for t in range(T)])
    assert_rel_close([got], [want], 1e-12, "group_norm without affine weights")


def test_softmax_without_dim_falls_back_exactly():
    """Softmax(dim=None) picks its dim from the input's rank, which the task dim would change: it runs
    through the vmap fallback, which sees each task's own rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=None)).double()
    assert "vmap(Softmax)" in fastmeta.explain(model)
    xs, xq = _batch("mlp", 2)
    g = torch.Generator().manual_seed(1)
    ys, yq = torch.rand(2, 4, 4, generator=g, dtype=torch.float64), torch.rand(2, 5, 4, generator=g,
                                                                               dtype=torch.float64)
    want_loss, want, _ = loop_meta_grads(model, xs, ys, xq, yq, 0.5, 1, "mse")
    loss, grads = fastmeta.BatchedMAML(model, 0.5, 1).value_and_grad(xs, ys, xq, yq)
    assert abs(loss.item() - want_loss.item()) <= 1e-12 * abs(want_loss.item())
    assert_rel_close(list(grads), want, 1e-10, "meta-grad")


def test_bad_inputs_name_the_module_and_shapes():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 3, 2)).double()
    x = torch.randn(2, 3, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 3))
    with pytest.raises(ValueError, match=r"Conv1d at '0': expected input \[T, N, C, L\], got \(2, 3, 2, 5, 5\)"):
        fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")(x, y, x, y)
    x, y = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 5), nn.PReLU(4)).double()
    with pytest.raises(ValueError, match=r"PReLU at '1': 4 slopes need input \[T, N, C=4, \.\.\.\], got \(2, 3, 5\)"):
        fastmeta.BatchedMAML(model, 0.1, 1)(x, y, x, y)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(4)).double()
    with pytest.raises(ValueError, match=r"LayerNorm at '1': expected input \[T, N, \.\.\., 4\], got \(2, 3, 5\)"):
        fastmeta.BatchedMAML(model, 0.1, 1)(x, y, x, y)
    model = nn.Sequential(nn.Linear(3, 5), nn.GroupNorm(2, 4)).double()
    with pytest.raises(ValueError, match=r"GroupNorm at '1': expected input \[T, N, C=4, \.\.\.\], got \(2, 3, 5\)"):
        fastmeta.BatchedMAML(model, 0.1, 1)(x, y, x, y)


def test_batch_norm_inputs_are_checked_as_the_module_checks_them():
    """A BatchNorm2d given a task's 2-D batch, a BatchNorm1d a 4-D one, and batch statistics of one
    value a channel raise, as the modules' own forwards do (the loop), with the path and shapes;
    the batched BatchNorm used to normalize over whatever dims it was given."""
    x, y = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm2d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"BatchNorm2d at '1': expected input \[T, N, C, H, W\] .*got \(2, 3, 4\)"):
        fastmeta.BatchedMAML(model, 0.1, 1)(x, y, x, y)
    images = torch.randn(2, 3, 1, 6, 6, dtype=torch.float64)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(16, 2)).double()
    with pytest.raises(ValueError, match=r"BatchNorm1d at '1': expected input \[T, N, C\] or \[T, N, C, L\]"):
        fastmeta.BatchedMAML(model, 0.1, 1)(images, y, images, y)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"BatchNorm1d at '1': expected more than 1 value per channel"):
        fastmeta.BatchedMAML(model, 0.1, 1)(x[:, :1], y[:, :1], x, y)
    model.eval()  # (running statistics: one sample is fine, as for the module)
    fastmeta.BatchedMAML(model, 0.1, 1)(x[:, :1], y[:, :1], x, y)
    fused = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(6, 2)).double()  # (the fused bn_relu_pool step checks too)
    assert [s.kind for s in plan.lower(fused).steps][1] == "bn_relu_pool"
    signal = torch.randn(2, 3, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"BatchNorm2d at '1': expected input \[T, N, C, H, W\] .*\(2, 3, 4, 6\)"):
        fastmeta.BatchedMAML(fused, 0.1, 1)(signal, y, signal, y)


def test_instance_norm_inputs_and_running_statistics():
    """InstanceNorm checks its input as the module does (rank, channels where affine, more than one
    spatial element); with running statistics it is not lowered (the vmap fallback runs it)."""
    y = torch.randint(0, 2, (2, 3))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.Flatten(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"InstanceNorm2d at '1': expected more than 1 spatial element"):
        fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")(x, y, x, y)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.InstanceNorm2d(4), nn.Flatten(), nn.Linear(12, 2)).double()
    x = torch.randn(2, 3, 1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"InstanceNorm2d at '1': expected input \[T, N, C, H, W\], got \(2, 3, 4, 3\)"):
        fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")(x, y, x, y)
    tracked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True), nn.Flatten(),
                            nn.Linear(16, 2)).double()
    assert "InstanceNorm2d(track_running_stats=True) (running statistics) is not lowered" in fastmeta.explain(tracked)


def _text(padding_idx=None):
    torch.manual_seed(1)
    return nn.Sequential(nn.Embedding(20, 6, padding_idx=padding_idx), nn.Flatten(), nn.Linear(5 * 6, 8), nn.Tanh(),
                         nn.Linear(8, 3)).double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_lowered_and_exact(backend, padding_idx):
    """nn.Embedding: each task's rows of its own table (a padding row read with no gradient, as
    F.embedding's), against the loop; token sequences of 5 as inputs."""
    model = _text(padding_idx)
    plan.lower(model, strict=True)
    assert [s.kind for s in plan.lower(model).steps][0] == "embedding"
    g = torch.Generator().manual_seed(2)
    xs, xq = torch.randint(0, 20, (3, 4, 5), generator=g), torch.randint(0, 20, (3, 6, 5), generator=g)
    xs[:, 0, :2] = 0  # (the padding index, where there is one)
    ys, yq = torch.randint(0, 3, (3, 4), generator=g), torch.randint(0, 3, (3, 6), generator=g)
    for first_order, meta_sgd in [(False, False), (False, True), (True, False)]:
        assert_meta_sgd_case_matches_loop(model, (xs, ys, xq, yq), 0.3, 2, "cross_entropy", backend, first_order,
                                          meta_sgd, g, f"embedding first_order={first_order} meta_sgd={meta_sgd}")


def test_embedding_inputs_are_checked():
    model = _text()
    y = torch.randint(0, 3, (2, 4))
    with pytest.raises(IndexError, match=r"Embedding at '0': indices must be in \[0, 20\), got \[0, 20\]"):
        x = torch.arange(40).view(2, 4, 5) % 21
        fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")(x, y, x, y)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Embedding at '0': expected integer indices"):
        fastmeta.BatchedMAML(model, 0.1, 1, loss="cross_entropy")(x, y, x, y)
    assert "Embedding with max_norm" in fastmeta.explain(nn.Sequential(nn.Embedding(5, 2, max_norm=1.0)))
