"""Models built of the modules lowered beyond the conv4 / MLP set (GELU and the other elementwise
activations, LayerNorm, GroupNorm, InstanceNorm, Conv1d, the adaptive pools, Embedding): BatchedMAML.value_and_grad
(`fastmeta_vg`: the auto backend, so a GELU MLP runs the fused MLP kernel) against the same module
on the batched torch ops alone (`fastmeta_vg-torch`: backend='torch'), with those modules run
through the torch.func vmap fallback (`fastmeta_vg_vmapped`: each one given a forward pre-hook that
does nothing, so that the planner calls it as a whole) and the per-task loop, timed together
(rows interleaved in rounds: fastmeta.harness.time_interleaved), medians of whole
meta-iterations, each row's meta-gradient against the loop's.

Models (`--models`):
- `gelu_mlp`: the sine MLP 1-40-40-1 with GELU, T=25, K=Q=10, S=5, inner lr 0.01 (mse);
- `layernorm_mlp`: 1-40-LayerNorm-ReLU-40-LayerNorm-ReLU-1, the same tasks;
- `groupnorm_conv4`: conv4 on 1 x 28 x 28 images (Omniglot's shape, 32 channels) with GroupNorm(4)
  instead of BatchNorm, 5-way 1-shot, 15 query a class, S=1, inner lr 0.4;
- `conv1d`: two Conv1d -> GroupNorm -> SiLU -> MaxPool1d blocks (16 channels) on 3 x 64 series, an
  AdaptiveAvgPool1d and a linear head, 5-way 1-shot, 15 query a class, S=2, inner lr 0.1;
- `image_mlp`: Flatten -> Linear(784, 64) -> GELU -> Linear(64, 64) -> GELU -> Linear(64, 5) on
  Omniglot's 1 x 28 x 28 tasks (5-way 1-shot, 15 query a class), S=5, inner lr 0.4: the fused MLP
  kernel takes the inputs flattened (`fastmeta_vg-torch`: the batched ops, where the Flatten used
  to send it);
- `instancenorm_conv4`: groupnorm_conv4 with InstanceNorm2d(32, affine=True) in place of GroupNorm;
- `text`: an Embedding(1000, 32) of 20-token sequences, flattened, Linear(640, 64) -> ReLU ->
  Linear(64, 5), 5-way 5-shot, 15 query a class, S=5, inner lr 0.1.

`--activations relu,tanh,...` times instead the sine MLP 1-40-40-1 (T=25, K=Q=10, S=5) with each
activation on the fused MLP kernel and on the batched torch ops, all rows interleaved, with each
row's time against the fused ReLU row's.

    python benchmarks/more_modules.py [--models ...] [--order second,first] [--tasks T]
                                      [--device cpu|cuda] [--seconds 2]
    python benchmarks/more_modules.py --activations relu,tanh,sigmoid,gelu,gelu_tanh,silu
"""
import argparse

import torch
from torch import nn

import fastmeta
from fastmeta import harness as H

LOWERED_HERE = (nn.GELU, nn.SiLU, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d,
                nn.InstanceNorm2d, nn.Embedding)


def _fallback_copy(model):
    """A copy of model whose modules of LOWERED_HERE's classes have a forward pre-hook that does
    nothing: the planner runs each as a whole through its vmap fallback (as it runs hooked modules)."""
    import copy

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if type(m) in LOWERED_HERE:
            m.register_forward_pre_hook(_nothing)
    return twin


def _nothing(module, args):
    return None


def _classes(T, K, Q, ways, shape, g):
    xs = torch.randn(T, ways * K, *shape, generator=g)
    xq = torch.randn(T, ways * Q, *shape, generator=g)
    ys = torch.arange(ways).repeat_interleave(K).expand(T, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(Q).expand(T, -1).contiguous()
    return xs, ys, xq, yq


def workload(name, tasks=None, device="cpu"):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in ("gelu_mlp", "layernorm_mlp"):
        T, S, lr, loss = tasks or 25, 5, 0.01, "mse"
        batch = H.sine_tasks(T, g)
        if name == "gelu_mlp":
            model = nn.Sequential(nn.Linear(1, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 1))
        else:
            model = nn.Sequential(nn.Linear(1, 40), nn.LayerNorm(40), nn.ReLU(), nn.Linear(40, 40), nn.LayerNorm(40),
                                  nn.ReLU(), nn.Linear(40, 1))
    elif name in ("groupnorm_conv4", "instancenorm_conv4"):
        T, S, lr, loss = tasks or (8 if device == "cpu" else 32), 1, 0.4, "cross_entropy"
        batch = _classes(T, 1, 15, 5, (1, 28, 28), g)
        blocks, c = [], 1
        for _ in range(4):
            norm = nn.GroupNorm(4, 32) if name == "groupnorm_conv4" else nn.InstanceNorm2d(32, affine=True)
            blocks += [nn.Conv2d(c, 32, 3, padding=1), norm, nn.ReLU(), nn.MaxPool2d(2)]
            c = 32
        model = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(32, 5))
    elif name == "conv1d":
        T, S, lr, loss = tasks or (8 if device == "cpu" else 32), 2, 0.1, "cross_entropy"
        batch = _classes(T, 1, 15, 5, (3, 64), g)
        model = nn.Sequential(nn.Conv1d(3, 16, 5, padding=2), nn.GroupNorm(4, 16), nn.SiLU(), nn.MaxPool1d(2),
                              nn.Conv1d(16, 16, 5, padding=2), nn.GroupNorm(4, 16), nn.SiLU(), nn.MaxPool1d(2),
                              nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 5))
    elif name == "image_mlp":
        T, S, lr, loss = tasks or (8 if device == "cpu" else 32), 5, 0.4, "cross_entropy"
        batch = _classes(T, 1, 15, 5, (1, 28, 28), g)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                              nn.Linear(64, 5))
    elif name == "text":
        T, S, lr, loss = tasks or (8 if device == "cpu" else 32), 5, 0.1, "cross_entropy"
        xs, ys, xq, yq = _classes(T, 5, 15, 5, (20,), g)
        xs, xq = (torch.randint(0, 1000, x.shape, generator=g) for x in (xs, xq))  # (token ids)
        batch = (xs, ys, xq, yq)
        model = nn.Sequential(nn.Embedding(1000, 32), nn.Flatten(), nn.Linear(20 * 32, 64), nn.ReLU(), nn.Linear(64, 5))
    else:
        raise SystemExit(f"--models: unknown model {name!r} (one of {', '.join(MODELS)})")
    model = model.to(device)
    batch = tuple(t.to(device) for t in batch)
    return H.Workload(name, model, *batch, lr, S, loss)


