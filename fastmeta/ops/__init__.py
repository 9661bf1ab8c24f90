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
from .mlp_inner_loop import (check_args as check_mlp_args, mlp_inner_loop, mlp_inner_loop_ref, mlp_meta_grad,
                             mlp_meta_grad_direct, mlp_meta_loss, mlp_meta_loss_direct)

__all__ = [
    "inner_update", "inner_update_ref", "batched_linear", "batched_linear_ref", "mse", "mse_ref",
    "cross_entropy", "cross_entropy_ref", "batched_conv2d", "batched_conv2d_ref",
    "batched_batch_norm", "batched_batch_norm_ref", "bn_relu_pool", "bn_relu_pool_ref", "conv_bn_relu_pool", "conv_bn_relu_pool_ref",
    "mlp_inner_loop", "mlp_inner_loop_ref", "mlp_meta_grad", "mlp_meta_loss",
]
