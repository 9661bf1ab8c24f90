"""``python -m fastmeta.bench``: the provider x workload x order matrix through fastmeta.harness.

Prints medians, the ratio of each provider's time to the naive loop's and to torch.compile's (how
many times faster fastmeta-style rows are), peak memory (CUDA) and first-call time (compilation /
JIT, reported separately). Sized for the machine: on a CPU the conv workload runs with fewer tasks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from . import harness as H


def _progress(i, n, label, t0):
    width = 24
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {time.perf_counter() - t0:6.1f}s {label:<40}")
    sys.stderr.flush()


def _row_line(r, prefix=""):
    sys.stderr.write(f"row {r.workload}/{r.order}/T{r.tasks}/{r.provider}: " + (
        r.error or f"{prefix}median {r.median_ms:.3f} ms, first call {r.first_call_ms:.0f} ms, "
        f"peak {r.peak_mem_mb} MB, max rel err {r.max_rel_err}") + "\n")
    sys.stderr.flush()


def default_tasks(workload: str, device: str) -> int:
    if device == "cuda":
        return {"sine": 25, "omniglot": 32, "miniimagenet": 32}[workload]
    return {"sine": 25, "omniglot": 8, "miniimagenet": 2}[workload]


def run_matrix(workloads, orders, providers, device, tasks=None, steps=None, reps=10, max_seconds=8.0,
               progress=True, dtype=torch.float32, min_seconds=1.0, reference="loop", interleave=("sine",)):
    """providers: a list, or None for each workload's default set (harness.default_providers).
    reference: what each row's max rel err is measured against: 'loop' (the first row's meta-gradient,
    the naive loop where it runs) or 'float64' (the naive loop on a float64 copy of the workload, run
    once untimed: how far each row, the loop's own included, is from the exact answer).
    interleave: the workloads whose rows of one order are timed together, in rounds
    (harness.time_interleaved), once each is built, checked and measured for memory: their ratios
    then come from the same minutes of the machine. Every row's step stays alive until its group is
    timed, so it is meant for small workloads (default: sine)."""
    if reference not in ("loop", "float64"):
        raise ValueError(f"reference: expected 'loop' or 'float64', got {reference!r}")
    jobs, explicit = [], providers is not None
    for w in workloads:
        provs = providers if explicit else H.default_providers(w, device)
        # the naive loop runs first where present: it is the reference of every row's max rel err
        provs = sorted(provs, key=lambda p: p != "loop")
        jobs += [(w, o, p) for o in orders for p in provs]
    results, t0 = [], time.perf_counter()
    refs = {}
    kept, group = {}, None  # the steps of the group being built for an interleaved timing

    def time_group():
        if kept:  # (a group of one row too: its warm-up calls alone are no timing)
            timed = H.time_interleaved(kept, device, seconds=min_seconds, min_calls=reps, max_seconds=max_seconds)
            for j, r in enumerate(results):
                if (r.workload, r.order) == group and r.provider in timed:
                    med, times, error = timed[r.provider]
                    if error is not None:
                        error = f"failed in the interleaved timing: {error}"
                    results[j] = dataclasses.replace(r, median_ms=med, reps=len(times), interleaved=True,
                                                     error=error)
                    if not progress:
                        _row_line(results[j], "timed with its group: ")
        kept.clear()

    for i, (wname, order, prov) in enumerate(jobs):
        if (wname, order) != group:
            time_group()
            group = (wname, order)
        together = wname in interleave
        if progress:
            _progress(i, len(jobs), f"{wname}/{order}/{prov}", t0)
        why = H.provider_available(prov, device) or (None if explicit else H.default_skip(prov, wname, device))
        T = tasks or default_tasks(wname, device)
        w = H.make_workload(wname, tasks=T, steps=steps, device=device, dtype=dtype)
        if reference == "float64" and (wname, order) not in refs:
            w64 = H.make_workload(wname, tasks=T, steps=steps, device=device, dtype=torch.float64)
            refs[(wname, order)] = [g.detach() for g in H.make_step("loop", w64, order == "first")()]
        if why is not None:
            results.append(H.Result(wname, order, prov, T, w.steps, None, None, None, 0, f"skipped: {why}"))
            continue
        # rows timed together later are timed here only for a few calls (their memory and error
        # are measured here)
        r, grads = H.run_one(prov, w, order == "first", reps=3 if together else reps, max_seconds=max_seconds,
                             reference=refs.get((wname, order)), min_seconds=0 if together else min_seconds,
                             keep=kept if together else None)
        if grads is not None and (wname, order) not in refs:
            refs[(wname, order)] = [g.detach() for g in grads]
        results.append(r)
        if not progress:  # one line per finished row, so a run cut short still reports what it measured
            _row_line(r, "built (timed with its group next), warm-up " if together and r.error is None else "")
    time_group()
    if progress:
        _progress(len(jobs), len(jobs), "done", t0)
        sys.stderr.write("\n")
    return results


def table(results) -> str:
    by = {(r.workload, r.order, r.provider): r for r in results}
    rows = ["| workload | order | T | S | provider | median ms | x vs loop | x vs compile | first call ms | peak MB | max rel err |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        loop = by.get((r.workload, r.order, "loop"))
        comp = by.get((r.workload, r.order, "compile"))
        def ratio(base):
            if base is None or base.median_ms is None or r.median_ms is None:
                return "-"
            return f"{base.median_ms / r.median_ms:.2f}"
        med = f"{r.median_ms:.3f}" if r.median_ms is not None else (r.error or "-")
        rows.append(f"| {r.workload} | {r.order} | {r.tasks} | {r.steps} | {r.provider} | {med} | {ratio(loop)} | "
                    f"{ratio(comp)} | {r.first_call_ms:.0f} | " if r.median_ms is not None else
                    f"| {r.workload} | {r.order} | {r.tasks} | {r.steps} | {r.provider} | {med} | - | - | - | ")
        rows[-1] += (f"{r.peak_mem_mb:.1f}" if r.peak_mem_mb is not None else "-") + " | " + \
            (f"{r.max_rel_err:.1e}" if r.max_rel_err is not None else "-") + " |"
    return "\n".join(rows)


def _cpu_name() -> str:
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import platform
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    return (f"{dev}; {torch.get_num_threads()} threads; torch {torch.__version__}; triton {tv}; "
            f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.workload, r.order) for r in results})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, (w, o) in zip(axes[0], groups):
        rows = [r for r in results if r.workload == w and r.order == o and r.median_ms]
        loop = next((r.median_ms for r in rows if r.provider == "loop"), None)
        if loop is None:
            continue
        ax.bar([r.provider for r in rows], [loop / r.median_ms for r in rows])
        ax.set_yscale("log")
        ax.set_title(f"{w} {o} order: x vs loop")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmeta.bench", description=__doc__)
    ap.add_argument("--workload", default=None, help="comma list of sine,omniglot,miniimagenet (default: all "
                    "three; on a CPU the conv workloads with fewer tasks)")
    ap.add_argument("--order", default="second,first", help="comma list of first,second")
    ap.add_argument("--providers", default=None, help="comma list, e.g. fastmeta,fastmeta-torch,loop,vmap,"
                    "compile (default: per workload and device, see fastmeta.harness.default_providers)")
    ap.add_argument("--tasks", type=int, default=None, help="meta-batch size T (default: per workload/device)")
    ap.add_argument("--steps", type=int, default=None, help="inner steps S (default: per workload)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per row, at least")
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="a fast row keeps being timed for this long (2000 calls at most)")
    ap.add_argument("--max-seconds", type=float, default=8.0, help="time budget per row")
    ap.add_argument("--json", default=None, help="write the results as JSON to this file")
    ap.add_argument("--plot", default=None, help="write a bar chart of ratios (needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="the workloads' dtype (float64: the meta-gradients' agreement without rounding)")
    ap.add_argument("--reference", default="loop", choices=["loop", "float64"],
                    help="max rel err against the first row (the loop where it runs) or against the loop "
                         "in float64 (the exact answer; the loop's own row then shows float32's floor)")
    ap.add_argument("--interleave", default="sine",
                    help="comma list of workloads whose rows of one order are timed together, in rounds of "
                         "back-to-back calls of each (so a slower or faster spell of the machine falls on all "
                         "of them alike); 'none' times each row on its own (default: sine)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True for every provider (cuDNN picks its "
                         "convolution algorithms by timing them on first use)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workloads = args.workload.split(",") if args.workload else ["sine", "omniglot", "miniimagenet"]
    orders = args.order.split(",")
    for o in orders:
        if o not in ("first", "second"):
            ap.error(f"--order: expected first and/or second, got {o!r}")
    providers = args.providers.split(",") if args.providers else None
    if device == "cuda" or args.cudnn_benchmark:
        H.precision_settings(tf32=False, cudnn_benchmark=args.cudnn_benchmark)
    results = run_matrix(workloads, orders, providers, device, args.tasks, args.steps, args.reps,
                         args.max_seconds, progress=not args.no_progress, min_seconds=args.min_seconds,
                         dtype=getattr(torch, args.dtype), reference=args.reference,
                         interleave=() if args.interleave == "none" else tuple(args.interleave.split(",")))
    print(f"machine: {machine()}" + (", cudnn.benchmark on" if args.cudnn_benchmark else "")
          + (f", {args.dtype}" if args.dtype != "float32" else "")
          + (", max rel err against the loop in float64" if args.reference == "float64" else ""))
    together = sorted({f"{r.workload} {r.order}" for r in results if r.interleaved})
    if together:
        print("timed together, in rounds (medians of interleaved batches of calls): " + ", ".join(together))
    print(table(results))
    if args.reference == "loop" and args.dtype == "float32" and any(
            r.workload == "miniimagenet" and r.max_rel_err is not None for r in results):
        print("(mini-ImageNet: its float32 meta-gradient is ill-conditioned, at S=5 the loop's own ~1e-1 from the "
              "float64 answer, so its rows' max rel err against the float32 loop is mostly rounding; --reference "
              "float64 shows how far each row, the loop's included, is from that answer)")
    wrong = sorted({r.provider for r in results if r.provider in ("vmap_gv", "compile_gv", "vmap_graph_gv")
                    and r.order == "second" and r.workload != "sine"})
    if wrong:
        print(f"({', '.join(wrong)}: grad of the vmapped query losses; through BatchNorm in training mode torch.func "
              "gets that second-order meta-gradient wrong (the batching of batch_norm's backward, "
              "pytorch/functorch#534), so these rows time a wrong answer; vmap / compile take each task's grad "
              "inside the vmap)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    failed = [r for r in results if r.error and not r.error.startswith("skipped")]
    return 1 if failed and all(r.median_ms is None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
