"""``mlp_forward``: one MLP on x [N, d_0] (Linear layers, each followed by ReLU, LeakyReLU, Tanh,
Sigmoid or nothing), the forward of the drop-in learners (fastmeta.MAML / MetaSGD) for such a model.

    x [N, d_0], params [W_1, b_1, ..., W_L, b_L], acts [L] (0 none, 1 relu, 2 leaky relu, 3 tanh,
    4 sigmoid)  ->  a_L [N, d_L]

Backend ``cpp`` (and ``cuda`` for CUDA tensors): fastmeta::mlp_forward (csrc/mlp_forward.cpp), whose
autograd is in C++: one node for the forward, one for its backward (every parameter's gradient in
one op, itself differentiable), and that backward's derivative in closed form (Pearlmutter's
R-operator on the kept activations: second-order MAML's outer backward); a derivative of higher order
recomputes through recorded ATen ops. A per-task loop of second-order MAML records a few nodes a
step instead of one per layer, activation and backward formula. On the CPU a small MLP (N * sum_l
d_l d_(l-1) up to 2^17 multiply-adds; fastmeta._C._mlp_forward_small_macs) runs those three as
plain loops, without ATen's per-call dispatch: the sine MLP's forward with its first and second
derivatives 1.2-1.3x faster than through ATen's calls. The reference, ``mlp_forward_ref``, is the
layers as torch ops (what the module's own call computes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import register_op, select

IMPLEMENTED = ("torch", "cpp", "cuda")
AUTO = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "torch")}
register_op("mlp_forward", IMPLEMENTED, AUTO)

ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}


def mlp_forward_ref(x, params, acts, negative_slope=0.01):
    """The layers as torch ops (differentiable to any order)."""
    a = x
    for i, code in enumerate(acts):
        a = F.linear(a, params[2 * i], params[2 * i + 1])
        if code == 1:
            a = torch.relu(a)
        elif code == 2:
            a = F.leaky_relu(a, negative_slope)
        elif code == 3:
            a = torch.tanh(a)
        elif code == 4:
            a = torch.sigmoid(a)
    return a


def mlp_forward(x, params, acts, negative_slope=0.01):
    """The MLP on x [..., d_0] (leading dims flattened for the op and restored)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"mlp_forward: x must be a tensor [..., d_0], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if select("mlp_forward", x.device.type) == "torch":
        return mlp_forward_ref(x, params, acts, negative_slope)
    if x.dim() == 2:
        return torch.ops.fastmeta.mlp_forward(x, list(params), list(acts), float(negative_slope))
    lead = x.shape[:-1]
    out = torch.ops.fastmeta.mlp_forward(x.reshape(-1, x.shape[-1]), list(params), list(acts),
                                         float(negative_slope))
    return out.reshape(*lead, out.shape[-1])
