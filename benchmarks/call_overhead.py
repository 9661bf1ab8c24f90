"""What a BatchedMAML call costs besides its kernel, per kind of inner rate: the sine MLP
(1-40-40-1, K = Q = 10) on the fused MLP op, value_and_grad, forward + torch.autograd.grad and
forward under torch.no_grad (evaluation: the loss alone), timed back to back (medians of single
calls, the rows interleaved in rounds: fastmeta.harness.time_interleaved).

At T=1, S=1 the kernel's own work is a few microseconds, so a row is mostly the call's fixed cost:
argument handling, the rates' expansion (per_layer, per_layer_step) and the summing of their
gradients, the op's dispatch. At T=25, S=5 (issue 3's sine shape) the same cost next to the kernel.
On a GPU the fixed cost is host time that a step of few tasks waits for.

Rows (`--rates`): `scalar` (MAML, one fixed rate), `meta_sgd` (learn_inner_lr=True, one rate a
parameter entry), `per_layer` (one a parameter tensor), `per_layer_step` (one a tensor and step,
MAML++'s LSLR), `lslr_msl` (per_layer_step with step_loss_weights, MAML++'s multi-step loss).

    python benchmarks/call_overhead.py [--shapes 1x1,25x5] [--order second|first|both]
                                       [--device cpu|cuda] [--seconds 1] [--json FILE]
"""
import argparse
import json
import platform

import torch
from torch import nn

import fastmeta
from fastmeta import harness as H

KINDS = {
    "scalar": {},
    "meta_sgd": {"learn_inner_lr": True},
    "per_layer": {"learn_inner_lr": "per_layer"},
    "per_layer_step": {"learn_inner_lr": "per_layer_step"},
    "lslr_msl": {"learn_inner_lr": "per_layer_step", "msl": True},
}


def sine_model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).to(device)


def batch(T, device):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(T, 10, 1, generator=g).to(device) for _ in range(4)]


def make(kind, S, first_order, device):
    kw = dict(KINDS[kind])
    msl = kw.pop("msl", False)
    meta = fastmeta.BatchedMAML(sine_model(device), 0.01, S, first_order=first_order, **kw)
    if msl:
        meta.step_loss_weights = [1.0 / S] * S
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1x1,25x5", help="TxS pairs, comma-separated")
    ap.add_argument("--order", default="both", choices=["second", "first", "both"])
    ap.add_argument("--rates", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=1.0, help="time budget a row (all rounds)")
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    orders = ["second", "first"] if args.order == "both" else [args.order]
    kinds = args.rates.split(",")
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"--rates: unknown kind {k!r} (one of {', '.join(KINDS)})")
    cpu = platform.processor() or platform.machine()
    print(f"# fastmeta {fastmeta.__version__}, torch {torch.__version__}, {cpu}, {torch.get_num_threads()} threads, "
          f"device {device}")
    print("| T | S | order | rates | value_and_grad us | forward + autograd.grad us | no_grad forward us |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.shapes.split(","):
        T, S = (int(v) for v in shape.lower().split("x"))
        data = batch(T, device)
        for order in orders:
            fns = {}
            for kind in kinds:
                meta = make(kind, S, order == "first", device)
                params = list(meta.parameters())

                def vg(meta=meta):
                    meta.value_and_grad(*data)

                def fg(meta=meta, params=params):
                    torch.autograd.grad(meta(*data), params)

                def ev(meta=meta):
                    with torch.no_grad():
                        meta(*data)
                fns[f"{kind}/vg"], fns[f"{kind}/fg"], fns[f"{kind}/ev"] = vg, fg, ev
            for f in fns.values():  # (the first calls check the batch and choose the path)
                for _ in range(20):
                    f()
            timed = H.time_interleaved(fns, device=device.type, seconds=args.seconds, max_calls=100000)
            for kind in kinds:
                vg_ms, fg_ms, ev_ms = (timed[f"{kind}/{k}"][0] for k in ("vg", "fg", "ev"))
                rows.append(dict(T=T, S=S, order=order, rates=kind, value_and_grad_us=vg_ms * 1e3,
                                 forward_grad_us=fg_ms * 1e3, no_grad_forward_us=ev_ms * 1e3))
                print(f"| {T} | {S} | {order} | {kind} | {vg_ms * 1e3:.1f} | {fg_ms * 1e3:.1f} | {ev_ms * 1e3:.1f} |",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
