"""The benchmark harness, the bench / profile / info CLIs and the profiler."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastmeta
from conftest import requires_cpp
from fastmeta import harness as H
from fastmeta.profile import profile


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("workload,tasks,steps", [("sine", 3, 2), ("omniglot", 2, 1)])
@pytest.mark.parametrize("first_order", [False, True])
def test_providers_agree_on_the_meta_gradient(workload, tasks, steps, first_order):
    """Every CPU provider's meta-gradient equals the loop's (float64); Omniglot at its own S=1 (the
    conv path's several steps are tests/test_batched_maml.py's)."""
    w = H.make_workload(workload, tasks=tasks, steps=steps, dtype=torch.float64)
    names = ["loop", "fastmeta", "fastmeta-torch", "maml", "metasgd", "maml_pertensor", "vmap", "vmap_gv"]
    if workload == "sine" and H.provider_available("fastmeta-cpp", "cpu") is None:
        names.append("fastmeta-cpp")
    ref = None
    for name in names:
        r, grads = H.run_one(name, w, first_order, reps=1, warmup=0, reference=ref)
        assert r.error is None, f"{name}: {r.error}"
        assert r.median_ms > 0
        if ref is None:
            ref = grads
        elif name == "vmap_gv" and workload == "omniglot" and not first_order:
            # grad outside the vmap: torch.func's second-order meta-gradient through BatchNorm is
            # off by percents (functorch issue 534); the row runs and its error is shown
            assert r.max_rel_err is not None
        else:
            assert r.max_rel_err < 1e-9, f"{name} vs loop: {r.max_rel_err:.2e}"


def test_unknown_provider_and_workload():
    assert "unknown provider" in H.provider_available("nope", "cpu")
    assert H.provider_available("vmap_graph", "cpu") == "CUDA graphs need a GPU"
    with pytest.raises(ValueError, match="workload"):
        H.make_workload("cifar")
    for bad in ("fastmeta@0", "fastmeta@x", "loop@2", "fastmeta@"):
        assert "@N suffix" in H.provider_available(bad, "cpu"), bad
    assert H.provider_available("fastmeta_vg@3-torch", "cpu") is None


def test_chunked_provider_runs_chunks():
    """fastmeta@N: BatchedMAML(task_chunk=N) behind the provider, same meta-gradient as the loop."""
    w = H.make_workload("omniglot", tasks=3, device="cpu", dtype=torch.float64)
    got = H.make_step("fastmeta_vg@2-torch", w, False)()
    want = H.make_step("loop", w, False)()
    assert H.max_rel_err(list(got), list(want)) < 1e-9


def test_precision_suffix_sets_the_conv_precision_for_its_row(monkeypatch):
    """fastmeta...+tf32x3: FASTMETA_CONV_PRECISION=tf32x3 while the row is built and while each of its
    steps runs (and as it was otherwise); the suffix is for fastmeta's providers only."""
    assert H.provider_available("fastmeta_vg@2-cpp+tf32x3", "cpu") is None
    assert H._split("fastmeta_vg@2-cpp+tf32x3") == ("fastmeta_vg", 2, "cpp")
    assert "suffix is for" in H.provider_available("loop+tf32x3", "cpu")
    monkeypatch.delenv("FASTMETA_CONV_PRECISION", raising=False)
    seen = []
    monkeypatch.setitem(H.PROVIDERS, "fastmeta", lambda w, fo, backend, chunk: (
        seen.append(("built", os.environ.get("FASTMETA_CONV_PRECISION"))),
        lambda: seen.append(("step", os.environ.get("FASTMETA_CONV_PRECISION"))))[1])
    w = H.make_workload("sine", tasks=2)
    step = H.make_step("fastmeta+tf32x3", w, False)
    assert os.environ.get("FASTMETA_CONV_PRECISION") is None
    step()
    assert seen == [("built", "tf32x3"), ("step", "tf32x3")]
    assert os.environ.get("FASTMETA_CONV_PRECISION") is None
    H.make_step("fastmeta", w, False)()
    assert seen[2:] == [("built", None), ("step", None)]


