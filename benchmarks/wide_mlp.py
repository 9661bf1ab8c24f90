"""The fused CPU MLP kernel on wide MLPs (classification, 32 -> h -> h -> 5, cross-entropy, S=5
inner steps), three tables, each timed in one process with its alternatives interleaved in rounds:

- `panels`: the products' loop order, row blocks outermost against column panels outermost
  above 4 MB of B operand (fastmeta._C._mlp_panel_bytes), T=16 (two groups of SIMD lanes, one
  a thread);
- `split`: a meta-batch of one group (T=8 with 8 float lanes) on one thread against two, whose
  large products then share their column panels;
- `backends`: value_and_grad on the cpp backend (the fused kernel) against the torch backend
  (batched per-task matrix products, oneDNN / MKL on every core);
- `auto`: the auto request beside both, where a meta-batch fills few of the kernel's lanes (the
  auto choice then takes the batched ops where they are expected 1.5x faster) and where it fills
  them;
- `gpu` (with --device cuda): the CUDA kernel (one thread block a task) against the batched torch
  ops (cuBLAS) from 128 to 1024 wide, few tasks and many.

    python benchmarks/wide_mlp.py [--tables panels,split,backends,auto] [--rounds 3]
    python benchmarks/wide_mlp.py --device cuda          (the gpu table)
                                  [--small]   (tiny widths: the script's own check)
"""
import argparse
import statistics
import time

import torch
from torch import nn

import fastmeta


def step(widths, T, K, S, first_order, backend, device="cpu"):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    xs, xq = torch.randn(T, K, widths[0], device=device), torch.randn(T, K, widths[0], device=device)
    ys = torch.randint(0, widths[-1], (T, K), device=device)
    yq = torch.randint(0, widths[-1], (T, K), device=device)
    meta = fastmeta.BatchedMAML(model, 0.1, S, first_order=first_order, loss="cross_entropy", backend=backend)
    def call():  # (on the GPU a call's time is its work's: wait for it)
        out = meta.value_and_grad(xs, ys, xq, yq)
        if device != "cpu":
            torch.cuda.synchronize()
        return out
    call.meta = meta  # (whether its last call ran the fused op: call.meta._last_fused)
    return call


