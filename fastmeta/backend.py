"""Backends: which are built, which are usable for a tensor, and which one an op call takes.

Names: ``torch`` (pure PyTorch references, always there), ``cpp`` (fastmeta._C CPU kernels),
``cuda`` (fastmeta._C CUDA kernels), ``triton`` (fastmeta.kernels). The choice comes from
``fastmeta.set_backend`` / ``fastmeta.use_backend`` or the ``FASTMETA_BACKEND`` environment variable,
read when fastmeta is imported (default ``auto``). ``auto`` takes the first available backend of
the op's preference list for the tensor's device and falls back to ``torch`` quietly; an explicitly requested backend that the op
implements but that cannot run here (not built, wrong device) raises :class:`BackendUnavailable`
with the reason; an op with no kernel of that backend at all runs its auto choice. Nothing here touches CUDA at import time.

A request may also name a backend per op: ``use_backend({"batched_conv2d": "cuda", "bn_relu_pool":
"triton"})`` (ops not named take ``auto``); ``get_backend()`` then returns a :class:`PerOp`, the
request as sorted (op, backend) pairs. ``fastmeta.tune`` finds such mixes by timing them.
"""
from __future__ import annotations

import functools
import json
import os
import threading
import warnings

BACKENDS = ("torch", "cpp", "cuda", "triton")
_CHOICES = ("auto",) + BACKENDS


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this op on this input."""


class PerOp(tuple):
    """A per-op backend request: sorted (op, backend) pairs (hashable, comparable); ops not in it
    take auto."""

    __slots__ = ()

    def get(self, op: str, default: str = "auto") -> str:
        for name, b in self:
            if name == op:
                return b
        return default

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{op!r}: {b!r}" for op, b in self) + "}"


def _request(name):
    """A validated request: None, one of auto / the backends (lower case), or a PerOp from a
    mapping op -> backend (or a PerOp)."""
    if name is None:
        return None
    if isinstance(name, str):
        if name.lower() not in _CHOICES:
            raise ValueError(f"backend: expected one of {_CHOICES} or a dict op -> backend, got {name!r}")
        return name.lower()
    if isinstance(name, PerOp):
        return name
    if isinstance(name, dict):
        pairs = []
        for op, b in name.items():
            if op not in OPS:
                raise ValueError(f"backend: unknown op {op!r} (ops: {sorted(OPS)})")
            if not isinstance(b, str) or b.lower() not in _CHOICES:
                raise ValueError(f"backend[{op!r}]: expected one of {_CHOICES}, got {b!r}")
            if b.lower() != "auto":
                pairs.append((op, b.lower()))
        return PerOp(sorted(pairs)) if pairs else "auto"
    raise ValueError(f"backend: expected one of {_CHOICES} or a dict op -> backend, got {name!r}")


class _State(threading.local):
    backend = None  # set_backend's request in this thread (None: FASTMETA_BACKEND / auto)


_state = _State()
# FASTMETA_BACKEND is read once, when fastmeta is imported (every op call asks for the backend:
# a lookup of the environment costs more than some fused ops' own overhead)
_ENV_BACKEND = os.environ.get("FASTMETA_BACKEND")


def _env_backend() -> str:
    return "auto" if _ENV_BACKEND is None else _parse_env_backend(_ENV_BACKEND)


@functools.lru_cache(maxsize=16)
def _parse_env_backend(raw: str) -> str:
    name = raw.strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"FASTMETA_BACKEND={name!r}: expected one of {_CHOICES}")
    return name


def get_backend() -> str | PerOp:
    """The backend requested now: set_backend/use_backend if set, else FASTMETA_BACKEND, else auto
    (a PerOp for a per-op request)."""
    name = _state.backend
    return name if name is not None else _env_backend()


def set_backend(name) -> None:
    """Request a backend for all ops, or one per op with a dict op -> backend (``None`` returns
    to FASTMETA_BACKEND / auto)."""
    _state.backend = _request(name)


class use_backend:
    """Context manager form of :func:`set_backend`: ``with use_backend("torch"): ...`` (the
    request before it comes back on exit). A class, not a generator: it wraps every step of a
    benchmark and costs a fraction of a generator-based context manager."""

    __slots__ = ("_name", "_old")

    def __init__(self, name):
        self._name = name if name is None or name.__class__ is PerOp else _request(name)

    def __enter__(self):
        self._old = _state.backend
        _state.backend = self._name

    def __exit__(self, *exc):
        _state.backend = self._old
        return False


# ---------------------------------------------------------------------------------------------
# What is built
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def build_status() -> dict:
    """Status of fastmeta._C: {'cpp': bool, 'cuda': bool, 'reason': str|None, ...}."""
    path = os.path.join(os.path.dirname(__file__), "_build_status.json")
    status = {"cpp": False, "cuda": False, "reason": "fastmeta._C was not built (no build status found)"}
    if os.path.exists(path):
        with open(path) as f:
            status.update(json.load(f))
    try:
        from . import _C  # noqa: F401
    except Exception as e:  # built but not importable (ABI mismatch, moved torch, ...)
        if status.get("cpp"):
            status = dict(status, cpp=False, cuda=False, reason=f"fastmeta._C does not import: {e}")
        return status
    import torch

    status["cpp"] = hasattr(torch.ops.fastmeta, "inner_update_scalar")
    status["cuda"] = bool(status.get("cuda")) and hasattr(torch.ops.fastmeta, "inner_update_scalar")
    if status["cpp"]:
        status["reason"] = None
    return status


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str | None]:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton not importable: {e}"
    try:
        from . import kernels  # noqa: F401
    except Exception as e:
        return False, f"fastmeta.kernels does not import: {e}"
    return True, None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on tensors of ``device_type``, else the reason."""
    if backend == "torch":
        return None
    if backend == "cpp":
        st = build_status()
        if not st["cpp"]:
            return st.get("reason") or "fastmeta._C not built"
        if device_type != "cpu":
            return f"the cpp backend runs on CPU tensors, got device {device_type!r}"
        return None
    if backend == "cuda":
        st = build_status()
        if not st["cpp"]:
            return st.get("reason") or "fastmeta._C not built"
        if not st["cuda"]:
            return "fastmeta._C was built without CUDA kernels (" + str(st.get("no_cuda_reason")) + ")"
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got device {device_type!r}"
        return None
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return why
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpret():
            return None
        return (f"the triton backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
                f"got device {device_type!r}")
    raise ValueError(f"unknown backend {backend!r}")