def test_bench_cli_prints_table_and_json(tmp_path):
    out = tmp_path / "r.json"
    p = run_cli("fastmeta.bench", "--workload", "sine", "--tasks", "2", "--steps", "1", "--providers",
                "fastmeta,loop,vmap", "--reps", "2", "--order", "first", "--json", str(out), "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "| sine | first | 2 | 1 | fastmeta |" in p.stdout and "machine:" in p.stdout
    rows = json.loads(out.read_text())["results"]
    assert {r["provider"] for r in rows} == {"fastmeta", "loop", "vmap"}
    assert all(r["median_ms"] > 0 and r["interleaved"] for r in rows)
    assert "timed together, in rounds" in p.stdout
    bad = run_cli("fastmeta.bench", "--order", "third")
    assert bad.returncode == 2 and "--order" in bad.stderr


def test_interleaved_timing_takes_rounds_of_each_step():
    """harness.time_interleaved: batches of each step in turn (not one step's calls all before the
    next's), each step timed for at least its seconds and min_calls; the medians keep the steps'
    order of cost."""
    import time as _time
    calls = []

    def make(name, secs):
        def step():
            calls.append(name)
            _time.sleep(secs)
        return step

    out = H.time_interleaved({"slow": make("slow", 0.004), "fast": make("fast", 0.001)}, seconds=0.12,
                             min_calls=5, max_seconds=2.0, batch_seconds=0.02)
    timed = calls[4:]  # after two warm-up calls each
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert switches >= 4, f"not interleaved: {switches} switches in {len(timed)} calls"
    assert len(out["slow"][1]) >= 5 and sum(out["slow"][1]) >= 120 and sum(out["fast"][1]) >= 120
    assert out["fast"][0] < out["slow"][0]
    # a step past max_seconds stops there (3 calls at least) however many min_calls asks for
    few = H.time_interleaved({"slow": make("slow", 0.03)}, seconds=10, min_calls=1000, max_seconds=0.05)
    assert 3 <= len(few["slow"][1]) < 10 and few["slow"][2] is None
    # a step that raises leaves the rounds with its error; the others are timed
    count = [0]

    def flaky():
        count[0] += 1
        if count[0] > 4:
            raise MemoryError("out of memory\nsecond line")

    out = H.time_interleaved({"flaky": flaky, "fast": make("fast", 0.001)}, seconds=0.05, min_calls=5,
                             batch_seconds=0.01)
    assert out["flaky"][0] is None and out["flaky"][2] == "MemoryError: out of memory"
    assert out["fast"][0] > 0 and out["fast"][2] is None and len(out["fast"][1]) >= 5


def test_bench_interleaves_the_rows_of_a_group():
    """run_matrix(interleave=...): the named workload's rows of one order are timed together (their
    results say so, with the calls of that timing); others one row at a time."""
    from fastmeta.bench import run_matrix
    common = dict(tasks=2, steps=1, reps=4, max_seconds=1.0, progress=False, min_seconds=0.05)
    rows = run_matrix(["sine"], ["first"], ["loop", "fastmeta-torch"], "cpu", interleave=("sine",), **common)
    assert all(r.interleaved and r.reps >= 4 and r.median_ms > 0 for r in rows), rows
    rows = run_matrix(["sine"], ["first"], ["loop", "fastmeta-torch"], "cpu", interleave=(), **common)
    assert not any(r.interleaved for r in rows)
    # a group of one row is timed too (not left at its three warm-up calls)
    rows = run_matrix(["sine"], ["first"], ["fastmeta-torch"], "cpu", interleave=("sine",), **common)
    assert rows[0].interleaved and rows[0].reps >= 4, rows


def test_bench_reference_float64_and_dtype():
    """--reference float64: every row, the loop's own included, is measured against the loop on a
    float64 copy of the workload (float32 rounding shows, no row is 0); --dtype float64 runs the
    rows in float64, where fastmeta and the loop agree to rounding."""
    from fastmeta.bench import run_matrix
    common = dict(tasks=2, steps=1, reps=1, max_seconds=1.0, progress=False, min_seconds=0.0)
    rows = run_matrix(["omniglot"], ["second"], ["loop", "fastmeta"], "cpu", reference="float64", **common)
    errs = {r.provider: r.max_rel_err for r in rows}
    assert all(e is not None and 0 < e < 1e-3 for e in errs.values()), errs
    rows = run_matrix(["omniglot"], ["second"], ["loop", "fastmeta"], "cpu", dtype=torch.float64, **common)
    assert rows[1].provider == "fastmeta" and rows[1].max_rel_err < 1e-12, rows
    with pytest.raises(ValueError, match="reference"):
        run_matrix(["sine"], ["first"], ["loop"], "cpu", reference="float16", **common)
    bad = run_cli("fastmeta.bench", "--dtype", "float16")
    assert bad.returncode == 2 and "--dtype" in bad.stderr


def test_profile_cli_writes_a_chrome_trace(tmp_path):
    trace = tmp_path / "t.json"
    p = run_cli("fastmeta.profile", "--workload", "sine", "--tasks", "3", "--steps", "2", "--iterations", "2",
                "--provider", "fastmeta-torch", "--trace", str(trace))
    assert p.returncode == 0, p.stderr
    for phase in ("inner_forward", "inner_backward", "update", "query_forward", "outer_backward", "other"):
        assert phase in p.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "fastmeta.inner_forward" for e in events)


