"""Where the time of the fused GPU MLP path goes: the kernel's own device time (torch.profiler),
the op's time per call back to back (CUDA events), the host's time to issue one call, one whole
BatchedMAML meta-iteration (loss and torch.autograd.grad) and one BatchedMAML.value_and_grad, for
the sine workload (1-40-40-1, K=Q=10, S=5, float32).

    python benchmarks/gpu_probe.py [--tasks 25,1000] [--backends cuda,cuda-s0,cuda-t256,cuda-o8,triton]
                                   [--ncu-target B,T]

A CUDA backend may carry settings of its kernel: -sN forces the placement of a task's slots
(FASTMETA_CUDA_MLP_SMEM=N: 0 global memory, 1 working set in shared memory, 2 all in shared memory;
without it the binding chooses), -tN the threads a block (FASTMETA_CUDA_MLP_THREADS; by default
256 when T <= the SM count, else 128), -o8 the kernel built for eight 128-thread blocks an SM
(FASTMETA_CUDA_MLP_OCC=8: 64 registers, a few hundred bytes of spills).

--ncu-target runs just a few calls of one configuration (second order), for an ncu run to profile.
"""
import argparse
import os
import statistics
import time

import torch

import fastmeta
from fastmeta import harness as H, ops

ACTS = ["relu", "relu", None]
SETTINGS = {"s": "FASTMETA_CUDA_MLP_SMEM", "t": "FASTMETA_CUDA_MLP_THREADS", "o": "FASTMETA_CUDA_MLP_OCC"}


def variant(backend):
    """The backend's name; its -sN / -tN / -oN settings go to the environment the CUDA binding
    reads."""
    name, *settings = backend.split("-")
    os.environ["FASTMETA_CUDA_MLP_SMEM"] = "auto"
    os.environ["FASTMETA_CUDA_MLP_THREADS"] = ""
    os.environ["FASTMETA_CUDA_MLP_OCC"] = "0"
    for st in settings:
        key = SETTINGS.get(st[:1])
        if key is None or not st[1:].isdigit():
            raise SystemExit(f"gpu_probe: unknown setting {st!r} in {backend!r} (expected -sN, -tN or -oN)")
        os.environ[key] = st[1:]
    return name


def raw_call(w, backend, first_order):
    params = [p.detach() for p in w.model.parameters()]
    backend = variant(backend)

    def call():
        with fastmeta.use_backend(backend), torch.no_grad():
            return ops.mlp_inner_loop(w.xs, w.ys, w.xq, w.yq, params, w.inner_lr, w.steps, ACTS, 0.01, "mse",
                                      first_order)
    return call


def kernel_us(call, n=20):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(n):
            call()
        torch.cuda.synchronize()
    ka = [k for k in prof.key_averages() if "mlp_inner_loop" in k.key]
    key = "self_device_time_total" if ka and hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    return sum(getattr(k, key) for k in ka) / n, [k.key for k in ka]


def events_us(call, n=50):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        call()
    end.record()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3, host


def step_us(w, backend, first_order, n=100, provider="fastmeta"):
    step = H.make_step(f"{provider}-{variant(backend)}", w, first_order)
    for _ in range(5):
        step()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="25,1000")
    ap.add_argument("--backends", default="cuda,cuda-s0,cuda-s1,cuda-t64,cuda-t128,cuda-t256,cuda-t32,cuda-o8,cuda-o8-t64,triton")
    ap.add_argument("--ncu-target", default=None, help="BACKEND,T: a few calls for ncu to profile")
    args = ap.parse_args()
    H.precision_settings(tf32=False)
    if args.ncu_target:
        backend, T = args.ncu_target.rsplit(",", 1)
        call = raw_call(H.make_workload("sine", tasks=int(T), device="cuda"), backend, False)
        for _ in range(4):
            call()
        torch.cuda.synchronize()
        return
    print("| T | order | backend | kernel us | op us (back to back) | host us per call | meta-iteration us "
          "| value_and_grad us |")
    print("|---|---|---|---|---|---|---|---|")
    for T in [int(t) for t in args.tasks.split(",")]:
        w = H.make_workload("sine", tasks=T, device="cuda")
        for first_order in (False, True):
            for backend in args.backends.split(","):
                call = raw_call(w, backend, first_order)
                for _ in range(3):
                    call()
                k, names = kernel_us(call)
                op, host = events_us(call)
                st = step_us(w, backend, first_order)
                vg = step_us(w, backend, first_order, provider="fastmeta_vg")
                order = "first" if first_order else "second"
                print(f"| {T} | {order} | {backend} | {k:.1f} | {op:.1f} | {host:.1f} | {st:.1f} | {vg:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
