"""ANIL (Raghu et al. 2020: only the head adapts in the inner loop, the body is meta-learned) on the
conv4 few-shot workloads: BatchedMAML(inner_params=head) against the per-task loops that compute
the same meta-gradient, timed in one process with the rows interleaved in rounds
(fastmeta.harness.time_interleaved), medians of whole meta-iterations (value_and_grad or loss +
autograd.grad of every meta-parameter).

Rows:
- `loop_anil`: learn2learn's ANIL recipe, task by task: the body's features of the support and
  query images once, then the head's S differentiable SGD steps on the support features, the
  query loss, backward to head and body;
- `loop_full`: task by task through the whole model at every inner step, adapting the head only
  (a MAML loop with the body left out of the update);
- `fastmeta_anil`: BatchedMAML(model, inner_params=head).value_and_grad, all tasks at once, the
  body's support features made once a call;
- `fastmeta_anil_everystep`: the same with the body run at every inner step (the invariant prefix
  off: what the prefix saves);
- `fastmeta_maml`: BatchedMAML adapting every parameter (MAML), for scale.

    python benchmarks/anil.py [--workload omniglot|miniimagenet] [--tasks T] [--steps S]
                              [--order second|first] [--device cpu|cuda] [--seconds 2]
                              [--small]   (a tiny net: the script's own check)
"""
import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call

import fastmeta
from fastmeta import harness as H


def workload(name, tasks, steps, device, small=False):
    """(model, batch, inner lr, steps): the bench's conv workload of that name (fastmeta.harness), or
    with small a 4-channel conv4 on 1 x 16 x 16 images, 5-way 1-shot, 3 query a class."""
    if not small:
        w = H.make_workload(name, tasks, steps, device)
        return w.model, (w.xs, w.ys, w.xq, w.yq), w.inner_lr, w.steps
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = H.conv4(1, 4, 5, 16).to(device)
    xs = torch.randn(tasks, 5, 1, 16, 16, generator=g).to(device)
    xq = torch.randn(tasks, 15, 1, 16, 16, generator=g).to(device)
    ys = torch.arange(5).expand(tasks, -1).contiguous().to(device)
    yq = torch.arange(5).repeat_interleave(3).expand(tasks, -1).contiguous().to(device)
    return model, (xs, ys, xq, yq), 0.4, steps


def head_names(model):
    return [n for n, _ in model.named_parameters()][-2:]


def loop_anil(model, batch, lr, S, first_order):
    """learn2learn's ANIL recipe, task by task; returns the meta-gradient of every parameter."""
    body, head = model[:-1], model[-1]
    params = list(model.parameters())
    xs, ys, xq, yq = batch

    def step():
        total = 0.0
        for t in range(xs.shape[0]):
            fs, fq = body(xs[t]), body(xq[t])
            w, b = head.weight, head.bias
            for _ in range(S):
                loss = F.cross_entropy(F.linear(fs, w, b), ys[t])
                gw, gb = torch.autograd.grad(loss, (w, b), create_graph=not first_order)
                w, b = w - lr * gw, b - lr * gb
            total = total + F.cross_entropy(F.linear(fq, w, b), yq[t])
        return torch.autograd.grad(total / xs.shape[0], params)
    return step


def loop_full(model, batch, lr, S, first_order):
    """Task by task through the whole model at every inner step, the head adapted."""
    named = dict(model.named_parameters())
    head = head_names(model)
    params = list(named.values())
    xs, ys, xq, yq = batch

    def step():
        total = 0.0
        for t in range(xs.shape[0]):
            p = dict(named)
            for _ in range(S):
                loss = F.cross_entropy(functional_call(model, p, (xs[t],)), ys[t])
                g = torch.autograd.grad(loss, [p[n] for n in head], create_graph=not first_order)
                p.update({n: p[n] - lr * d for n, d in zip(head, g)})
            total = total + F.cross_entropy(functional_call(model, p, (xq[t],)), yq[t])
        return torch.autograd.grad(total / xs.shape[0], params)
    return step


@contextlib.contextmanager
def no_prefix(meta):
    """The invariant prefix off for this module's program (the body then runs at every step)."""
    prog = meta.program
    prog.invariant_prefix = lambda adapted, **settings: 0
    try:
        yield
    finally:
        del prog.invariant_prefix


def fastmeta_step(model, batch, lr, S, first_order, anil=True, every_step=False):
    meta = fastmeta.BatchedMAML(model, lr, S, first_order=first_order, loss="cross_entropy",
                                inner_params=model[-1] if anil else None)

    def step():
        with no_prefix(meta) if every_step else contextlib.nullcontext():
            return meta.value_and_grad(*batch)[1]
    return step


def run(name, tasks, steps, order, device, seconds, small=False):
    model, batch, lr, S = workload(name, tasks, steps, device, small)
    fo = order == "first"
    rows = {
        "loop_anil": loop_anil(model, batch, lr, S, fo),
        "loop_full": loop_full(model, batch, lr, S, fo),
        "fastmeta_anil": fastmeta_step(model, batch, lr, S, fo),
        "fastmeta_anil_everystep": fastmeta_step(model, batch, lr, S, fo, every_step=True),
        "fastmeta_maml": fastmeta_step(model, batch, lr, S, fo, anil=False),
    }
    want = rows["loop_anil"]()
    errs = {k: H.max_rel_err(rows[k](), want) for k in rows if k != "fastmeta_maml"}
    timed = H.time_interleaved(rows, device, seconds=seconds, min_calls=3, max_seconds=4 * seconds)
    print(f"\n{name}{' (small)' if small else ''}, T={tasks}, S={S}, {order} order, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    table(timed, "loop_anil", {"max rel err vs loop_anil": errs})
    return timed, errs


def table(timed, base, errors):
    """Prints time_interleaved's rows as a markdown table: median, ratio to row ``base``, calls, then
    a column for each of ``errors`` (title -> row -> error; '-' for a row without one, '- (MAML)'
    for fastmeta_maml, which computes another meta-gradient)."""
    print("| provider | median ms | x vs " + base + " | calls | " + " | ".join(errors) + " |")
    print("|---|---|---|---|" + "---|" * len(errors))
    for k, (med, times, err) in timed.items():
        if med is None:
            print(f"| {k} | failed: {err} |" + " |" * (2 + len(errors)))
            continue
        cells = [f"{col[k]:.1e}" if k in col else ("- (MAML)" if k == "fastmeta_maml" else "-")
                 for col in errors.values()]
        print(f"| {k} | {med:.2f} | {timed[base][0] / med:.2f} | {len(times)} | " + " | ".join(cells) + " |")


def cli(doc, run, argv=None, orders="second,first", workloads=("omniglot", "miniimagenet")):
    """The conv workload scripts' command line (this one's, benchmarks/maml_plus_plus.py's and
    benchmarks/reptile.py's): parses argv, then run(workload, tasks, steps, order, device, seconds,
    small) for each order (default ``orders``); returns order -> run's result. (sine, where a
    script takes it: 25 tasks by default.)"""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--workload", default="omniglot", choices=list(workloads))
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--order", default=orders)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)
    tasks = args.tasks or (3 if args.small else 25 if args.workload == "sine" else (8 if args.device == "cpu" else 32))
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for order in args.order.split(","):
        out[order] = run(args.workload, tasks, args.steps, order, args.device, args.seconds, args.small)
    return out


def main(argv=None):
    return cli(__doc__, run, argv)


if __name__ == "__main__":
    main()