def test_timing_tools_share_the_precision_settings():
    """bench and profile run the GPU with the same math: TF32 off unless asked for (PyTorch's own
    default lets cuDNN convolutions use TF32, which a profile would then time instead of float32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert H.precision_settings() == "TF32 off"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark
        assert H.precision_settings(tf32=True, cudnn_benchmark=True) == "TF32 on, cudnn.benchmark on"
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved
    p = run_cli("fastmeta.profile", "--workload", "sine", "--tasks", "2", "--steps", "1", "--iterations", "1",
                "--provider", "fastmeta-torch", "--trace", "", "--tf32")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].endswith("TF32 on"), p.stdout
    p = run_cli("fastmeta.profile", "--workload", "sine", "--tasks", "2", "--steps", "1", "--iterations", "1",
                "--provider", "fastmeta-torch", "--trace", "", "--json")
    assert p.returncode == 0, p.stderr
    assert '"settings": "TF32 off"' in p.stdout


@pytest.mark.parametrize("provider", ["fastmeta-torch", "loop", "maml"])
def test_profiler_phases_sum_to_the_total(provider):
    """The phases add up to the iteration and cover most of it. Time outside every phase is what
    the VM's preemptions inflate (one descheduled iteration of three can double the mean), so the
    coverage bound has three tries: phases that do not wrap the work fail every one."""
    w = H.make_workload("sine", tasks=4, steps=2)
    step = H.make_step(provider, w, False)
    step()
    tables = []
    for _ in range(3):
        with profile() as prof:
            for _ in range(3):
                with prof.iteration():
                    step()
        s = prof.summary()
        phases = sum(s["phases_ms"].values())
        assert set(s["phases_ms"]) >= {"inner_forward", "inner_backward", "update", "outer_backward"}
        assert abs(phases + s["other_ms"] - s["mean_ms"]) <= 0.05 * s["mean_ms"] + 1e-3
        assert s["op_calls"] > 0 and s["iterations"] == 3
        if s["other_ms"] < 0.35 * s["mean_ms"]:
            break
        tables.append(prof.table())
    else:
        raise AssertionError("time outside the phases >= 35% in three tries:\n" + "\n".join(tables))


@requires_cpp
def test_profiler_sees_the_fused_op_on_repeated_calls():
    """From the second call on BatchedMAML takes the fused op directly; the profiler still sees
    its phase, and counts the fused kernel's per-thread workspaces in the peak memory (value_and_grad
    too, whose C++ binding is no dispatcher op)."""
    from fastmeta import _C

    w = H.make_workload("sine", tasks=4, steps=2)
    for provider in ("fastmeta", "fastmeta_vg"):
        step = H.make_step(provider, w, False)
        step()
        with profile() as prof:
            for _ in range(2):
                with prof.iteration():
                    step()
        s = prof.summary()
        assert "fused_inner_loop" in s["phases_ms"], prof.table()
        assert s["phases_ms"]["fused_inner_loop"] > 0
        if provider == "fastmeta":
            assert "outer_backward" in s["phases_ms"], prof.table()
        assert _C.workspace_bytes() > 0 and s["peak_mem_mb"] >= _C.workspace_bytes() / 2**20, (provider, s)


def test_profile_on_a_users_own_loop():
    model = torch.nn.Linear(3, 1)
    x = torch.randn(8, 3)
    with fastmeta.profile() as prof:
        for _ in range(2):
            with prof.iteration():
                with prof.phase("inner_forward"):
                    loss = model(x).pow(2).mean()
                with prof.phase("outer_backward"):
                    loss.backward()
    s = prof.summary()
    assert s["iterations"] == 2 and "inner_forward" in s["phases_ms"]
    assert "meta-iteration on cpu" in prof.table()


def test_gpu_scripts_name_real_providers_and_settings():
    """benchmarks/gpu_check.sh runs on a lent GPU once: every provider it names parses and
    exists, every workload is known, and gpu_probe's default variants parse (a typo there would
    cost that run's device time)."""
    import os
    import re
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = open(os.path.join(root, "benchmarks", "gpu_check.sh")).read().replace("\\\n", " ")
    lists = re.findall(r"--providers\s+(\S+)", script)
    assert len(lists) >= 5, lists
    for name in {n for lst in lists for n in lst.split(",")}:
        base, _, _ = H._split(name)
        assert base in H.PROVIDERS, name
    workloads = {w for lst in re.findall(r"--workload\s+(\S+)", script) for w in lst.split(",")}
    assert workloads == {"sine", "omniglot", "miniimagenet"}, workloads
    steps = re.search(r'STEPS=\$\{GPU_CHECK_STEPS:-"([^"]+)"\}', script).group(1).split()
    defined = set(re.findall(r"^step_(\w+)\(\)", script, re.M))
    assert set(steps) <= defined and len(steps) == len(set(steps)), (sorted(set(steps) - defined), steps)
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import gpu_probe
        saved = {k: os.environ.get(k) for k in gpu_probe.SETTINGS.values()}
        try:
            backends = re.search(r'"--backends", default="([^"]+)"', open(gpu_probe.__file__).read()).group(1)
            for b in backends.split(","):
                assert gpu_probe.variant(b) in ("cuda", "triton"), b
            import conv_probe
            shapes = re.search(r'"--shapes", default="([^"]+)"', open(conv_probe.__file__).read()).group(1)
            assert set(shapes.split(",")) <= set(conv_probe.SHAPES), shapes
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        sys.path.remove(os.path.join(root, "benchmarks"))


