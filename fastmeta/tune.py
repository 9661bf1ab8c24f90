"""``fastmeta.tune``: time a BatchedMAML's meta-step on each backend that can run it here, and keep
the fastest for that module.

    meta = fastmeta.BatchedMAML(model, 0.4, 1, loss="cross_entropy")
    result = fastmeta.tune(meta, xs, ys, xq, yq)   # a meta-batch of the shapes you will train on
    print(result)                                   # the table: backend, median ms, note
    # meta.backend is now the fastest; its calls run there while the global request is "auto"

``auto``'s static choice per op is written from benchmark runs on some machine; which backend is
fastest on yours depends on the card, the model and the batch shape (e.g. cuDNN's grouped
convolutions against the Triton implicit GEMM). tune measures instead: for ``auto`` and each of
``cpp``, ``cuda``, ``triton``, ``torch`` that can run on the batch's device (as BatchedMAML would:
an op without a kernel of that backend takes its auto choice), it runs ``warmup`` meta-steps
(``value_and_grad``: compilation, cuDNN's plans) and then ``reps`` timed ones, synchronizing the
device around each, and takes the median. Then (``per_op``), from the fastest of those, each op
the step uses is tried on each of its other backends in turn, keeping a change that is faster by
more than ``margin``: the result may be a per-op request such as ``{"batched_conv2d": "cuda",
"bn_relu_pool": "triton"}``. Requests that would run the very same kernels as one already timed
are skipped. Every backend's meta-gradient must agree with auto's (``rtol``, per
tensor, a near-zero tensor measured against 1e-2 of the whole gradient's norm): one that does not
is left out and the table says by how much; a model that draws random numbers (Dropout) is
compared on a call of each candidate under one fixed seed. Parameters are not changed (no
optimizer step).

``meta.backend`` applies to the module's calls (forward, value_and_grad, adapt, predict, graphed
steps captured after) only while the global request (set_backend / use_backend / FASTMETA_BACKEND)
is ``auto``: an explicit request still wins.

With ``memory_mb``, tune then also chooses how the step spends memory, on the chosen backends: for
each combination of ``recompute`` (where the model's first conv block allows it) and
``checkpoint_steps`` (second order with inner steps), the largest ``task_chunk`` (all tasks, then
halves down to one) whose measured peak (CUDA: the allocator's peak above what was allocated
before; CPU: the profiler's) stays within ``memory_mb`` is timed, and the fastest of those is set
on ``meta`` (``meta.task_chunk``, ``meta.recompute``, ``meta.checkpoint_steps``). Every such
setting computes the same meta-gradient, and is checked to. Where none fits, tune raises with the
smallest peak it saw. The fused MLP kernel keeps no graph: its settings are left as they are.

    fastmeta.tune(meta, xs, ys, xq, yq, memory_mb=12_000)   # the fastest step within 12 GB
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from .backend import BACKENDS, OPS, select, use_backend, why_unavailable
from .harness import max_rel_err, step_peak_mb

CANDIDATES = ("auto", "cpp", "cuda", "triton", "torch")


@dataclasses.dataclass
class Tuning:
    """What :func:`tune` measured: ``rows`` of (request, median ms or None, note), the ``best``
    request's label (``meta.backend`` is now that request: a backend name, a per-op request, or
    None for auto) and the device type."""

    rows: list
    best: str
    device: str

    def times(self) -> dict:
        return {name: ms for name, ms, _ in self.rows if ms is not None}

    def __str__(self) -> str:
        width = max(len("backend"), *(len(name) for name, _, _ in self.rows))
        lines = [f"fastmeta.tune on {self.device}: best {self.best!r}",
                 f"  {'backend':<{width}} {'median ms':>10}  note"]
        for name, ms, note in self.rows:
            t = f"{ms:10.3f}" if ms is not None else f"{'-':>10}"
            lines.append(f"  {name:<{width}} {t}  {note}")
        return "\n".join(lines)


def _ops_of(meta) -> list:
    """The ops a meta-step of ``meta`` can call: its program's steps, the update, the loss and, for
    an MLP, the fused inner loop."""
    used = {s.kind.split("+")[0] for s in meta.program.steps} | {"inner_update"}
    if meta.program.mlp is not None:
        used.add("mlp_inner_loop")
    if meta.loss in ("mse", "cross_entropy"):
        used.add(meta.loss)
    return sorted(op for op in used if op in OPS)


def _choices(ops, device: str) -> tuple:
    """The backend each op takes under the current request (what a step would run)."""
    return tuple(select(op, device) for op in ops)


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


class _Trials:
    """The timing of one tune call: each request's median, its row, the reference gradient."""

    def __init__(self, meta, batch, used, device, reps, warmup, rtol):
        self.meta, self.batch, self.used, self.device = meta, batch, used, device
        self.reps, self.warmup, self.rtol = reps, warmup, rtol
        self.rows, self.seen, self.times, self.requests, self.ref, self.ref_name = [], {}, {}, {}, None, None

    def run(self, label: str, request):
        """Times the meta-step under ``request``; its median (ms), or None (with a row saying why)."""
        meta, device = self.meta, self.device
        with use_backend(request):
            key = _choices(self.used, device)
            if "mlp_inner_loop" in self.used and not meta._fused_mlp_ok(self.batch[0], self.batch[2]):
                # (the step runs the batched ops instead, e.g. auto's choice on a CPU for a
                # meta-batch that fills few of the kernel's lanes: the torch ops' kernels)
                key = tuple("torch" if op == "mlp_inner_loop" else b for op, b in zip(self.used, key))
            if key in self.seen:
                self.rows.append((label, None, f"runs the same kernels as {self.seen[key]!r}"))
                return None
            self.seen[key] = label
            try:
                for _ in range(self.warmup):
                    meta.value_and_grad(*self.batch)
                _sync(device)
                samples = []
                for _ in range(self.reps):
                    t0 = time.perf_counter()
                    _, grads = meta.value_and_grad(*self.batch)
                    _sync(device)
                    samples.append(1e3 * (time.perf_counter() - t0))
                if meta.program.random:  # (Dropout) the compared gradient from the same draws for every candidate
                    with torch.random.fork_rng(devices=[torch.device(device)] if device == "cuda" else [],
                                               device_type=device):
                        torch.manual_seed(0)
                        _, grads = meta.value_and_grad(*self.batch)
            except Exception as e:  # a backend that fails on this model is not a candidate
                self.rows.append((label, None, f"failed: {type(e).__name__}: {e}"))
                return None
        if self.ref is None:  # the first to run is the reference of the meta-gradient check
            self.ref, self.ref_name, err = [None if g is None else g.detach().clone() for g in grads], label, 0.0
        else:
            err = max_rel_err(grads, self.ref)
        if err > self.rtol:
            self.rows.append((label, None, f"left out: meta-gradient differs from {self.ref_name!r}'s by {err:.1e}"))
            return None
        ms = statistics.median(samples)
        self.times[label], self.requests[label] = ms, (request, key)
        ops = ", ".join(f"{op}={b}" for op, b in zip(self.used, key) if b != "torch")
        self.rows.append((label, ms, ops or "torch ops only"))
        return ms


