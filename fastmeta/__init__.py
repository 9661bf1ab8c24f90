"""fastmeta: fast MAML-style meta-learning for PyTorch.

- ``MAML`` / ``MetaSGD``: drop-in replacements for learn2learn's, with the parameter update done in
  one fused op call.
- ``BatchedMAML``: a whole meta-batch of tasks (leading dim T) in one call, with exact
  (second-order) meta-gradients.
- ``step_loss_schedule(...)``: MAML++'s annealed weights for BatchedMAML's multi-step loss.
- ``explain(model)``: how a model is lowered; ``set_backend`` / ``use_backend``: backend choice.
- ``graphed(meta, xs, ys, xq, yq)``: a BatchedMAML meta-step captured in one CUDA graph.
- ``profile(...)``: per-phase times, op and launch counts, memory and a trace of meta-iterations.
- ``tune(meta, xs, ys, xq, yq)``: times the meta-step on each backend here, keeps the fastest.
- ``conv_autotune_choices()`` / ``clear_conv_autotune()``: what the convolutions' shape-by-shape
  timing chose (CUDA; README, FASTMETA_CONV_AUTOTUNE), and forgetting it.
- ``set_conv_precision`` / ``use_conv_precision`` / ``get_conv_precision``: float32 convolutions
  in float32 ('ieee') or as three TF32 tensor-core products ('tf32x3').
"""
from .backend import BackendUnavailable, get_backend, set_backend, use_backend
from .batched import BatchedMAML, step_loss_schedule
from .graphs import GraphedStep, graphed
from .maml import MAML, MetaSGD, clone_module
from .plan import UnsupportedModule, explain, lower_as
from .tune import Tuning, tune
from .ops.batched_conv2d import autotune_choices as conv_autotune_choices
from .ops.batched_conv2d import clear_autotune_choices as clear_conv_autotune
from .ops.batched_conv2d import get_conv_precision, set_conv_precision, use_conv_precision
from . import profile  # noqa: E402  (a callable module: fastmeta.profile(...) is the profiler)

__version__ = "0.1.0"

__all__ = [
    "MAML", "MetaSGD", "BatchedMAML", "graphed", "GraphedStep", "explain", "lower_as", "clone_module", "set_backend",
    "get_backend",
    "use_backend", "BackendUnavailable", "UnsupportedModule", "profile", "tune", "Tuning",
    "conv_autotune_choices", "clear_conv_autotune", "get_conv_precision", "set_conv_precision",
    "use_conv_precision", "step_loss_schedule", "__version__",
]