def test_gpu_precision_script_on_cpu(capsys):
    """benchmarks/gpu_precision.py (a gpu_check step) runs on the CPU too: a table of per-parameter
    errors against the float64 loop, the float32 loop's and fastmeta's both small for sine; a
    backend that cannot run here is a column of '-'."""
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import gpu_precision
        assert gpu_precision.main(["--workload", "sine", "--tasks", "3", "--order", "second", "--providers",
                                   "loop,fastmeta,fastmeta-triton", "--device", "cpu"]) == 0
    finally:
        sys.path.remove(os.path.join(root, "benchmarks"))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| parameter")]
    assert len(rows) == 7, out  # 6 parameters and the max
    loop, fm, triton = (c.strip() for c in rows[-1].split("|")[2:5])
    assert float(loop) < 1e-4 and float(fm) < 1e-4, rows[-1]
    assert triton == "-" or float(triton) < 1e-4, rows[-1]  # (runs where the Triton interpreter is on)


def test_conv_probe_script_on_cpu(capsys):
    """benchmarks/conv_probe.py (a gpu_check step) at tiny shapes under the interpreter: a row per
    kernel and reduction order for each shape, each agreeing with the reference convolution."""
    pytest.importorskip("triton")
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import conv_probe
        assert conv_probe.main(["--device", "cpu", "--small", "--shapes", "omniglot-l2,omniglot-l1"]) == 0
        with pytest.raises(SystemExit, match="unknown 'omniglot-l9'"):
            conv_probe.main(["--device", "cpu", "--small", "--shapes", "omniglot-l9"])
    finally:
        sys.path.remove(os.path.join(root, "benchmarks"))
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| omniglot")]
    # 2 shapes x (forward, weight grad) x (flat, tap-major) x (ieee, tf32x3), and ATen's grouped and per-task calls
    # (forward, input+weight grad) with and without the algorithm search
    assert len(rows) == 2 * (8 + 8), out
    assert {r[6].strip() for r in rows} == {"triton flat", "triton tap-major", "triton flat tf32x3",
                                           "triton tap-major tf32x3", "grouped ATen", "a call a task",
                                           "grouped ATen, benchmark", "a call a task, benchmark"}
    assert all(float(r[9]) < 1e-5 for r in rows), out


