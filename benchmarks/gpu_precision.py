"""Where a float32 meta-gradient departs from the exact one: each parameter's relative error
against the naive loop run in float64, for the float32 loop and for fastmeta on each backend, so
that an error at the 1e-4 bound can be traced to a layer (and so to an op: the first convolution
has one input channel per task, which cuDNN and PyTorch run as a depthwise convolution).

    python benchmarks/gpu_precision.py [--workload omniglot] [--tasks 4] [--order second,first]
                                       [--providers loop,fastmeta,fastmeta-torch,fastmeta-triton]

A parameter whose exact gradient is (near) zero (a convolution's bias, cancelled by BatchNorm) is
measured against 1e-2 of the whole gradient's norm, as fastmeta.harness.max_rel_err does. TF32 is
off. Prints one table a workload and order: a row a parameter, a column a provider.
"""
import argparse

import torch

from fastmeta import harness as H


def rel_errs(got, want):
    """Per-parameter relative error (Frobenius), near-zero parameters against 1e-2 of the total."""
    total = float(torch.sqrt(sum((w.double() ** 2).sum() for w in want)))
    return [float((g.double().cpu() - w.double().cpu()).norm()) / max(float(w.double().norm()), 1e-2 * total, 1e-30)
            for g, w in zip(got, want)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="omniglot")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--order", default="second,first")
    ap.add_argument("--providers", default="loop,fastmeta,fastmeta-torch,fastmeta-triton")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    H.precision_settings(tf32=False)
    providers = args.providers.split(",")
    for order in args.order.split(","):
        first_order = order == "first"
        w64 = H.make_workload(args.workload, tasks=args.tasks, device=args.device, dtype=torch.float64)
        exact = H.make_step("loop", w64, first_order)()
        names = [n for n, _ in w64.model.named_parameters()]
        cols = {}
        for name in providers:
            why = H.provider_available(name, args.device)
            if why:
                cols[name] = None
                print(f"{name}: skipped ({why})")
                continue
            w = H.make_workload(args.workload, tasks=args.tasks, device=args.device)
            cols[name] = rel_errs(H.make_step(name, w, first_order)(), exact)
        print(f"\n{args.workload}, T={args.tasks}, {order} order, {args.device}: relative error against the "
              "float64 loop")
        print("| parameter | " + " | ".join(providers) + " |")
        print("|---|" + "---|" * len(providers))
        for i, n in enumerate(names):
            cells = ["-" if cols[p] is None else f"{cols[p][i]:.1e}" for p in providers]
            print(f"| {n} | " + " | ".join(cells) + " |")
        worst = ["-" if cols[p] is None else f"{max(cols[p]):.1e}" for p in providers]
        print("| max | " + " | ".join(worst) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
