"""Reptile (Nichol et al. 2018) on the conv4 few-shot workloads and the sine MLP:
BatchedMAML.reptile_grad, all tasks at once, against the per-task loop that computes the same update
(each task's S SGD steps on its support set, theta - the tasks' mean adapted theta), timed in one
process with the rows interleaved in rounds (fastmeta.harness.time_interleaved), medians of whole
meta-iterations.

Rows:
- `loop_reptile`: task by task, S steps of torch.autograd.grad on the support loss (no graph kept);
- `fastmeta_reptile`: BatchedMAML(model, lr, S).reptile_grad(xs, ys) (on the sine MLP the fused inner
  loop, ops.mlp_adapt, where the cpp backend runs);
- `fastmeta_reptile_ops` (sine): the same with the fused op's backend set to torch, the batched ops;
- `fastmeta_reptile_triton` (sine, on a GPU): the same on the Triton MLP kernel's inner loop.

The query set is not used (Reptile's task data is its support set). Error: the largest per-tensor
relative error of the update against the loop's.

    python benchmarks/reptile.py [--workload omniglot|miniimagenet|sine] [--tasks T] [--steps S]
                                 [--device cpu|cuda] [--seconds 2] [--small]
"""
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fastmeta
from fastmeta import harness as H
from anil import cli, table, workload  # (the ANIL bench's workloads and command line; this script's directory)


def loop_reptile(model, batch, lr, S, loss="cross_entropy"):
    """The per-task loop; returns theta - the mean adapted theta for every parameter."""
    named = dict(model.named_parameters())
    xs, ys = batch[:2]
    fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss

    def step():
        total = {n: torch.zeros_like(v) for n, v in named.items()}
        for t in range(xs.shape[0]):
            p = {n: v.detach().requires_grad_() for n, v in named.items()}
            for _ in range(S):
                value = fn(functional_call(model, p, (xs[t],)), ys[t])
                g = torch.autograd.grad(value, list(p.values()))
                p = {n: (v - lr * d).detach().requires_grad_() for (n, v), d in zip(p.items(), g)}
            for n in total:
                total[n] += p[n].detach()
        return [named[n].detach() - total[n] / xs.shape[0] for n in named]
    return step


def run(name, tasks, steps, order, device, seconds, small=False):
    if name == "sine":
        w = H.make_workload("sine", tasks, steps, device)
        model, batch, lr, S, loss = w.model, (w.xs, w.ys, w.xq, w.yq), w.inner_lr, w.steps, "mse"
    else:
        (model, batch, lr, S), loss = workload(name, tasks, steps, device, small), "cross_entropy"
    meta = fastmeta.BatchedMAML(model, lr, S, loss=loss)
    rows = {"loop_reptile": loop_reptile(model, batch, lr, S, loss),
            "fastmeta_reptile": lambda: meta.reptile_grad(*batch[:2])[1]}
    if name == "sine":
        def on_ops():
            with fastmeta.use_backend({"mlp_inner_loop": "torch"}):
                return meta.reptile_grad(*batch[:2])[1]
        rows["fastmeta_reptile_ops"] = on_ops
        if device != "cpu":  # the Triton MLP kernel's inner loop alone beside the CUDA one (auto)
            def on_triton():
                with fastmeta.use_backend({"mlp_inner_loop": "triton"}):
                    return meta.reptile_grad(*batch[:2])[1]
            rows["fastmeta_reptile_triton"] = on_triton
    want = rows["loop_reptile"]()
    errs = {n: H.max_rel_err(rows[n](), want) for n in rows if n != "loop_reptile"}
    timed = H.time_interleaved(rows, device, seconds=seconds, min_calls=3, max_seconds=4 * seconds)
    print(f"\n{name}{' (small)' if small else ''}, T={tasks}, S={S}, Reptile, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    table(timed, "loop_reptile", {"max rel err vs loop_reptile": errs})
    return timed, errs


def main(argv=None):
    return cli(__doc__, run, argv, orders="first", workloads=("omniglot", "miniimagenet", "sine"))


if __name__ == "__main__":
    main()