_warned: set = set()

# op name -> (implemented backends, {device type: preference list for auto})
OPS: dict = {}


def register_op(op: str, implemented: tuple, auto_order: dict) -> None:
    """Declares an op's backends. auto_order is written from benchmark results (benchmarks/RESULTS.md)."""
    unknown = [b for b in implemented if b not in BACKENDS]
    if unknown or "torch" not in implemented:
        raise ValueError(f"{op}: backends {implemented} must include 'torch' and only {BACKENDS}")
    OPS[op] = (tuple(implemented), {k: tuple(v) for k, v in auto_order.items()})


def select(op: str, device_type: str) -> str:
    """The backend an op call takes (see the module docstring)."""
    implemented, auto_order = OPS[op]
    want = get_backend()
    if want.__class__ is PerOp:
        want = want.get(op)
    if want == "auto" or want not in implemented:
        # An op that has no kernel of the requested backend at all runs its auto choice, so that
        # a whole model can run with e.g. set_backend('cpp') while only some ops have cpp kernels.
        return auto_backend(op, device_type)
    why = why_unavailable(want, device_type)
    if why is not None:
        raise BackendUnavailable(f"{op}: backend {want!r} unavailable: {why}")
    return want


def requested(op: str) -> str:
    """The backend requested now for op (a name, or 'auto')."""
    want = get_backend()
    return want.get(op) if want.__class__ is PerOp else want


def auto_backend(op: str, device_type: str) -> str:
    """The backend ``auto`` would take for op on this device type."""
    implemented, auto_order = OPS[op]
    for name in auto_order.get(device_type, ()):
        if name in implemented and why_unavailable(name, device_type) is None:
            return name
    return "torch"


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