def test_wide_mlp_script_on_small_widths(capsys):
    """benchmarks/wide_mlp.py (RESULTS.md's wide-MLP tables) at tiny widths: each table's rows, the
    cpp and torch backends' meta-gradients agreeing, auto's choice, and the kernel's settings
    restored after."""
    import os
    import sys
    from fastmeta import _C
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    threads, panel = torch.get_num_threads(), _C._mlp_panel_bytes()
    try:
        import wide_mlp
        wide_mlp.main(["--small"])
    finally:
        sys.path.remove(os.path.join(root, "benchmarks"))
    assert (torch.get_num_threads(), _C._mlp_panel_bytes()) == (threads, panel)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 32-16")]
    assert len(rows) == 4 + (2 if threads > 1 else 0) + 2 + 2, rows
    assert all(float(r[7]) < 1e-4 for r in rows if len(r) == 8), rows
    auto = [r for r in rows if len(r) == 9]  # (a tiny MLP: auto keeps the kernel)
    assert len(auto) == 2 and all(r[4].strip() == "cpp" for r in auto), rows
    wide_mlp.gpu_table(1, device="cpu", kernel="cpp", shapes=((16, 2, 10),))  # (gpu_check's table, on the CPU)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 32-16")]
    assert len(rows) == 2 and all(len(r) == 8 and float(r[7]) < 1e-4 for r in rows), rows


def _bench_script(name, argv):
    """main(argv) of benchmarks/<name>.py, imported with benchmarks/ on the path (as running it does)."""
    import importlib
    import os
    import sys
    where = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, where)
    try:
        return importlib.import_module(name).main(argv)
    finally:
        sys.path.remove(where)


def test_dropin_calls_script_runs(capsys):
    """benchmarks/dropin_calls.py (RESULTS.md's tables of the drop-in learners' per-call costs): a
    row per size and per piece, and the loops' threshold restored afterwards."""
    from fastmeta import _C
    if fastmeta.backend.why_unavailable("cpp", "cpu") is not None:
        pytest.skip("fastmeta._C not built")
    before = _C._mlp_forward_small_macs()
    _bench_script("dropin_calls", ["--calls", "3"])
    assert _C._mlp_forward_small_macs() == before
    out = capsys.readouterr().out
    assert sum(line.startswith("| 10 x 40 |") or line.startswith("| 100 x 128 |") for line in out.splitlines()) == 2
    for piece in ("clone", "forward under no_grad", "clone and one adapt"):
        assert f"| {piece} |" in out, out


def test_anil_script_on_a_small_net(capsys):
    """benchmarks/anil.py (RESULTS.md's ANIL table) on a tiny conv4: every row timed, the fastmeta
    rows' meta-gradients equal to learn2learn's ANIL recipe's."""
    out = _bench_script("anil", ["--small", "--seconds", "0.05", "--steps", "2"])
    for order in ("second", "first"):
        timed, errs = out[order]
        assert all(timed[k][0] is not None for k in timed), timed
        assert set(errs) == {"loop_anil", "loop_full", "fastmeta_anil", "fastmeta_anil_everystep"}
        assert all(e < 1e-4 for e in errs.values()), errs
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fastmeta_anil |")]
    assert len(rows) == 2, rows


def test_maml_plus_plus_script_on_a_small_net(capsys):
    """benchmarks/maml_plus_plus.py (RESULTS.md's MAML++ table) on a tiny conv4: every row timed,
    BatchedMAML's meta-gradient (parameters and per-step rates) equal to the per-task loop's."""
    out = _bench_script("maml_plus_plus", ["--small", "--seconds", "0.05", "--steps", "3"])
    for order in ("second", "first"):
        timed, errs, errs64 = out[order]
        assert set(timed) == {"loop_mamlpp", "fastmeta_mamlpp", "fastmeta_maml"}
        assert all(timed[k][0] is not None for k in timed), timed
        assert errs["fastmeta_mamlpp"] < 1e-4, errs
        assert set(errs64) == {"loop_mamlpp", "fastmeta_mamlpp"} and max(errs64.values()) < 1e-4, errs64
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fastmeta_mamlpp |")]
    assert len(rows) == 2, rows