def _memory_settings(meta, T: int) -> list:
    """(recompute, checkpoint_steps) combinations worth trying, and the task chunks, largest first."""
    rec = [False, True] if meta.program.recomputable(0) else [meta.recompute]
    ck = [False, True] if not meta.first_order and meta.inner_steps > 0 else [meta.checkpoint_steps]
    chunks, c = [None], T
    while c > 1:
        c = (c + 1) // 2
        chunks.append(c)
    return [(r, k) for r in rec for k in ck], chunks


def _tune_memory(trials: "_Trials", memory_mb: float):
    """tune's memory pass (see the module docstring) on the backend request now set on trials.meta."""
    meta, device = trials.meta, trials.device
    T = trials.batch[0].shape[0]
    combos, chunks = _memory_settings(meta, T)
    saved = meta.task_chunk, meta.recompute, meta.checkpoint_steps
    smallest, found, dropped = None, {}, []
    try:
        for rec, ck in combos:
            fit = False
            for chunk in chunks:
                meta.task_chunk, meta.recompute, meta.checkpoint_steps = chunk, rec, ck
                label = (f"memory: task_chunk={chunk}" + (", recompute" if rec else "")
                         + (", checkpoint_steps" if ck else ""))
                try:
                    peak = step_peak_mb(lambda: meta.value_and_grad(*trials.batch), device)
                except torch.cuda.OutOfMemoryError:
                    peak = float("inf")
                if smallest is None or peak < smallest[0]:
                    smallest = (peak, label)
                if peak > memory_mb:
                    continue
                fit = True
                trials.seen.clear()  # the same kernels, another memory setting: time it anyway
                ms = trials.run(label, meta.backend)
                if ms is not None:
                    found[label] = (ms, (chunk, rec, ck), peak)
                    trials.rows[-1] = (label, ms, f"peak {peak:.4g} MB; {trials.rows[-1][2]}")
                else:
                    dropped.append(f"{label} ({trials.rows[-1][2]})")
                break  # the largest chunk that fits; smaller ones only cost time
            if not fit:
                what = ("recompute" if rec else "") + (", " if rec and ck else "") + ("checkpoint_steps" if ck else "")
                trials.rows.append((f"memory: {what or 'task chunks alone'}", None,
                                    f"over memory_mb at every task_chunk (task_chunk=1: {peak:.4g} MB)"))
    finally:
        meta.task_chunk, meta.recompute, meta.checkpoint_steps = saved
    if not found and dropped:
        raise RuntimeError(f"tune: the memory settings within memory_mb={memory_mb:g} MB were left out: "
                           + "; ".join(dropped) + " (a float32 meta-gradient that rounding alone moves by more than "
                           "rtol needs a larger rtol)")
    if not found:
        raise RuntimeError(f"tune: no memory setting keeps the meta-step within memory_mb={memory_mb:g} MB; the "
                           f"smallest peak measured was {smallest[0]:.1f} MB ({smallest[1]})")
    best = min(found, key=lambda k: found[k][0])
    meta.task_chunk, meta.recompute, meta.checkpoint_steps = found[best][1]
    return best


