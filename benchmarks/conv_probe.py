"""The per-task 3x3 convolution kernels one at a time, at the conv-path workloads' layer shapes:
the forward (and the input gradient, which is the forward of gy with flipped weights) and the weight
gradient, on cuDNN's grouped convolution (fastmeta._C's cuda ops; the torch backend's kernels too)
and on the Triton implicit GEMM in both reduction orders (kernels/batched_conv2d.py: flat over
(c, a, b), or tap-major), float32, TF32 off. Each row: median microseconds over CUDA-event-timed
calls and the float32 rate that makes (2 x multiply-adds / time), so that a kernel's distance from
the card's float32 peak is in the table, and its error against the float64 answer. The Triton
kernels run with float32 products on the FMA units and as TF32x3 tensor-core products. ATen's
convolutions run both as one grouped call for all tasks (fastmeta._C's cuda ops) and as a call a
task, with and without cuDNN's algorithm search.

    python benchmarks/conv_probe.py [--shapes omniglot-l2,omniglot-l3,miniimagenet-l2,miniimagenet-l2-t1]
                                    [--device cpu --small]   (the script's own check, interpreter)
"""
import argparse
import os
import statistics
import sys
import time

import torch

# shape: T tasks, N images a task, C -> O channels, H x W (3x3, padding 1): the query pass of a task
# (75 images), where the meta-step spends most of its convolution time
SHAPES = {
    "omniglot-l2": (32, 75, 64, 64, 14, 14),
    "omniglot-l3": (32, 75, 64, 64, 7, 7),
    "omniglot-l1": (32, 75, 1, 64, 28, 28),
    "miniimagenet-l2": (32, 25, 32, 32, 42, 42),
    "miniimagenet-l2-t1": (1, 25, 32, 32, 42, 42),
    "miniimagenet-l1-t1": (1, 25, 3, 32, 84, 84),
}
SMALL = {name: (2, 2, min(C, 17), min(O, 5), 5, 6) for name, (T, N, C, O, H, W) in SHAPES.items()}


def timed_us(fn, device, n):
    fn()
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def rows(shape, device, n):
    from fastmeta import ops
    from fastmeta.kernels.batched_conv2d import conv_fwd, conv_wgrad

    T, N, C, O, H, W = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, N, C, H, W, generator=g).to(device)
    w = (0.1 * torch.randn(T, O, C, 3, 3, generator=g)).to(device)
    gy = torch.randn(T, N, O, H, W, generator=g).to(device)
    macs = T * N * O * C * 9 * H * W
    # the exact answers, in float64: the error column is each kernel's own rounding
    x64, w64, gy64 = x.double(), w.double(), gy.double()
    want_y = ops.batched_conv2d_ref(x64, w64, None, 1, 1)
    wr = w64.clone().requires_grad_()
    want_gw = torch.autograd.grad(ops.batched_conv2d_ref(x64, wr, None, 1, 1), wr, gy64)[0]

    def err(got, want):
        return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))
    out = []
    cands = [("triton flat", dict(taps=False)), ("triton tap-major", dict(taps=True)),
             ("triton flat tf32x3", dict(taps=False, precision="tf32x3")),
             ("triton tap-major tf32x3", dict(taps=True, precision="tf32x3"))]
    for name, kw in cands:
        e = err(conv_fwd(x, w, (1, 1), **kw), want_y)
        out.append(("forward", name, timed_us(lambda: conv_fwd(x, w, (1, 1), **kw), device, n), e))
        e = err(conv_wgrad(x, gy, (3, 3), (1, 1), **kw), want_gw)
        out.append(("weight grad", name, timed_us(lambda: conv_wgrad(x, gy, (3, 3), (1, 1), **kw), device, n), e))
    # cuDNN (oneDNN on a CPU) through ATen: every task's convolution as one grouped call (what the
    # cuda ops run), or a call a task (groups=1, where cuDNN's float32 3x3 algorithms, Winograd
    # among them, apply); each with and without cuDNN's algorithm search
    xf = x.transpose(0, 1).reshape(N, T * C, H, W)
    wf = w.reshape(T * O, C, 3, 3)
    gyf = gy.transpose(0, 1).reshape(N, T * O, H, W)
    conv_bwd = torch.ops.aten.convolution_backward

    def grouped_fwd():
        return torch.nn.functional.conv2d(xf, wf, None, 1, 1, 1, T)

    def grouped_bwd():
        return conv_bwd(gyf, xf, wf, None, [1, 1], [1, 1], [1, 1], False, [0, 0], T, [True, True, False])

    def task_fwd():
        return [torch.nn.functional.conv2d(x[t], w[t], None, 1, 1) for t in range(T)]

    def task_bwd():
        return [conv_bwd(gy[t], x[t], w[t], None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
                for t in range(T)]
    saved = torch.backends.cudnn.benchmark
    try:
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            tag = ", benchmark" if bench else ""
            y = grouped_fwd().view(N, T, O, H, W).transpose(0, 1)
            out.append(("forward", "grouped ATen" + tag, timed_us(grouped_fwd, device, n), err(y, want_y)))
            gw = grouped_bwd()[1].view(T, O, C, 3, 3)
            out.append(("input+weight grad", "grouped ATen" + tag, timed_us(grouped_bwd, device, n), err(gw, want_gw)))
            y = torch.stack(task_fwd())
            out.append(("forward", "a call a task" + tag, timed_us(task_fwd, device, n), err(y, want_y)))
            gw = torch.stack([g[1] for g in task_bwd()])
            out.append(("input+weight grad", "a call a task" + tag, timed_us(task_bwd, device, n), err(gw, want_gw)))
    finally:
        torch.backends.cudnn.benchmark = saved
    if device == "cuda":
        import fastmeta
        from fastmeta.backend import why_unavailable
        for backend in ("cuda", "torch"):
            if why_unavailable(backend, "cuda") is not None:
                continue
            with fastmeta.use_backend(backend):
                fwd = lambda: ops.batched_conv2d(x, w, None, 1, 1)  # noqa: E731
                out.append(("forward", backend, timed_us(fwd, device, n), err(fwd(), want_y)))
                xr = x.clone().requires_grad_()
                wq = w.clone().requires_grad_()
                y = ops.batched_conv2d(xr, wq, None, 1, 1)
                bwd = lambda: torch.autograd.grad(y, (xr, wq), gy, retain_graph=True)  # noqa: E731
                out.append(("input+weight grad", backend, timed_us(bwd, device, n), err(bwd()[1], want_gw)))
    return [(kind, name, us, 2 * macs * (2 if kind == "input+weight grad" else 1) / us / 1e6, e)
            for kind, name, us, e in out]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="omniglot-l2,omniglot-l3,omniglot-l1,miniimagenet-l2,miniimagenet-l2-t1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a check of the script itself)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("conv_probe: on the CPU the Triton kernels run under TRITON_INTERPRET=1 (set it)")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastmeta import harness as H
    print(H.precision_settings(tf32=False))
    print("| shape | T | N | C -> O | H x W | kernel | implementation | median us | TFLOP/s | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in args.shapes.split(","):
        if s not in SHAPES:
            raise SystemExit(f"conv_probe: --shapes: unknown {s!r} (known: {', '.join(SHAPES)})")
        shape = (SMALL if args.small else SHAPES)[s]
        T, N, C, O, H, W = shape
        for kind, name, us, tflops, e in rows(shape, args.device, args.reps):
            print(f"| {s} | {T} | {N} | {C} -> {O} | {H} x {W} | {kind} | {name} | {us:.1f} | {tflops:.2f} | "
                  f"{e:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