def test_mlp_maml_plus_plus_script_on_a_small_net(capsys):
    """benchmarks/mlp_maml_plus_plus.py (RESULTS.md's MLP MAML++ table) on a small MLP: every row
    timed, both BatchedMAML rows' meta-gradients (parameters and per-step rates) equal to the float64
    loop's within float32's."""
    out = _bench_script("mlp_maml_plus_plus", ["--tasks", "3", "--steps", "3", "--width", "8", "--seconds", "0.05"])
    for order in ("second", "first"):
        timed, errs = out[order]
        assert set(timed) == {"loop_mamlpp", "fastmeta_mamlpp", "fastmeta_mamlpp_ops", "fastmeta_maml"}
        assert all(timed[k][0] is not None for k in timed), timed
        assert max(errs.values()) < 1e-4, errs
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fastmeta_mamlpp |")]
    assert len(rows) == 2, rows


def test_reptile_script_on_a_small_net(capsys):
    """benchmarks/reptile.py (RESULTS.md's Reptile table) on a tiny conv4: both rows timed,
    BatchedMAML.reptile_grad's update equal to the per-task loop's."""
    timed, errs = _bench_script("reptile", ["--small", "--seconds", "0.05", "--steps", "2"])["first"]
    assert set(timed) == {"loop_reptile", "fastmeta_reptile"} and all(v[0] is not None for v in timed.values())
    assert errs["fastmeta_reptile"] < 1e-4, errs
    assert sum(line.startswith("| fastmeta_reptile |") for line in capsys.readouterr().out.splitlines()) == 1
    # the sine MLP: the fused inner loop and the batched ops, both equal to the loop's update
    timed, errs = _bench_script("reptile", ["--workload", "sine", "--tasks", "3", "--steps", "2",
                                            "--seconds", "0.05"])["first"]
    assert set(timed) == {"loop_reptile", "fastmeta_reptile", "fastmeta_reptile_ops"}
    assert all(v[0] is not None for v in timed.values()) and max(errs.values()) < 1e-3, errs


