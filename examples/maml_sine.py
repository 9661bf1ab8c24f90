"""Sine-wave regression (Finn et al. 2017) with fastmeta.MAML, written the way learn2learn's MAML
example is: the only change from that code is the import (`fastmeta.MAML` / `fastmeta.MetaSGD` for
`learn2learn.algorithms.MAML` / `MetaSGD`).

    python examples/maml_sine.py                      # second-order MAML, 25 tasks a meta-batch
    python examples/maml_sine.py --first-order        # first-order MAML
    python examples/maml_sine.py --metasgd            # Meta-SGD (learned rates, one per weight)

Each task is a sine wave y = A sin(x + phase), A in [0.1, 5], phase in [0, pi], x in [-5, 5]; the
learner adapts on K points and is scored on K others. Every --log-every iterations one JSON line
reports the meta-batch's mean query loss and, on held-out tasks, the query loss before and after
the inner steps (the evaluation's forward runs under torch.no_grad)."""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

import fastmeta


def sine_tasks(n: int, shots: int, generator: torch.Generator, device="cpu"):
    """n tasks of 2 * shots points each: (xs, ys, xq, yq), each [n, shots, 1]."""
    amplitude = torch.empty(n, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(n, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(n, 2 * shots, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x + phase)
    x, y = x.to(device), y.to(device)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def evaluate(maml, tasks, steps: int):
    """Mean query loss over the tasks before and after `steps` inner steps on their support sets."""
    mse = nn.functional.mse_loss
    before = after = 0.0
    xs, ys, xq, yq = tasks
    for t in range(xs.shape[0]):
        learner = maml.clone()
        with torch.no_grad():
            before += mse(learner(xq[t]), yq[t]).item()
        for _ in range(steps):
            learner.adapt(mse(learner(xs[t]), ys[t]))
        with torch.no_grad():
            after += mse(learner(xq[t]), yq[t]).item()
    return before / xs.shape[0], after / xs.shape[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--tasks", type=int, default=25, help="tasks a meta-batch")
    ap.add_argument("--shots", type=int, default=10, help="support (and query) points a task")
    ap.add_argument("--steps", type=int, default=5, help="inner steps")
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--outer-lr", type=float, default=0.001)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--metasgd", action="store_true", help="Meta-SGD: learned inner rates")
    ap.add_argument("--eval-tasks", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    model = model.to(args.device)
    if args.metasgd:
        maml = fastmeta.MetaSGD(model, lr=args.inner_lr, first_order=args.first_order)
    else:
        maml = fastmeta.MAML(model, lr=args.inner_lr, first_order=args.first_order)
    opt = torch.optim.Adam(maml.parameters(), args.outer_lr)
    held_out = sine_tasks(args.eval_tasks, args.shots, torch.Generator().manual_seed(args.seed + 1), args.device)
    mse = nn.functional.mse_loss
    log = []

    for iteration in range(1, args.iterations + 1):
        opt.zero_grad()
        xs, ys, xq, yq = sine_tasks(args.tasks, args.shots, gen, args.device)
        meta_loss = 0.0
        for t in range(args.tasks):
            learner = maml.clone()
            for _ in range(args.steps):
                learner.adapt(mse(learner(xs[t]), ys[t]))
            query = mse(learner(xq[t]), yq[t])
            (query / args.tasks).backward()  # the meta-gradient, summed over the tasks in .grad
            meta_loss += query.item() / args.tasks
        opt.step()
        if iteration % args.log_every == 0 or iteration == args.iterations:
            before, after = evaluate(maml, held_out, args.steps)
            log.append({"iteration": iteration, "meta_loss": round(meta_loss, 4),
                        "eval_before_adapt": round(before, 4), "eval_after_adapt": round(after, 4)})
            print(json.dumps(log[-1]), flush=True)
    return maml, log


if __name__ == "__main__":
    main()
