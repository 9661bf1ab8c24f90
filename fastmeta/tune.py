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
device around each, and takes the median. Backends that would run the very same kernels as one
already timed are skipped. Every backend's meta-gradient must agree with auto's (``rtol``, per
tensor, a near-zero tensor measured against 1e-2 of the whole gradient's norm): one that does not
is left out and the table says by how much. Parameters are not changed (no optimizer step).

``meta.backend`` applies to the module's calls (forward, value_and_grad, adapt, predict, graphed
steps captured after) only while the global request (set_backend / use_backend / FASTMETA_BACKEND)
is ``auto``: an explicit request still wins.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from .backend import BACKENDS, OPS, select, use_backend, why_unavailable

CANDIDATES = ("auto", "cpp", "cuda", "triton", "torch")


@dataclasses.dataclass
class Tuning:
    """What :func:`tune` measured: ``rows`` of (backend, median ms or None, note), the ``best``
    backend (now ``meta.backend``; None for auto) and the device type."""

    rows: list
    best: str
    device: str

    def times(self) -> dict:
        return {name: ms for name, ms, _ in self.rows if ms is not None}

    def __str__(self) -> str:
        lines = [f"fastmeta.tune on {self.device}: best {self.best!r}",
                 f"  {'backend':<8} {'median ms':>10}  note"]
        for name, ms, note in self.rows:
            t = f"{ms:10.3f}" if ms is not None else f"{'-':>10}"
            lines.append(f"  {name:<8} {t}  {note}")
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


def _rel_err(got, want) -> float:
    total = float(torch.sqrt(sum((w.double() ** 2).sum() for w in want if w is not None)))
    worst = 0.0
    for g, w in zip(got, want):
        if g is None or w is None:
            continue
        scale = max(float(w.double().norm()), 1e-2 * total, 1e-30)
        worst = max(worst, float((g.double() - w.double()).norm()) / scale)
    return worst


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def tune(meta, xs, ys, xq, yq, backends=None, reps: int = 5, warmup: int = 2, rtol: float = 1e-3) -> Tuning:
    """Times ``meta``'s meta-step on each backend that can run it on this batch's device, sets
    ``meta.backend`` to the fastest and returns the table (see the module docstring).

    backends: the candidates (default: auto, cpp, cuda, triton, torch, those available here)."""
    from .batched import BatchedMAML
    if not isinstance(meta, BatchedMAML):
        raise TypeError(f"tune: meta must be a fastmeta.BatchedMAML, got {type(meta).__name__}")
    for name, v in (("reps", reps), ("warmup", warmup)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "reps" else 0):
            raise ValueError(f"tune: {name} must be an int >= {1 if name == 'reps' else 0}, got {v!r}")
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"tune: rtol must be a positive number, got {rtol!r}")
    cands = list(CANDIDATES if backends is None else backends)
    bad = [b for b in cands if b not in ("auto",) + BACKENDS]
    if bad or not cands:
        raise ValueError(f"tune: backends must be a non-empty list of {('auto',) + BACKENDS}, got {backends!r}")
    if "auto" in cands:  # the reference for the meta-gradient check runs first
        cands.remove("auto")
        cands.insert(0, "auto")
    device = xs.device.type
    used = _ops_of(meta)
    old = meta.backend
    meta.backend = None  # each candidate runs as requested below, not as a previous tuning said
    rows, seen, times, ref = [], {}, {}, None
    try:
        for name in cands:
            if name != "auto":
                why = why_unavailable(name, device)
                if why is not None:
                    rows.append((name, None, f"unavailable: {why}"))
                    continue
            with use_backend(name):
                key = _choices(used, device)
                if key in seen:
                    rows.append((name, None, f"runs the same kernels as {seen[key]!r}"))
                    continue
                seen[key] = name
                try:
                    for _ in range(warmup):
                        meta.value_and_grad(xs, ys, xq, yq)
                    _sync(device)
                    samples = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        _, grads = meta.value_and_grad(xs, ys, xq, yq)
                        _sync(device)
                        samples.append(1e3 * (time.perf_counter() - t0))
                except Exception as e:  # a backend that fails on this model is not a candidate
                    rows.append((name, None, f"failed: {type(e).__name__}: {e}"))
                    continue
            if ref is None:
                ref, err = [None if g is None else g.detach().clone() for g in grads], 0.0
            else:
                err = _rel_err(grads, ref)
            if err > rtol:
                rows.append((name, None, f"left out: meta-gradient differs from {cands[0]!r}'s by {err:.1e}"))
                continue
            times[name] = statistics.median(samples)
            ops = ", ".join(f"{op}={b}" for op, b in zip(used, key) if b != "torch")
            rows.append((name, times[name], ops or "torch ops only"))
    finally:
        meta.backend = old
    if not times:
        raise RuntimeError("tune: no backend could run this meta-step:\n"
                           + "\n".join(f"  {n}: {note}" for n, _, note in rows))
    best = min(times, key=times.get)
    meta.backend = None if best == "auto" else best
    return Tuning(rows, best, device)
