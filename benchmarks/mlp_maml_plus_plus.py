"""MAML++'s inner loop (Antoniou et al. 2019) on an MLP: learned rates per parameter tensor and
inner step (LSLR) and the multi-step loss (the query loss after every inner step, weighted),
BatchedMAML(learn_inner_lr='per_layer_step', step_loss_weights=w).value_and_grad on the fused MLP
kernel, against the same module on the batched ops and the per-task loop that computes the same
meta-gradient, timed in one process with the rows interleaved in rounds
(fastmeta.harness.time_interleaved), medians of whole meta-iterations.

Rows:
- `loop_mamlpp`: task by task: at each inner step the support loss, its (differentiable)
  gradient, the update with that step's rates, then the query loss at the new parameters,
  weighted; backward to the meta-parameters and the rates;
- `fastmeta_mamlpp`: BatchedMAML(learn_inner_lr='per_layer_step', step_loss_weights=w), all tasks
  at once (the fused mlp_inner_loop op where its backend runs per-step rates: cpp);
- `fastmeta_mamlpp_ops`: the same module with the fused op's backend set to torch: step by step on
  the batched ops (what BatchedMAML ran for these settings before the fused kernel took them);
- `fastmeta_maml`: BatchedMAML with a fixed rate and the last step's loss (MAML), for scale.

The weights are step_loss_schedule(S, epoch=1, anneal_epochs=10): every step's query loss counts.
Meta-gradient errors (parameters and rates) against the float64 loop.

    python benchmarks/mlp_maml_plus_plus.py [--tasks 25] [--steps 5] [--width 40] [--order second|first]
                                            [--device cpu|cuda] [--seconds 2]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta import harness as H


def loop_mamlpp(model, batch, rates, weights, first_order):
    """The per-task loop. rates: parameter name -> [S] learned rates. Returns the meta-gradient of
    every parameter, then of every rate."""
    named = dict(model.named_parameters())
    inputs = list(named.values()) + list(rates.values())
    xs, ys, xq, yq = batch
    S = len(weights)

    def step():
        total = 0.0
        for t in range(xs.shape[0]):
            p = dict(named)
            for s in range(S):
                loss = F.mse_loss(functional_call(model, p, (xs[t],)), ys[t])
                g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
                p = {n: v - rates[n][s] * d for (n, v), d in zip(p.items(), g)}
                if weights[s] != 0:
                    total = total + weights[s] * F.mse_loss(functional_call(model, p, (xq[t],)), yq[t])
        return torch.autograd.grad(total / xs.shape[0], inputs)
    return step


def sine_batch(T, K, Q, device, dtype=torch.float32):
    """Sine regression tasks: amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]."""
    g = torch.Generator().manual_seed(0)
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g)
    phase = torch.pi * torch.rand(T, 1, 1, generator=g)
    xs, xq = (-5 + 10 * torch.rand(T, n, 1, generator=g) for n in (K, Q))
    ys, yq = amp * torch.sin(xs - phase), amp * torch.sin(xq - phase)
    return tuple(t.to(device, dtype) for t in (xs, ys, xq, yq))


def run(tasks, steps, width, order, device, seconds):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 1)).to(device)
    batch = sine_batch(tasks, 10, 10, device)
    fo = order == "first"
    weights = fastmeta.step_loss_schedule(steps, 1, 10)
    pp = fastmeta.BatchedMAML(model, 0.01, steps, first_order=fo, learn_inner_lr="per_layer_step",
                              step_loss_weights=weights)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # rates that differ by layer and step, as after some meta-training
        for r in pp.lrs.values():
            r.mul_(0.5 + torch.rand(r.shape, generator=g).to(r))
    maml = fastmeta.BatchedMAML(model, 0.01, steps, first_order=fo)
    rates = {n: pp.lrs[pp._lr_key(n)] for n in pp._adapt_names}
    ops_only = {"mlp_inner_loop": "torch"}

    def on_ops():
        with fastmeta.use_backend(ops_only):
            return pp.value_and_grad(*batch)[1]
    rows = {
        "loop_mamlpp": loop_mamlpp(model, batch, rates, weights, fo),
        "fastmeta_mamlpp": lambda: pp.value_and_grad(*batch)[1],
        "fastmeta_mamlpp_ops": on_ops,
        "fastmeta_maml": lambda: maml.value_and_grad(*batch)[1],
    }
    rows["fastmeta_mamlpp"]()
    fused = pp._last_fused
    m64 = copy.deepcopy(model).double()
    b64 = tuple(t.double() for t in batch)
    r64 = {n: r.detach().double().requires_grad_() for n, r in rates.items()}
    exact = loop_mamlpp(m64, b64, r64, weights, fo)()
    errs = {n: H.max_rel_err(rows[n](), exact) for n in ("loop_mamlpp", "fastmeta_mamlpp", "fastmeta_mamlpp_ops")}
    timed = H.time_interleaved(rows, device, seconds=seconds, min_calls=3, max_seconds=4 * seconds)
    print(f"\nsine MLP 1-{width}-{width}-1, K=Q=10, T={tasks}, S={steps}, {order} order, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; fastmeta_mamlpp on the fused kernel: "
          f"{fused}; step_loss_weights {[round(w, 3) for w in weights]}")
    base = timed["loop_mamlpp"][0]
    print("| row | median ms | vs loop_mamlpp | max rel err vs the float64 loop |\n|---|---|---|---|")
    for name, (median, _, error) in timed.items():
        err = f"{errs[name]:.1e}" if name in errs else ""
        if median is None:
            print(f"| {name} | failed: {error} | | |")
        else:
            print(f"| {name} | {median:.3f} | {base / median:.2f}x | {err} |")
    if timed["fastmeta_mamlpp"][0] and timed["fastmeta_mamlpp_ops"][0]:
        print(f"fastmeta_mamlpp vs fastmeta_mamlpp_ops: "
              f"{timed['fastmeta_mamlpp_ops'][0] / timed['fastmeta_mamlpp'][0]:.2f}x")
    return timed, errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=25)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--width", type=int, default=40)
    ap.add_argument("--order", choices=["second", "first", "both"], default="both")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args(argv)
    return {order: run(a.tasks, a.steps, a.width, order, a.device, a.seconds)
            for order in (["second", "first"] if a.order == "both" else [a.order])}


if __name__ == "__main__":
    main()
