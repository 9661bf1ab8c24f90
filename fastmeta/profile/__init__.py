"""``python -m fastmeta.profile`` and ``fastmeta.profile(...)``: where a meta-iteration's time goes.

Per-phase wall time of each meta-iteration (inner forward, inner backward, update, query forward,
the fused inner loop where it runs, outer backward), from torch.profiler ``record_function`` ranges
that fastmeta's paths and the harness's loops mark (NVTX ranges too on CUDA); the number of ATen op
calls and of GPU kernel launches per iteration; peak memory; the hottest ops; a Chrome trace.

On a user's own loop::

    with fastmeta.profile(trace="trace.json") as prof:
        for _ in range(3):
            with prof.iteration():
                with prof.phase("inner_forward"):
                    ...
    print(prof.table())

Time inside an iteration that no phase covers is reported as ``other``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as _torch_profile

from .. import _phases
from .._phases import PHASES


class Profile:
    """Context manager around user code; see the module docstring."""

    def __init__(self, trace: str | None = None, device: str | None = None, top: int = 10):
        self.trace_path = trace
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.top = top
        self.iter_times: list[float] = []
        self._prof = None
        self._summary = None

    # -- user-facing ----------------------------------------------------------------------------
    def __enter__(self):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        _phases._nvtx["on"] = self.device == "cuda"
        self._prof = _torch_profile(activities=acts, profile_memory=True, record_shapes=False)
        self._prof.__enter__()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        _phases._nvtx["on"] = False
        if self.trace_path:
            self._prof.export_chrome_trace(self.trace_path)
        return False

    @contextlib.contextmanager
    def iteration(self):
        """Marks one meta-iteration (synchronized on CUDA so its wall time is real)."""
        self._sync()
        t0 = time.perf_counter()
        with torch.autograd.profiler.record_function("fastmeta.iteration"):
            yield
            self._sync()
        self.iter_times.append((time.perf_counter() - t0) * 1e3)

    def phase(self, name: str):
        """Marks a phase of the user's own loop (any name; the standard ones are PHASES)."""
        return _phases.phase(name)

    # -- results --------------------------------------------------------------------------------
    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def summary(self) -> dict:
        if self._summary is not None:
            return self._summary
        events = self._prof.events()
        n = max(len(self.iter_times), 1)
        iters = [e for e in events if e.name == "fastmeta.iteration"]
        phase_ms: dict[str, float] = {}
        for e in events:
            if e.name.startswith("fastmeta.") and e.name != "fastmeta.iteration":
                name = e.name.split(".", 1)[1]
                phase_ms[name] = phase_ms.get(name, 0.0) + e.time_range.elapsed_us() / 1e3
        # nested ranges (e.g. MAML.adapt's phases inside a user's phase) count once: the outer one
        nested = self._nested_phase_ms(events)
        for name, ms in nested.items():
            phase_ms[name] -= ms
        phase_ms = {k: v / n for k, v in phase_ms.items() if v > 0}
        total = statistics.median(self.iter_times) if self.iter_times else sum(phase_ms.values())
        mean_total = (sum(e.time_range.elapsed_us() for e in iters) / 1e3 / n) if iters else total
        other = max(mean_total - sum(phase_ms.values()), 0.0)
        aten = [e for e in events if e.name.startswith("aten::")]
        top_level_ops = sum(1 for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        peak = None
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = self._cpu_peak_mb_of(self._prof)
            # (the fused op's phase marks every path to it, the C++ bindings that skip the dispatcher too)
            if any(e.name == "fastmeta.fused_inner_loop" or e.name.startswith("fastmeta::mlp_") for e in events):
                try:  # the fused CPU kernel's per-thread workspaces are not tensors
                    from .. import _C
                    peak = (peak or 0.0) + _C.workspace_bytes() / 2**20
                except ImportError:
                    pass
        ka = self._prof.key_averages()
        if self.device == "cuda":  # kernels' own GPU time (older torch: self_cuda_time_total)
            key = "self_device_time_total"
            if ka and not hasattr(ka[0], key):
                key = "self_cuda_time_total"
        else:
            key = "self_cpu_time_total"
        hot = sorted(ka, key=lambda k: getattr(k, key, 0), reverse=True)
        hot = [(k.key, getattr(k, key, 0) / 1e3 / n, k.count / n) for k in hot
               if not k.key.startswith("fastmeta.") and not k.key.startswith("ProfilerStep")][: self.top]
        self._summary = {
            "iterations": len(self.iter_times), "median_ms": total, "mean_ms": mean_total,
            "phases_ms": phase_ms, "other_ms": other, "op_calls": top_level_ops / n,
            "kernel_launches": launches / n, "peak_mem_mb": peak, "hot": hot, "device": self.device,
        }
        return self._summary

    @staticmethod
    def _nested_phase_ms(events) -> dict:
        out: dict[str, float] = {}
        for e in events:
            if not e.name.startswith("fastmeta.") or e.name == "fastmeta.iteration":
                continue
            p = e.cpu_parent
            while p is not None:
                if p.name.startswith("fastmeta.") and p.name != "fastmeta.iteration":
                    name = e.name.split(".", 1)[1]
                    out[name] = out.get(name, 0.0) + e.time_range.elapsed_us() / 1e3
                    break
                p = p.cpu_parent
        return out

    @staticmethod
    def _cpu_peak_mb_of(prof) -> float | None:
        """Peak of the running sum of CPU allocations minus frees over a profile, in MiB: from every
        allocation and free the profiler recorded (its raw memory records, each with its time and
        size), so that a tensor made and freed inside one op or one backward function counts while
        it lives. Where those records are not at hand (a torch without them), the op-level
        estimate _cpu_peak_mb, which can miss such transients."""
        try:
            raw = prof.profiler.kineto_results.events()
        except AttributeError:
            return Profile._cpu_peak_mb(prof.events())
        records = []
        for e in raw:
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"):
                records.append((e.start_ns(), -e.nbytes(), e.nbytes()))  # allocations first at a tie
        if not records:
            return None
        cur = peak = 0
        for _, _, delta in sorted(records):
            cur += delta
            peak = max(peak, cur)
        return peak / 2**20

    @staticmethod
    def _cpu_peak_mb(events) -> float | None:
        """Peak of the running sum of CPU allocations minus frees seen by the profiler's events
        (each op's own net allocation, plus the frees it records as '[memory]' events), in MiB: an
        estimate that misses what is made and freed inside one op, and that counts an enclosing
        scope's net frees at its start (_cpu_peak_mb_of is exact)."""
        records = []
        for e in events:
            delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
            if delta:
                records.append((e.time_range.start, delta))
        if not records:
            return None
        cur = peak = 0
        for _, delta in sorted(records):
            cur += delta
            peak = max(peak, cur)
        return peak / 2**20

    def table(self) -> str:
        s = self.summary()
        lines = [f"meta-iteration on {s['device']}: median {s['median_ms']:.3f} ms over {s['iterations']} "
                 f"iterations (mean {s['mean_ms']:.3f} ms)",
                 f"{'phase':<20} {'ms/iter':>10} {'share':>7}"]
        names = [p for p in PHASES if p in s["phases_ms"]] + [p for p in s["phases_ms"] if p not in PHASES]
        for name in names + ["other"]:
            ms = s["other_ms"] if name == "other" else s["phases_ms"][name]
            lines.append(f"{name:<20} {ms:>10.3f} {100 * ms / max(s['mean_ms'], 1e-9):>6.1f}%")
        lines.append(f"ATen op calls per iteration: {s['op_calls']:.0f}; GPU kernel launches per iteration: "
                     f"{s['kernel_launches']:.0f}")
        if s["peak_mem_mb"] is not None:
            lines.append(f"peak memory: {s['peak_mem_mb']:.1f} MiB")
        lines.append("hottest ops (self time ms/iter, calls/iter):")
        for name, ms, calls in s["hot"]:
            lines.append(f"  {name[:48]:<48} {ms:>9.3f} {calls:>8.1f}")
        if self.trace_path:
            lines.append(f"chrome trace: {self.trace_path}")
        return "\n".join(lines)


def profile(trace: str | None = None, device: str | None = None, top: int = 10) -> Profile:
    """A profiler around user code: ``with fastmeta.profile() as prof: ... prof.iteration() ...``."""
    return Profile(trace=trace, device=device, top=top)


class _CallableModule(type(sys)):
    """Lets ``fastmeta.profile(...)`` call :func:`profile` although ``fastmeta.profile`` is also
    this module (the one ``python -m fastmeta.profile`` runs)."""

    def __call__(self, *args, **kwargs):
        return profile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def main(argv=None) -> int:
    from .. import harness as H

    ap = argparse.ArgumentParser(prog="python -m fastmeta.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="sine", choices=["sine", "omniglot", "miniimagenet"])
    ap.add_argument("--provider", default="fastmeta", help="fastmeta[-backend], maml, loop, vmap, ...")
    ap.add_argument("--order", default="second", choices=["first", "second"])
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--trace", default="fastmeta_profile.trace.json", help="Chrome trace output ('' for none)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--tf32", action="store_true",
                    help="let matmuls and cuDNN convolutions use TF32 (off by default, as in python -m fastmeta.bench)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True (as the bench's flag of that name)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = H.precision_settings(tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    why = H.provider_available(args.provider, device)
    if why:
        ap.error(f"--provider {args.provider}: {why}")
    tasks = args.tasks or (25 if args.workload == "sine" else (32 if device == "cuda" else 4))
    w = H.make_workload(args.workload, tasks=tasks, steps=args.steps, device=device)
    step = H.make_step(args.provider, w, args.order == "first")
    step()  # warm-up (build, JIT, compile) outside the profile
    with profile(trace=args.trace or None, device=device) as prof:
        for _ in range(args.iterations):
            with prof.iteration():
                step()
    if args.json:
        print(json.dumps(dict(prof.summary(), settings=settings), indent=1, default=str))
    else:
        print(f"{args.workload}, T={w.tasks}, S={w.steps}, {args.order} order, provider {args.provider}"
              + (f", {settings}" if device == "cuda" or args.tf32 or args.cudnn_benchmark else ""))
        print(prof.table())
    return 0