def interleaved(variants, rounds):
    """{name: median ms} of the callables in variants ({name: (setup, call)}), timed in rounds."""
    for setup, f in variants.values():
        setup()
        f()
    setup, f = next(iter(variants.values()))
    setup()
    t0 = time.perf_counter()
    f()
    n = max(1, min(20, int(0.5 / (time.perf_counter() - t0))))
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (setup, f) in variants.items():
            setup()
            for _ in range(n):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default="panels,split,backends,auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="tiny widths, one round")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    if args.device == "cuda":
        return gpu_table(args.rounds)
    if args.small:
        args.rounds = 1
    from fastmeta import _C
    threads = torch.get_num_threads()
    default = _C._mlp_panel_bytes()
    order = lambda b: (lambda: _C._mlp_panel_bytes(b))  # noqa: E731
    nothing = lambda: None  # noqa: E731
    tables = args.tables.split(",")
    print(f"torch {torch.__version__}, {threads} threads")
    if "panels" in tables:
        print("\n| widths | T | K=Q | order | row blocks ms | panels above 4 MB ms | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for h in (16,) if args.small else (256, 384, 512, 768):
            for K in (10, 25):
                for fo in (False, True):
                    f = step((32, h, h, 5), 16, K, 5, fo, "cpp")
                    r = interleaved({"rows": (order(-1), f), "panels": (order(default), f)}, args.rounds)
                    _C._mlp_panel_bytes(default)
                    print(f"| 32-{h}-{h}-5 | 16 | {K} | {'first' if fo else 'second'} | {r['rows']:.2f} | "
                          f"{r['panels']:.2f} | {r['rows'] / r['panels']:.2f}x |", flush=True)
    if "split" in tables and threads > 1:
        print("\n| widths | T | K=Q | order | 1 thread ms | 2 threads ms | speed-up |\n|---|---|---|---|---|---|---|")
        for h, K in ((16, 10),) if args.small else ((40, 10), (64, 25), (96, 15), (128, 10), (256, 10), (512, 25)):
            for fo in (False, True):
                f = step((32, h, h, 5), 8, K, 5, fo, "cpp")
                r = interleaved({1: (lambda: torch.set_num_threads(1), f), 2: (lambda: torch.set_num_threads(2), f)},
                                args.rounds)
                torch.set_num_threads(threads)
                print(f"| 32-{h}-{h}-5 | 8 | {K} | {'first' if fo else 'second'} | {r[1]:.2f} | {r[2]:.2f} | "
                      f"{r[1] / r[2]:.2f}x |", flush=True)
    if "backends" in tables:
        kernel_vs_ops(args.rounds, ((16, 4, 10),) if args.small else (
            (128, 8, 10), (256, 4, 25), (256, 8, 10), (512, 4, 25), (512, 8, 25), (512, 16, 25), (768, 16, 10)))
    if "auto" in tables:
        from fastmeta.ops.mlp_inner_loop import cpu_lanes
        print(f"\n{cpu_lanes(torch.float32)} float32 lanes a group")
        print("| widths | T | K=Q | order | auto takes | auto ms | cpp ms | torch ms | auto vs cpp |")
        print("|---|---|---|---|---|---|---|---|---|")
        shapes = ((16, 1, 10),) if args.small else ((40, 1, 10), (64, 1, 25), (128, 1, 25), (192, 2, 25), (256, 1, 10),
                                                    (256, 4, 25), (384, 1, 10), (384, 4, 25), (512, 2, 10),
                                                    (512, 4, 25), (512, 8, 25), (768, 1, 5), (512, 16, 25))
        for h, T, K in shapes:
            for fo in (False, True):
                fs = {b: step((32, h, h, 5), T, K, 5, fo, b) for b in ("auto", "cpp", "torch")}
                r = interleaved({b: (nothing, f) for b, f in fs.items()}, args.rounds)
                takes = "cpp" if fs["auto"].meta._last_fused else "torch"  # (what the auto step ran)
                print(f"| 32-{h}-{h}-5 | {T} | {K} | {'first' if fo else 'second'} | {takes} | {r['auto']:.2f} | "
                      f"{r['cpp']:.2f} | {r['torch']:.2f} | {r['cpp'] / r['auto']:.2f}x |", flush=True)


def kernel_vs_ops(rounds, shapes, kernel="cpp", device="cpu"):
    """A table row a shape (h, T, K) and order: the fused kernel's value_and_grad against the batched
    torch ops', interleaved, and the two meta-gradients' relative difference."""
    nothing = lambda: None  # noqa: E731
    print(f"\n| widths | T | K=Q | order | {kernel} ms | torch ms | {kernel} speed-up | meta-grad rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for h, T, K in shapes:
        for fo in (False, True):
            try:
                fk = step((32, h, h, 5), T, K, 5, fo, kernel, device)
                ft = step((32, h, h, 5), T, K, 5, fo, "torch", device)
                r = interleaved({kernel: (nothing, fk), "torch": (nothing, ft)}, rounds)
                diff = max(float((a - b).norm() / b.norm()) for a, b in zip(fk()[1], ft()[1]))
                print(f"| 32-{h}-{h}-5 | {T} | {K} | {'first' if fo else 'second'} | {r[kernel]:.2f} | "
                      f"{r['torch']:.2f} | {r['torch'] / r[kernel]:.2f}x | {diff:.1e} |", flush=True)
            except Exception as e:  # (a shape the kernel refuses, or out of memory: said, and on)
                print(f"| 32-{h}-{h}-5 | {T} | {K} | {'first' if fo else 'second'} | failed: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:150]} |", flush=True)


def gpu_table(rounds, device="cuda", kernel="cuda", shapes=None):
    """The CUDA kernel against the batched torch ops on the GPU (TF32 off, as the bench runs).
    (device="cpu", kernel="cpp" and tiny shapes: the same table on the CPU, the script's own check.)"""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    kernel_vs_ops(rounds, shapes or ((128, 4, 25), (256, 4, 25), (256, 32, 25), (512, 4, 25), (512, 32, 25),
                                     (512, 256, 10), (1024, 32, 10)), kernel, device)


if __name__ == "__main__":
    main()