MODELS = ("gelu_mlp", "layernorm_mlp", "groupnorm_conv4", "conv1d", "instancenorm_conv4", "text", "image_mlp")


def run(name, tasks, order, device, seconds):
    w = workload(name, tasks, device)
    fo = order == "first"
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=fo, loss=w.loss)
    vmapped = fastmeta.BatchedMAML(_fallback_copy(w.model), w.inner_lr, w.steps, first_order=fo, loss=w.loss)
    assert "vmap(" not in fastmeta.explain(meta) and "vmap(" in fastmeta.explain(vmapped)
    batch = (w.xs, w.ys, w.xq, w.yq)
    ops = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=fo, loss=w.loss, backend="torch")
    rows = {"loop": H.make_step("loop", w, fo),
            "fastmeta_vg": lambda: meta.value_and_grad(*batch)[1],
            "fastmeta_vg-torch": lambda: ops.value_and_grad(*batch)[1],
            "fastmeta_vg_vmapped": lambda: vmapped.value_and_grad(*batch)[1]}
    want = rows["loop"]()
    errs = {k: H.max_rel_err(list(rows[k]()), list(want)) for k in rows if k != "loop"}
    timed = H.time_interleaved(rows, device, seconds=seconds, min_calls=3, max_seconds=4 * seconds)
    print(f"\n{name}, T={w.tasks}, S={w.steps}, {order} order, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| provider | median ms | x vs loop | x vs vmapped | calls | max rel err vs loop |")
    print("|---|---|---|---|---|---|")
    for k, (med, times, err) in timed.items():
        if med is None:
            print(f"| {k} | failed: {err} | | | | |")
            continue
        print(f"| {k} | {med:.3f} | {timed['loop'][0] / med:.2f} | {timed['fastmeta_vg_vmapped'][0] / med:.2f} | "
              f"{len(times)} | {errs[k]:.1e} |" if k in errs else
              f"| {k} | {med:.3f} | 1.00 | {timed['fastmeta_vg_vmapped'][0] / med:.2f} | {len(times)} | - |")
    return timed, errs


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
               "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


def activation_table(names, tasks, order, device, seconds):
    """The sine MLP with each activation: value_and_grad on the auto backend (the fused kernel) and
    on the batched torch ops, rows interleaved; returns (timed, errs) as run()."""
    fo = order == "first"
    rows, errs, want = {}, {}, {}
    for name in names:
        if name not in ACTIVATIONS:
            raise SystemExit(f"--activations: unknown activation {name!r} (one of {', '.join(ACTIVATIONS)})")
        w = workload("gelu_mlp", tasks, device)
        torch.manual_seed(0)
        act = ACTIVATIONS[name]
        w.model = nn.Sequential(nn.Linear(1, 40), act(), nn.Linear(40, 40), act(), nn.Linear(40, 1)).to(device)
        batch = (w.xs, w.ys, w.xq, w.yq)
        fused = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=fo, loss=w.loss)
        assert fused.program.mlp is not None, name
        ops = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=fo, loss=w.loss, backend="torch")
        rows[name] = lambda m=fused, b=batch: m.value_and_grad(*b)[1]
        rows[name + "-torch"] = lambda m=ops, b=batch: m.value_and_grad(*b)[1]
        want[name] = list(H.make_step("loop", w, fo)())
        errs[name] = H.max_rel_err(list(rows[name]()), want[name])
        errs[name + "-torch"] = H.max_rel_err(list(rows[name + "-torch"]()), want[name])
    timed = H.time_interleaved(rows, device, seconds=seconds, min_calls=3, max_seconds=4 * seconds)
    base = names[0]
    print(f"\nsine MLP 1-40-40-1 by activation, T={w.tasks}, S={w.steps}, {order} order, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| activation | fused ms | batched ops ms | ops / fused | fused vs {base} | max rel err vs loop (fused, ops) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        f, o = timed[name][0], timed[name + "-torch"][0]
        print(f"| {name} | {f:.3f} | {o:.3f} | {o / f:.2f} | {f / timed[base][0]:.2f} | "
              f"{errs[name]:.1e}, {errs[name + '-torch']:.1e} |")
    return timed, errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--order", default="second,first")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--activations", default=None, help="comma list of " + ", ".join(ACTIVATIONS))
    args = ap.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    if args.activations:
        for order in args.order.split(","):
            out[("activations", order)] = activation_table(args.activations.split(","), args.tasks, order,
                                                           args.device, args.seconds)
        return out
    for name in args.models.split(","):
        for order in args.order.split(","):
            out[(name, order)] = run(name, args.tasks, order, args.device, args.seconds)
    return out


if __name__ == "__main__":
    main()
