"""fastmeta's ops. Each module holds one op: its pure-PyTorch reference ``<op>_ref`` (differentiable
twice), its torch.library registration, autograd, and the dispatch over backends. The public API
calls these functions, never a kernel module directly."""
from .inner_update import inner_update, inner_update_ref
from .batched_linear import batched_linear, batched_linear_ref
from .task_loss import mse, mse_ref, cross_entropy, cross_entropy_ref
from .batched_conv2d import batched_conv2d, batched_conv2d_ref
from .batched_batch_norm import batched_batch_norm, batched_batch_norm_ref
from .bn_relu_pool import bn_relu_pool, bn_relu_pool_ref
from .conv_block import conv_bn_relu_pool, conv_bn_relu_pool_ref
from .mlp_forward import mlp_forward, mlp_forward_ref
from .mlp_inner_loop import (STEP_BACKENDS, runs_step_settings, check_args as check_mlp_args, mlp_adapt,
                             mlp_adapt_ref, mlp_inner_loop, mlp_inner_loop_ref, mlp_meta_grad, mlp_meta_grad_bound,
                             mlp_meta_grad_direct, mlp_meta_grad_layer_rates_direct, mlp_meta_loss,
                             mlp_meta_loss_direct)

__all__ = [
    "inner_update", "inner_update_ref", "batched_linear", "batched_linear_ref", "mse", "mse_ref",
    "cross_entropy", "cross_entropy_ref", "batched_conv2d", "batched_conv2d_ref",
    "batched_batch_norm", "batched_batch_norm_ref", "bn_relu_pool", "bn_relu_pool_ref", "conv_bn_relu_pool", "conv_bn_relu_pool_ref",
    "mlp_forward", "mlp_forward_ref", "mlp_inner_loop", "mlp_inner_loop_ref", "mlp_meta_grad", "mlp_meta_loss",
    "mlp_adapt", "mlp_adapt_ref",
]


def _register_cpp_fakes():
    """Registers the fake (meta) kernels of fastmeta._C's ops when fastmeta loads, so that an op
    first met inside torch.compile's tracing has its fake already (a few ms, once)."""
    from ..backend import build_status
    if not build_status()["cpp"]:
        return
    import importlib
    for module, registrar in (("inner_update", "_register_cpp"), ("mlp_inner_loop", "_register_cpp"),
                              ("batched_conv2d", "_register_aten"), ("bn_relu_pool", "_register_cpp")):
        getattr(importlib.import_module(f"{__name__}.{module}"), registrar)()


_register_cpp_fakes()
