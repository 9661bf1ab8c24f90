"""fastmeta.tune and BatchedMAML(backend=...): the measured choice, its meta-gradient check, the
precedence of an explicit request, and bad input."""
import importlib

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import harness as H
from conftest import requires_cpp


def _conv_meta(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(3, 4, 1, 8, 8, generator=g), torch.randint(0, 3, (3, 4), generator=g),
             torch.randn(3, 5, 1, 8, 8, generator=g), torch.randint(0, 3, (3, 5), generator=g))
    return fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy", **kw), batch


def _mlp_meta(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(2)
    batch = tuple(torch.randn(4, n, 1, generator=g) for n in (5, 5, 6, 6))
    return fastmeta.BatchedMAML(model, 0.05, 3, **kw), batch


@requires_cpp
def test_tune_times_each_backend_and_keeps_the_fastest():
    meta, batch = _conv_meta()
    before = [p.detach().clone() for p in meta.parameters()]
    result = fastmeta.tune(meta, *batch, reps=2, warmup=1, per_op=False)
    rows = {name: (ms, note) for name, ms, note in result.rows}
    assert {"auto", "cpp", "cuda", "triton", "torch"} <= set(rows)
    assert all(name.split(" + ")[0] in ("auto", "cpp", "triton", "torch") for name in set(rows) - {"cuda"})
    times = result.times()
    assert {"auto", "cpp", "torch"} <= set(times) and all(ms > 0 for ms in times.values())
    assert result.best == min(times, key=times.get)
    if " + " not in result.best:
        assert meta.backend == (None if result.best == "auto" else result.best)
    assert rows["cuda"][0] is None and rows["cuda"][1].startswith("unavailable")
    assert rows["triton"][0] is None  # unavailable, or the interpreter: not timed by default
    assert "batched_conv2d=cpp" in rows["cpp"][1] and rows["torch"][1] == "torch ops only"
    assert result.best in str(result) and "median ms" in str(result)
    # parameters untouched, no .grad written
    assert all(torch.equal(a, b) for a, b in zip(before, meta.parameters()))
    assert all(p.grad is None for p in meta.parameters())


@requires_cpp
def test_tune_compares_a_dropout_model_on_the_same_draws():
    """A conv net with Dropout in training mode: every candidate's meta-gradient is compared on a
    call under one seed, so no backend is left out for drawing other masks than auto's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 4 * 4, 3))
    _, batch = _conv_meta()
    meta = fastmeta.BatchedMAML(model, 0.1, 2, loss="cross_entropy")
    assert meta.program.random and not meta.program.fallbacks
    result = fastmeta.tune(meta, *batch, backends=["auto", "torch"], reps=1, warmup=0, per_op=False)
    assert {"auto", "torch"} <= set(result.times()), str(result)


@requires_cpp
def test_tune_skips_a_backend_that_runs_the_same_kernels():
    """For the fused MLP, cpp runs what auto runs (inner_update aside, which the fused step does not
    call): only a backend whose kernels differ is timed."""
    meta, batch = _mlp_meta()
    result = fastmeta.tune(meta, *batch, backends=["auto", "torch", "auto"], reps=2, warmup=0, per_op=False)
    names = [name for name, _, _ in result.rows]
    assert names == ["auto", "torch", "auto"]
    assert result.rows[2][1] is None and "same kernels as 'auto'" in result.rows[2][2]


@requires_cpp
def test_tune_leaves_out_a_backend_whose_meta_gradient_differs(monkeypatch):
    """A backend that computes a different meta-gradient is not chosen however fast it is."""
    conv = importlib.import_module("fastmeta.ops.batched_conv2d")
    real = conv.batched_conv2d_ref

    def wrong(x, w, *args, **kwargs):  # the same values, every gradient through it 1.5 times too large
        y = real(x, w, *args, **kwargs)
        return y + 0.5 * (y - y.detach())
    monkeypatch.setattr(conv, "batched_conv2d_ref", wrong)
    meta, batch = _conv_meta()
    result = fastmeta.tune(meta, *batch, backends=["auto", "torch"], reps=1, warmup=0, per_op=False)
    note = dict((n, note) for n, _, note in result.rows)["torch"]
    assert note.startswith("left out: meta-gradient differs from 'auto'")
    assert result.best == "auto" and meta.backend is None


@requires_cpp
def test_module_backend_applies_under_auto_and_yields_to_an_explicit_request():
    meta, batch = _mlp_meta(backend="torch")
    loss = meta(*batch)
    assert not meta._last_fused  # torch: the inner loop step by step
    with fastmeta.use_backend("cpp"):
        loss_cpp = meta(*batch)
    assert meta._last_fused  # an explicit request wins over the module's
    torch.testing.assert_close(loss, loss_cpp)
    meta.backend = None
    meta(*batch)
    assert meta._last_fused  # auto on the CPU: the fused C++ kernel
    assert "backend='torch'" in repr(fastmeta.BatchedMAML(meta.model, 0.1, backend="torch"))
    assert fastmeta.BatchedMAML(meta.model, 0.1, backend="auto").backend is None


@requires_cpp
def test_tune_finds_a_per_op_mix(monkeypatch):
    """With the cpp convolution and the torch update made slow, no single backend avoids both (auto
    runs cpp convolutions with the torch update on the CPU); the per-op pass finds convolutions on
    torch with the cpp update, and the module then runs that mix."""
    import time
    conv = importlib.import_module("fastmeta.ops.batched_conv2d")
    upd = importlib.import_module("fastmeta.ops.inner_update")

    def sleepy(fn):
        def run(*a, **k):
            time.sleep(0.02)
            return fn(*a, **k)
        return run
    monkeypatch.setattr(conv._AtenPrims, "conv", sleepy(conv._AtenPrims.conv))
    monkeypatch.setattr(upd, "_torch_impl", sleepy(upd._torch_impl))
    meta, batch = _conv_meta()
    result = fastmeta.tune(meta, *batch, backends=["auto", "cpp", "torch"], reps=3, warmup=1, margin=0.0)
    assert " + " in result.best, result
    assert meta.backend.get("batched_conv2d") == "torch" and meta.backend.get("inner_update") == "cpp", result
    from fastmeta.backend import get_backend
    seen = []
    monkeypatch.setattr(upd, "_cpp_impl", lambda *a, f=upd._cpp_impl, **k: seen.append(get_backend()) or f(*a, **k))
    meta(*batch)
    assert seen and seen[0] == meta.backend  # the module's per-op request is in force in its calls


def test_per_op_requests():
    from fastmeta import backend
    with fastmeta.use_backend({"batched_conv2d": "torch", "bn_relu_pool": "auto"}):
        req = fastmeta.get_backend()
        assert isinstance(req, backend.PerOp) and req.get("batched_conv2d") == "torch"
        assert req.get("bn_relu_pool") == "auto" and backend.select("batched_conv2d", "cpu") == "torch"
    with fastmeta.use_backend({"bn_relu_pool": "auto"}):
        assert fastmeta.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        fastmeta.set_backend({"conv": "cpp"})
    with pytest.raises(ValueError, match=r"backend\['inner_update'\]: expected one of"):
        fastmeta.use_backend({"inner_update": "gpu"})


def test_bad_input_is_named():
    meta, batch = _mlp_meta()
    with pytest.raises(TypeError, match="meta must be a fastmeta.BatchedMAML"):
        fastmeta.tune(meta.model, *batch)
    with pytest.raises(ValueError, match="reps must be an int >= 1"):
        fastmeta.tune(meta, *batch, reps=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        fastmeta.tune(meta, *batch, warmup=-1)
    with pytest.raises(ValueError, match="rtol must be a positive number"):
        fastmeta.tune(meta, *batch, rtol=0)
    with pytest.raises(ValueError, match="margin must be a non-negative number"):
        fastmeta.tune(meta, *batch, margin=-0.1)
    with pytest.raises(ValueError, match="backends must be a non-empty list"):
        fastmeta.tune(meta, *batch, backends=["gpu"])
    with pytest.raises(RuntimeError, match="no backend could run this meta-step"):
        fastmeta.tune(meta, *batch, backends=["cuda"])
    with pytest.raises(ValueError, match="backend: expected one of"):
        fastmeta.BatchedMAML(meta.model, 0.1, backend="gpu")


@requires_cpp
def test_tune_memory_keeps_the_fastest_setting_within_the_budget():
    """memory_mb: each (recompute, checkpoint_steps) combination's largest task chunk within the
    budget is timed (its row gives the peak) and the fastest is set on the module; a budget between
    the all-at-once peak and the leanest setting's excludes the former; none fitting raises with the
    smallest peak seen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 6, 1, 16, 16, generator=g), torch.randint(0, 3, (4, 6), generator=g),
             torch.randn(4, 9, 1, 16, 16, generator=g), torch.randint(0, 3, (4, 9), generator=g))
    meta = fastmeta.BatchedMAML(model, 0.1, 3, loss="cross_entropy")
    whole = H.step_peak_mb(lambda: meta.value_and_grad(*batch), "cpu")
    lean = fastmeta.BatchedMAML(model, 0.1, 3, loss="cross_entropy", task_chunk=1, recompute=True,
                                checkpoint_steps=True)
    least = H.step_peak_mb(lambda: lean.value_and_grad(*batch), "cpu")
    assert 0 < least < whole
    budget = (least + whole) / 2
    result = fastmeta.tune(meta, *batch, backends=["auto"], reps=2, warmup=1, per_op=False, memory_mb=budget)
    rows = [(name, ms, note) for name, ms, note in result.rows if name.startswith("memory:")]
    assert rows and result.best.startswith("memory:")
    for name, ms, note in rows:
        assert ms is not None and float(note.split("peak ")[1].split(" MB")[0]) <= budget, (name, note)
    assert (meta.task_chunk, meta.recompute, meta.checkpoint_steps) != (None, False, False)
    assert f"task_chunk={meta.task_chunk}" in result.best
    assert ("recompute" in result.best) == meta.recompute
    assert ("checkpoint_steps" in result.best) == meta.checkpoint_steps
    with pytest.raises(RuntimeError, match=r"no memory setting keeps the meta-step within memory_mb=0.001 MB; "
                                           r"the smallest peak measured was"):
        fastmeta.tune(meta, *batch, backends=["auto"], reps=1, warmup=0, per_op=False, memory_mb=0.001)


@requires_cpp
def test_tune_memory_leaves_the_fused_mlp_as_it_is():
    meta, batch = _mlp_meta()
    result = fastmeta.tune(meta, *batch, backends=["auto"], reps=1, warmup=0, per_op=False, memory_mb=1.0)
    assert not any(name.startswith("memory:") for name, _, _ in result.rows)
    assert (meta.task_chunk, meta.recompute, meta.checkpoint_steps) == (None, False, False)
    with pytest.raises(ValueError, match="memory_mb must be a positive number of MB or None, got -1"):
        fastmeta.tune(meta, *batch, memory_mb=-1)