def tune(meta, xs, ys, xq, yq, backends=None, reps: int = 5, warmup: int = 2, rtol: float = 1e-3,
         per_op: bool = True, margin: float = 0.02, memory_mb: float | None = None) -> Tuning:
    """Times ``meta``'s meta-step on each backend that can run it on this batch's device, sets
    ``meta.backend`` to the fastest and returns the table (see the module docstring).

    backends: the candidates (default: auto, cpp, cuda, triton, torch, those available here, but
    not triton on the CPU, where it runs in the Triton interpreter); the per-op pass tries these too.
    per_op: then, starting from the fastest of them, tries each op the step uses on each of its
    other backends in turn (a per-op request such as ``{"batched_conv2d": "cuda", "bn_relu_pool":
    "triton"}``), keeping a change that is faster by more than ``margin`` (a fraction).
    memory_mb: then the fastest memory setting (task_chunk, recompute, checkpoint_steps) whose peak
    stays within this many MB, set on meta (see the module docstring); ``best`` names it."""
    from .batched import BatchedMAML
    if not isinstance(meta, BatchedMAML):
        raise TypeError(f"tune: meta must be a fastmeta.BatchedMAML, got {type(meta).__name__}")
    for name, v in (("reps", reps), ("warmup", warmup)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "reps" else 0):
            raise ValueError(f"tune: {name} must be an int >= {1 if name == 'reps' else 0}, got {v!r}")
    for name, v in (("rtol", rtol), ("margin", margin)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 or (name == "margin" and v == 0)):
            raise ValueError(f"tune: {name} must be a {'positive' if name == 'rtol' else 'non-negative'} number, "
                             f"got {v!r}")
    if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float))
                                  or not memory_mb > 0):
        raise ValueError(f"tune: memory_mb must be a positive number of MB or None, got {memory_mb!r}")
    cands = list(CANDIDATES if backends is None else backends)
    bad = [b for b in cands if b not in ("auto",) + BACKENDS]
    if bad or not cands:
        raise ValueError(f"tune: backends must be a non-empty list of {('auto',) + BACKENDS}, got {backends!r}")
    if "auto" in cands:  # the reference for the meta-gradient check runs first
        cands.remove("auto")
        cands.insert(0, "auto")
    # the timed steps are not the user's passes: BatchNorm running statistics are left as they were
    with meta._kept_running_stats():
        device = xs.device.type
        trials = _Trials(meta, (xs, ys, xq, yq), _ops_of(meta), device, reps, warmup, rtol)
        old = meta.backend
        meta.backend = None  # each candidate runs as requested below, not as a previous tuning said
        try:
            for name in list(cands):
                why = why_unavailable(name, device) if name != "auto" else None
                if why is None and name == "triton" and device == "cpu" and backends is None:
                    cands.remove(name)
                    trials.rows.append((name, None, "not timed by default on the CPU (there Triton runs in its "
                                                    "interpreter, for tests)"))
                    continue
                if why is not None:
                    trials.rows.append((name, None, f"unavailable: {why}"))
                    continue
                trials.run(name, name)
            if per_op and trials.times:
                _per_op(trials, margin, [b for b in cands if b != "auto"])
        finally:
            meta.backend = old
        if not trials.times:
            raise RuntimeError("tune: no backend could run this meta-step:\n"
                               + "\n".join(f"  {n}: {note}" for n, _, note in trials.rows))
        best = min(trials.times, key=trials.times.get)
        meta.backend = trials.requests[best][0]
        if memory_mb is not None:
            with use_backend(meta.backend):
                fused = meta._fused_mlp_ok(xs, xq)  # (the fused MLP kernel keeps no graph: nothing to choose)
            if not fused:
                best = _tune_memory(trials, float(memory_mb))
        return Tuning(trials.rows, best, device)


def _per_op(trials: _Trials, margin: float, allowed: list):
    """One pass of coordinate descent over the ops from the fastest single request: each op on each
    of its other available backends among ``allowed``, a change kept when faster by more than
    ``margin``."""
    best = min(trials.times, key=trials.times.get)
    base_name, (_, key) = best, trials.requests[best]
    current = dict(zip(trials.used, key))
    best_ms = trials.times[best]
    for op in trials.used:
        for alt in OPS[op][0]:
            if alt == current[op] or alt not in allowed or why_unavailable(alt, trials.device) is not None:
                continue
            trial = dict(current, **{op: alt})
            if tuple(trial[o] for o in trials.used) in trials.seen:  # timed already (as a single request)
                continue
            base = dict(zip(trials.used, key))
            label = f"{base_name} + " + ", ".join(f"{o}={b}" for o, b in trial.items() if b != base[o])
            ms = trials.run(label, trial)
            if ms is not None and ms < best_ms * (1 - margin):
                current, best_ms = trial, ms
