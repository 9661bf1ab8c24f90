"""The drop-in learners' per-call costs on the CPU (fastmeta.MAML / MetaSGD; benchmarks/RESULTS.md).

1. fastmeta::mlp_forward's two CPU paths for an MLP 1-h-h-1 on N rows, in microseconds: its plain
   loops (threshold above the size) and ATen's calls (threshold -1), for the forward and its
   gradient ("fo") and for those and the second-order backward ("so"); ratio = ATen / loops.
2. The sine MLP learner's pieces: clone, forward (also under no_grad, beside the module's own
   call), forward + loss + gradient, clone + one adapt, for MAML and Meta-SGD.

    python benchmarks/dropin_calls.py [--calls 400]

Medians of back-to-back calls after a warm-up."""
from __future__ import annotations

import argparse
import time

import torch

import fastmeta
from fastmeta import _C, harness

SIZES = [(10, 40), (25, 40), (10, 100), (10, 128), (40, 64), (20, 100), (50, 64), (100, 128)]


def median_us(fn, calls: int) -> float:
    for _ in range(max(calls // 20, 5)):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6


def op_paths(calls: int) -> None:
    print("| N x h | multiply-adds | loops fo / so | ATen fo / so | ratio fo / so |")
    print("|---|---|---|---|---|")
    before = _C._mlp_forward_small_macs()
    try:
        for n, h in SIZES:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, 1, generator=g)
            params = []
            for i, o in [(1, h), (h, h), (h, 1)]:
                params += [torch.randn(o, i, generator=g).requires_grad_(), torch.randn(o, generator=g).requires_grad_()]

            def fo():
                y = torch.ops.fastmeta.mlp_forward(x, params, [1, 1, 0], 0.01)
                torch.autograd.grad(y.pow(2).sum(), params)

            def so():
                y = torch.ops.fastmeta.mlp_forward(x, params, [1, 1, 0], 0.01)
                grads = torch.autograd.grad(y.pow(2).sum(), params, create_graph=True)
                torch.autograd.grad(sum((t * t).sum() for t in grads), params)

            got = {}
            for path, limit in (("loops", 1 << 40), ("aten", -1)):
                _C._mlp_forward_small_macs(limit)
                got[path] = (median_us(fo, calls), median_us(so, calls))
            (lf, ls), (af, as_) = got["loops"], got["aten"]
            print(f"| {n} x {h} | {n * (2 * h + h * h) / 1000:.1f}k | {lf:.0f} / {ls:.0f} | {af:.0f} / {as_:.0f} | "
                  f"{af / lf:.2f} / {as_ / ls:.2f} |")
    finally:
        _C._mlp_forward_small_macs(before)


def learner_pieces(calls: int) -> None:
    w = harness.make_workload("sine", tasks=1, device="cpu")
    xs, ys = w.xs[0], w.ys[0]
    print("| piece | MAML us | MetaSGD us |")
    print("|---|---|---|")
    rows = {}
    for cls in (fastmeta.MAML, fastmeta.MetaSGD):
        maml = cls(w.model, lr=w.inner_lr)
        learner = maml.clone()
        params = list(learner.module.parameters())

        def forward_no_grad():
            with torch.no_grad():
                return learner(xs)

        def module_no_grad():
            with torch.no_grad():
                return learner.module(xs)

        def adapt_once():
            fresh = maml.clone()
            fresh.adapt(w.loss_fn(fresh(xs), ys))

        pieces = {
            "clone": lambda: maml.clone(),
            "forward": lambda: learner(xs),
            "forward under no_grad": forward_no_grad,
            "the module's own call under no_grad": module_no_grad,
            "forward, loss and gradient": lambda: torch.autograd.grad(w.loss_fn(learner(xs), ys), params),
            "clone and one adapt": adapt_once,
        }
        for name, fn in pieces.items():
            rows.setdefault(name, []).append(median_us(fn, calls))
    for name, (a, b) in rows.items():
        print(f"| {name} | {a:.0f} | {b:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400, help="timed calls a row")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"loops threshold {_C._mlp_forward_small_macs()} multiply-adds\n")
    op_paths(args.calls)
    print()
    learner_pieces(args.calls * 5)


if __name__ == "__main__":
    main()
