"""Named phases of a meta-iteration, marked with torch.profiler record_function ranges (and NVTX
ranges on CUDA while fastmeta.profile asks for them). Cheap when no profiler is running."""
from __future__ import annotations

import contextlib

import torch

PHASES = ("inner_forward", "inner_backward", "update", "query_forward", "fused_inner_loop",
          "outer_backward")
_nvtx = {"on": False}


@contextlib.contextmanager
def phase(name: str):
    with torch.autograd.profiler.record_function(f"fastmeta.{name}"):
        if _nvtx["on"]:
            torch.cuda.nvtx.range_push(f"fastmeta.{name}")
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        else:
            yield
