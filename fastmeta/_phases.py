"""Named phases of a meta-iteration, marked with torch.profiler record_function ranges (and NVTX
ranges on CUDA while fastmeta.profile asks for them). Free when no profiler is running: the range
is only opened while one is (a record_function costs ~6 us per use otherwise)."""
from __future__ import annotations

import contextlib

import torch

PHASES = ("inner_forward", "inner_backward", "update", "query_forward", "fused_inner_loop",
          "outer_backward")
_nvtx = {"on": False}
_profiling = torch._C._autograd._profiler_enabled


@contextlib.contextmanager
def _range(name: str):
    with torch.autograd.profiler.record_function(f"fastmeta.{name}"):
        if _nvtx["on"]:
            torch.cuda.nvtx.range_push(f"fastmeta.{name}")
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        else:
            yield


def ranges_on() -> bool:
    """Whether phase() opens ranges now: a profiler runs, or NVTX ranges are asked for."""
    return _profiling() or _nvtx["on"]


def phase(name: str):
    """A context manager marking phase ``name`` (a no-op unless a profiler runs)."""
    if ranges_on():
        return _range(name)
    return contextlib.nullcontext()
