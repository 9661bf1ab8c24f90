"""Small constant tensors that kernels read from device memory, made once per value and device.

A launcher that built them per call (torch.tensor(..., device=cuda)) would copy from host memory on
every call, and could not be captured in a CUDA graph (fastmeta.graphed): the copy syncs."""
import functools


@functools.lru_cache(maxsize=256)
def device_constant(values: tuple, dtype, device: str):
    """A 1-d tensor of ``values`` (read-only: shared by every caller with the same values)."""
    import torch

    return torch.tensor(values, dtype=dtype, device=device)
