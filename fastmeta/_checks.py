"""Argument checks shared by the ops and the public API. Each raises before any compute, with the
argument's name and the shapes involved."""
from __future__ import annotations

import math
import numbers

import torch

from ._flags import ThreadFlag


def tensor(name: str, t, dim: int | None = None, min_dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dims, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(t.shape)}")
    return t


# The dtypes of fastmeta's kernels (C++, CUDA, Triton). A call in another dtype (bfloat16, float16)
# takes the op's torch reference whatever the backend: the kernels compute in these two only.
KERNEL_DTYPES = (torch.float32, torch.float64)


def floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def same_device_dtype(names_tensors, what="tensors") -> None:
    ref_name, ref = names_tensors[0]
    for name, t in names_tensors[1:]:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def lr_value(name: str, lr):
    """A learning rate: a real number or a tensor (returned unchanged)."""
    if isinstance(lr, bool) or not isinstance(lr, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(lr).__name__}")
    if isinstance(lr, torch.Tensor):
        if not lr.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {lr.dtype}")
    elif not math.isfinite(lr):
        raise ValueError(f"{name}: expected a finite number, got {lr}")
    return lr


def shapes(ts) -> str:
    return "[" + ", ".join(str(tuple(t.shape)) if t is not None else "None" for t in ts) + "]"


_labels_checked = ThreadFlag()


def labels_checked():
    """Within it the label range checks are skipped (each is a device sync): for a caller that
    checked the labels itself, e.g. fastmeta.graphed before copying a batch into a CUDA graph."""
    return _labels_checked.enabled()


def labels_skipped() -> bool:
    return _labels_checked.on


def labels_in_range(named, C: int, who: str) -> None:
    """Cross-entropy labels must be class indices in [0, C): checked on the values of every
    (name, tensor) in named, with one device sync for all of them."""
    if _labels_checked.on:
        return
    named = [(n, y) for n, y in named if y.numel()]
    if not named:
        return
    ends = torch.stack([torch.stack([y.min(), y.max()]).long() for _, y in named]).tolist()
    for (name, y), (lo, hi) in zip(named, ends):
        if lo < 0 or hi >= C:
            raise ValueError(f"{who}: {name} {tuple(y.shape)} has labels outside [0, {C}) (min {lo}, max {hi}); "
                             f"cross_entropy takes class indices 0..{C - 1} for {C} logits (no ignore_index "
                             "such as -100)")


def dispatch_plain() -> bool:
    """Whether nothing that the dispatcher would route elsewhere is in effect: no torch function or
    dispatch mode, no functorch transform, no compilation (a direct kernel call, or a module call
    replaced by fastmeta's ops, then computes what the ops would)."""
    return not (torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling())