def test_targets_script_reads_one_run_at_a_time(tmp_path, capsys):
    """benchmarks/targets.py (run at the end of gpu_check.sh): each target's ratio from rows of the
    same JSON file only; a fastmeta row beyond the 1e-4 meta-gradient bound is not counted; of a vmap
    baseline's two forms the faster counts; the
    mini-ImageNet target needs both the speed and the memory bound."""
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def row(workload, order, tasks, provider, ms, peak=1.0, err=None):
        return dict(workload=workload, order=order, tasks=tasks, provider=provider, median_ms=ms,
                    peak_mem_mb=peak, max_rel_err=err)
    sine = [row("sine", "second", 25, "loop", 400.0), row("sine", "second", 25, "compile", 4.0),
            row("sine", "second", 25, "compile_gv", 3.5), row("sine", "second", 25, "vmap_graph_gv", 1.5),
            row("sine", "second", 25, "vmap_graph", 1.0), row("sine", "second", 25, "fastmeta_vg", 0.25, err=2e-7),
            row("sine", "second", 25, "fastmeta-triton", 0.1, err=5e-4)]  # fastest, but off the bound
    mini = [row("miniimagenet", "second", 32, "loop", 2300.0, peak=1000.0),
            row("miniimagenet", "second", 32, "vmap", 960.0, peak=100000.0, err=5e-2),
            row("miniimagenet", "second", 32, "fastmeta", 270.0, peak=17000.0),          # fast, too much memory
            row("miniimagenet", "second", 32, "fastmeta_graph@4", 300.0, peak=1900.0)]  # both bounds
    (tmp_path / "bench_sine_T25.json").write_text(json.dumps({"results": sine}))
    (tmp_path / "bench_miniimagenet.json").write_text(json.dumps({"results": mini}))
    (tmp_path / "bench_omniglot.json").write_text(json.dumps({"results": [row("omniglot", "second", 32, "fastmeta", 30.0)]}))
    (tmp_path / "bench_conv_compile.json").write_text(json.dumps({"results": [
        row("omniglot", "second", 32, "loop", 500.0), row("omniglot", "second", 32, "compile", 21.0, err=2e-6),
        row("omniglot", "second", 32, "compile_gv", 14.0, err=4e-2),  # faster (and wrong): the baseline
        row("omniglot", "second", 32, "fastmeta_graph", 10.0, err=5e-5)]}))

    def _target_lines(log_dir):
        sys.path.insert(0, os.path.join(root, "benchmarks"))
        try:
            import targets
            assert targets.main([str(log_dir)]) == 0
        finally:
            sys.path.remove(os.path.join(root, "benchmarks"))
        out = capsys.readouterr().out
        return {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| #")}
    lines = _target_lines(tmp_path)
    # the faster form of the baseline counts (compile_gv here, vmap_graph there)
    assert "14.00x (0.250 vs compile_gv 3.500 ms) | yes" in lines["#4 sine T=25 second: >= 10x compile"]
    assert "| fastmeta_vg |" in lines["#4 sine T=25 second: >= 10x compile"]
    assert "4.00x (0.250 vs 1.000 ms) | yes" in lines["#4 sine T=25 second: >= 2x vmap_graph"]
    mini_line = lines["#5 mini-ImageNet T=32 second: >= 3x vmap at <= 2x the loop's peak"]
    assert "| fastmeta_graph@4 | 3.20x vmap (300 vs 960 ms) at 1.90x the loop's peak" in mini_line
    assert mini_line.endswith("; vmap's err 5.0e-02 | yes |")
    mini[1:1] = [row("miniimagenet", "second", 32, "vmap_gv", 880.0, peak=110000.0, err=6e-2)]
    (tmp_path / "bench_miniimagenet.json").write_text(json.dumps({"results": mini}))
    lines = _target_lines(tmp_path)
    assert lines["#5 mini-ImageNet T=32 second: >= 3x vmap at <= 2x the loop's peak"].endswith(
        "| fastmeta_graph@4 | 2.93x vmap_gv (300 vs 880 ms) at 1.90x the loop's peak (err -); vmap_gv's err 6.0e-02 | no |")
    omni = {k: v for k, v in lines.items() if k.startswith("#5 omniglot")}  # bench_omniglot.json: no baseline
    assert all("| bench_conv_compile.json | fastmeta_graph |" in v for v in omni.values()) and len(omni) == 2
    assert omni["#5 omniglot T=32 second: >= 50x loop"].endswith("50.00x (10.0 vs 500.0 ms) | yes |")
    assert omni["#5 omniglot T=32 second: >= 2x compile"].endswith(
        "1.40x (10.0 vs compile_gv 14.0 ms); compile_gv's err 4.0e-02 | no |")


class _TransientBackward(torch.autograd.Function):
    """y = 2x; its backward makes (and frees) a 16 MB tensor before it returns 2 gy."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, gy):
        big = torch.ones(4 * 2**20)  # 16 MB, freed when backward returns
        return 2 * gy + big[:1].sum() * 0


def test_cpu_peak_counts_what_lives_inside_an_op_or_a_backward():
    """harness.cpu_peak_mb counts every allocation while it lives, whatever scope makes and frees
    it: the peak of a step whose backward holds a 16 MB temporary, and of an op that does, is at
    least 16 MB (an estimate from each op's net allocation saw 0 of it)."""
    x = torch.randn(8, requires_grad=True)

    def backward_step():
        torch.autograd.grad(_TransientBackward.apply(x).sum(), x)

    def op_step():  # torch.cdist makes and frees intermediates inside one ATen op
        a = torch.randn(2048, 64)
        torch.cdist(a, a)  # (its [2048, 2048] result, 16 MB, freed at once)

    backward_step()
    assert H.cpu_peak_mb(backward_step) >= 16.0
    op_step()
    assert H.cpu_peak_mb(op_step) >= 16.0


def test_call_overhead_script_runs(tmp_path, capsys):
    """benchmarks/call_overhead.py (a gpu_check step) on the CPU at one tiny shape: a row per rate
    kind with both timings, and an unknown kind named."""
    import json
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import call_overhead
        out = tmp_path / "rows.json"
        call_overhead.main(["--shapes", "1x1", "--order", "first", "--rates", "scalar,per_layer_step",
                            "--seconds", "0.02", "--json", str(out)])
        rows = json.loads(out.read_text())
        assert [(r["T"], r["S"], r["order"], r["rates"]) for r in rows] == [(1, 1, "first", "scalar"),
                                                                           (1, 1, "first", "per_layer_step")]
        assert all(r["value_and_grad_us"] > 0 and r["forward_grad_us"] > 0 and r["no_grad_forward_us"] > 0
                   for r in rows)
        assert "| 1 | 1 | first | per_layer_step |" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="unknown kind 'lslr'"):
            call_overhead.main(["--rates", "lslr"])
    finally:
        sys.path.remove(os.path.join(root, "benchmarks"))


def test_more_modules_script_runs(capsys):
    """benchmarks/more_modules.py at two tasks: each model's fallback copy takes the vmap path while
    the model itself is lowered, every row's meta-gradient equals the loop's, and an unknown model
    is named."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import more_modules
        out = more_modules.main(["--models", "gelu_mlp,conv1d,text", "--order", "first", "--tasks", "2",
                                 "--seconds", "0.02"])
        for (name, order), (timed, errs) in out.items():
            assert set(timed) == {"loop", "fastmeta_vg", "fastmeta_vg-torch", "fastmeta_vg_vmapped"}
            assert all(med is not None for med, _, _ in timed.values()), (name, timed)
            assert max(errs.values()) < 1e-4, (name, errs)
        assert "| fastmeta_vg_vmapped |" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="unknown model 'mlp'"):
            more_modules.main(["--models", "mlp"])
    finally:
        sys.path.remove(os.path.join(root, "benchmarks"))


def _benchmark_script(name):
    """The module of benchmarks/<name>.py, imported with the benchmarks folder on the path (its
    scripts import each other), which is left as it was."""
    import importlib

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


@requires_cpp
def test_inner_update_autograd_script_runs():
    """benchmarks/inner_update_autograd.py: both forms give the same update (checked in the script)
    and the table has its rows."""
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                                       "inner_update_autograd.py"), "--tasks", "2", "--seconds", "0.02"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [l for l in out.stdout.splitlines() if l.startswith("| 2 |")]
    assert len(rows) == 2 and all(l.endswith("x |") for l in rows), out.stdout


def test_traced_forward_script_runs(capsys):
    """benchmarks/traced_forward.py at one task: the custom-forward models are traced (no vmap step),
    their hooked copies run through the vmap fallback (not the functional BatchNorm model's, on
    which it raises), and every row's meta-gradient equals the loop's; an unknown model is named."""
    traced_forward = _benchmark_script("traced_forward")
    for name in traced_forward.MODELS:
        timed, errs = traced_forward.run(name, 1, "first", "cpu", 0.02)
        want = {"loop", "fastmeta_vg"} | (set() if name == "functional_omniglot" else {"fastmeta_vg_untraced"})
        want |= {"fastmeta_vg_lower_as"} if name == "metamodule_omniglot" else set()
        assert set(timed) == want | (set() if name == "resnet_omniglot" else {"fastmeta_vg_sequential"})
        assert all(med is not None for med, _, _ in timed.values()), (name, timed)
        # (float32 against the float32 loop: the ResNet's rounding alone reaches ~1e-3 on every path)
        assert max(errs.values()) < 1e-2 and errs["fastmeta_vg"] <= 2 * errs.get("fastmeta_vg_untraced", 0) + 1e-4, (
            name, errs)
    assert "| fastmeta_vg_untraced |" in capsys.readouterr().out
    assert not fastmeta.plan._AS_BASE  # (the benchmark's declaration withdrawn)
    with pytest.raises(SystemExit, match="unknown model 'mlp'"):
        traced_forward.main(["--models", "mlp"])


def test_bn_running_stats_script_runs(capsys):
    """benchmarks/bn_running_stats.py at one task: both rows run and are printed."""
    out = _benchmark_script("bn_running_stats").main(["--tasks", "1", "--order", "first", "--seconds", "0.02"])
    assert all(med is not None for med, _, _ in out["first"].values())
    assert "| track_running_stats=True |" in capsys.readouterr().out
