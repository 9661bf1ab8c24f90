"""The issues' GPU targets against the benchmark JSONs of one gpu_check run: for each target, the
fastest fastmeta row that meets the accuracy bound and its ratio to the baseline the issue names,
each ratio taken within one JSON file (one bench invocation, so one run on one warm card).

    python benchmarks/targets.py LOG_DIR     (gpu_check.sh's logs: bench_*.json)

Issue 4 (sine MLP, S=5): T=25 >= 10x torch.compile, >= 2x vmap in a CUDA graph, >= 300x the loop,
T=1000 >= 10x torch.compile, first and second order. Issue 5: Omniglot T=32 S=1 second order
>= 50x the loop and >= 2x torch.compile; mini-ImageNet T=32 S=5 second order >= 3x vmap with peak
memory <= 2x the loop's. Meta-gradients within 1e-4 of the loop's where the loop ran (mini-ImageNet:
float32 is ill-conditioned there, so its error column is reported, not bounded). The vmap and
torch.compile baselines take each task's grad inside the vmap; where a file also has their
grad-outside form (vmap_gv, compile_gv, vmap_graph_gv: wrong through BatchNorm, right for the sine
MLP), the faster of the two forms is the baseline, its name and its own error against the loop
shown beside the ratio.
"""
import glob
import json
import os
import sys

ERR_BOUND = 1e-4


def _rows(path):
    with open(path) as f:
        data = json.load(f)
    return [r for r in data.get("results", []) if r.get("median_ms") is not None]


def _ours(rows, workload, order, tasks, check_err=True):
    out = [r for r in rows if r["workload"] == workload and r["order"] == order and r["tasks"] == tasks
           and r["provider"].startswith("fastmeta")]
    if check_err:
        out = [r for r in out if r.get("max_rel_err") is None or r["max_rel_err"] <= ERR_BOUND]
    return out


def _base(rows, workload, order, tasks, provider):
    hits = [r for r in rows if r["workload"] == workload and r["order"] == order and r["tasks"] == tasks
            and r["provider"] == provider]
    return hits[0] if hits else None


def _err(r):
    e = r.get("max_rel_err")
    return "-" if e is None else f"{e:.1e}"


def _base_err(r):
    """'; <baseline>'s err X' for a baseline row whose meta-gradient was compared with the loop's."""
    e = r.get("max_rel_err")
    return "" if e is None or r["provider"] == "loop" else f"; {r['provider']}'s err {e:.1e}"


def _fastest_form(rows, workload, order, tasks, provider):
    """The faster of a vmap baseline's two forms in the file (provider and provider_gv; the loop alone
    for 'loop'), or None."""
    names = (provider,) if provider == "loop" else (provider, provider + "_gv")
    forms = [r for r in (_base(rows, workload, order, tasks, n) for n in names) if r]
    return min(forms, key=lambda r: r["median_ms"]) if forms else None


def evaluate(files):
    """[(target, file, best provider, measured, met)] over the given bench JSON files."""
    lines = []
    for path in files:
        rows = _rows(path)
        name = os.path.basename(path)
        for order in ("second", "first"):
            for tasks, wants in ((25, (("compile", 10), ("vmap_graph", 2), ("loop", 300))), (1000, (("compile", 10),))):
                ours = _ours(rows, "sine", order, tasks)
                for base_name, want in wants:
                    base = _fastest_form(rows, "sine", order, tasks, base_name)
                    if base and ours:
                        best = min(ours, key=lambda r: r["median_ms"])
                        ratio = base["median_ms"] / best["median_ms"]
                        via = f" {base['provider']}" if base["provider"] != base_name else ""
                        lines.append((f"#4 sine T={tasks} {order}: >= {want}x {base_name}", name, best["provider"],
                                      f"{ratio:.2f}x ({best['median_ms']:.3f} vs{via} {base['median_ms']:.3f} ms)",
                                      ratio >= want))
        ours = _ours(rows, "omniglot", "second", 32)
        for base_name, want in (("loop", 50), ("compile", 2)):
            base = _fastest_form(rows, "omniglot", "second", 32, base_name)
            if base and ours:
                best = min(ours, key=lambda r: r["median_ms"])
                ratio = base["median_ms"] / best["median_ms"]
                via = f" {base['provider']}" if base["provider"] != base_name else ""
                lines.append((f"#5 omniglot T=32 second: >= {want}x {base_name}", name, best["provider"],
                              f"{ratio:.2f}x ({best['median_ms']:.1f} vs{via} {base['median_ms']:.1f} ms)"
                              + _base_err(base), ratio >= want))
        loop = _base(rows, "miniimagenet", "second", 32, "loop")
        vmap = _fastest_form(rows, "miniimagenet", "second", 32, "vmap")
        if loop and vmap and loop.get("peak_mem_mb") and vmap["median_ms"]:
            lean = [r for r in _ours(rows, "miniimagenet", "second", 32, check_err=False)
                    if r.get("peak_mem_mb") is not None and r["peak_mem_mb"] <= 2 * loop["peak_mem_mb"]]
            if lean:
                best = min(lean, key=lambda r: r["median_ms"])
                ratio = vmap["median_ms"] / best["median_ms"]
                lines.append(("#5 mini-ImageNet T=32 second: >= 3x vmap at <= 2x the loop's peak", name,
                              best["provider"], f"{ratio:.2f}x {vmap['provider']} ({best['median_ms']:.0f} vs "
                              f"{vmap['median_ms']:.0f} "
                              f"ms) at {best['peak_mem_mb'] / loop['peak_mem_mb']:.2f}x the loop's peak "
                              f"(err {_err(best)})" + _base_err(vmap), ratio >= 3))
            else:
                lines.append(("#5 mini-ImageNet T=32 second: >= 3x vmap at <= 2x the loop's peak", name, "-",
                              "no fastmeta row within 2x the loop's peak", False))
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        raise SystemExit("usage: python benchmarks/targets.py LOG_DIR (a directory of bench_*.json)")
    files = sorted(glob.glob(os.path.join(argv[0], "bench_*.json")))
    lines = evaluate(files)
    print(f"| target | run (file) | best fastmeta row (err <= {ERR_BOUND:g}) | measured | met |")
    print("|---|---|---|---|---|")
    for target, name, prov, measured, met in lines:
        print(f"| {target} | {name} | {prov} | {measured} | {'yes' if met else 'no'} |")
    if not lines:
        print("| (no bench JSON with a target's rows) | - | - | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
