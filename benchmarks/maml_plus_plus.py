"""MAML++'s inner loop (Antoniou et al. 2019) on the conv4 few-shot workloads: learned rates per
parameter tensor and inner step (LSLR), per-step BatchNorm weights and biases (BNWB; the conv4
here keeps no running statistics) and the multi-step loss (the query loss after every inner step,
weighted), BatchedMAML(learn_inner_lr='per_layer_step', per_step_bn=True, step_loss_weights=w)
against the per-task loop that computes the same meta-gradient, timed in one process with the rows
interleaved in rounds (fastmeta.harness.time_interleaved), medians of whole meta-iterations.

Rows:
- `loop_mamlpp`: task by task, as MAML++'s reference training loop runs a task: at each inner
  step the support loss with that step's BatchNorm weights, its (differentiable) gradient, the
  update with that step's rates, then the query loss at the new parameters, weighted; backward to
  the meta-parameters, the BatchNorm tables and the rates;
- `fastmeta_mamlpp`: BatchedMAML(learn_inner_lr='per_layer_step', per_step_bn=True,
  step_loss_weights=w).value_and_grad, all tasks at once;
- `fastmeta_maml`: BatchedMAML with a fixed rate and the last step's loss (MAML), for scale.

The weights are step_loss_schedule(S, epoch=1, anneal_epochs=10): every step's query loss counts.
Meta-gradient errors (parameters, tables and rates) against the float32 loop and against the same loop in
float64, for which the float32 loop's own error is the floor.

    python benchmarks/maml_plus_plus.py [--workload omniglot|miniimagenet] [--tasks T] [--steps S]
                                        [--order second|first] [--device cpu|cuda] [--seconds 2]
                                        [--small]   (a tiny net: the script's own check)
"""
import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call

import fastmeta
from fastmeta import harness as H
from anil import cli, table, workload  # (the ANIL bench's workloads and command line; this script's directory)


def loop_mamlpp(model, batch, rates, tables, weights, first_order):
    """The per-task loop. rates: adapted parameter name -> [S] learned rates; tables: BatchNorm
    weight or bias name -> [S, C] (its row s in place of the module's own at step s). Returns the
    meta-gradient of every parameter of the model (zero for a BatchNorm's own), table and rate."""
    named = dict(model.named_parameters())
    inputs = list(named.values()) + list(tables.values()) + list(rates.values())
    xs, ys, xq, yq = batch
    S = len(weights)

    def at(p, s):  # the parameters of step s's passes
        return {**p, **{n: t[s] for n, t in tables.items()}}

    def step():
        total = 0.0
        for t in range(xs.shape[0]):
            p = dict(named)
            for s in range(S):
                loss = F.cross_entropy(functional_call(model, at(p, s), (xs[t],)), ys[t])
                g = torch.autograd.grad(loss, [p[n] for n in rates], create_graph=not first_order)
                p.update({n: p[n] - rates[n][s] * d for n, d in zip(rates, g)})
                if weights[s] != 0:
                    total = total + weights[s] * F.cross_entropy(functional_call(model, at(p, s), (xq[t],)), yq[t])
        return torch.autograd.grad(total / xs.shape[0], inputs, allow_unused=True, materialize_grads=True)
    return step


def _tables(meta):
    """per_step_bn's tables by the name of the BatchNorm parameter each stands for."""
    out = {}
    for name, t in meta.step_bn.named_parameters():
        kind, key = name.split(".", 1)
        out[f"{key.replace('__', '.')}.{kind}"] = t
    return out


def run(name, tasks, steps, order, device, seconds, small=False):
    model, batch, lr, S = workload(name, tasks, steps, device, small)
    fo = order == "first"
    weights = fastmeta.step_loss_schedule(S, 1, 10)
    pp = fastmeta.BatchedMAML(model, lr, S, first_order=fo, loss="cross_entropy", learn_inner_lr="per_layer_step",
                              step_loss_weights=weights, per_step_bn=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # rates and BatchNorm rows that differ by layer and step, as after some meta-training
        for r in pp.lrs.values():
            r.mul_(0.5 + torch.rand(r.shape, generator=g).to(r))
        for t in pp.step_bn.parameters():
            t.add_(0.1 * torch.randn(t.shape, generator=g).to(t))
    maml = fastmeta.BatchedMAML(model, lr, S, first_order=fo, loss="cross_entropy")
    rates = {n: pp.lrs[pp._lr_key(n)] for n in pp._adapt_names}
    tables = _tables(pp)
    rows = {
        "loop_mamlpp": loop_mamlpp(model, batch, rates, tables, weights, fo),
        "fastmeta_mamlpp": lambda: pp.value_and_grad(*batch)[1],
        "fastmeta_maml": lambda: maml.value_and_grad(*batch)[1],
    }
    want = rows["loop_mamlpp"]()
    got = rows["fastmeta_mamlpp"]()
    errs = {"fastmeta_mamlpp": H.max_rel_err(got, want)}
    # the float64 loop's answer: how far float32's rounding alone takes the loop itself
    m64 = copy.deepcopy(model).double()
    b64 = tuple(t.double() if t.is_floating_point() else t for t in batch)
    r64 = {n: r.detach().double().requires_grad_() for n, r in rates.items()}
    t64 = {n: t.detach().double().requires_grad_() for n, t in tables.items()}
    exact = loop_mamlpp(m64, b64, r64, t64, weights, fo)()
    errs64 = {"loop_mamlpp": H.max_rel_err(want, exact), "fastmeta_mamlpp": H.max_rel_err(got, exact)}
    timed = H.time_interleaved(rows, device, seconds=seconds, min_calls=3, max_seconds=4 * seconds)
    print(f"\n{name}{' (small)' if small else ''}, T={tasks}, S={S}, {order} order, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, step_loss_weights "
          f"{[round(w, 3) for w in weights]}")
    table(timed, "loop_mamlpp", {"max rel err vs loop_mamlpp": errs, "vs the float64 loop": errs64})
    return timed, errs, errs64


def main(argv=None):
    return cli(__doc__, run, argv)


if __name__ == "__main__":
    main()
