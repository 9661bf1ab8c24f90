"""Meta-batches across processes and GPUs with torch.distributed (gloo on CPU, NCCL on GPU).

Each rank takes a shard of the meta-batch's tasks (uneven shards allowed), computes the mean query
loss over its own tasks with BatchedMAML (or a MAML/MetaSGD loop), and
:class:`MetaGradReducer` turns the per-rank gradients into the meta-gradient of the whole
meta-batch: every rank's gradient is weighted by its number of tasks, summed across ranks by
bucketed all-reduces that start while backward is still producing the other gradients (as DDP
does, buckets in a fixed order on every rank), then divided by the total number of tasks::

    dist.init_process_group("gloo")                      # torchrun sets rank / world size
    shard = fastmeta.distributed.shard(T)                # this rank's task indices (a slice)
    reducer = fastmeta.distributed.MetaGradReducer(meta.parameters())
    loss = meta(xs[shard], ys[shard], xq[shard], yq[shard])
    global_loss = reducer.backward(loss, num_tasks=shard.stop - shard.start)
    opt.step()

Errors name the rank: a collective that times out (a peer died or raised) is re-raised as
:class:`RankError` saying which rank waited and for what.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


class RankError(RuntimeError):
    """An error on one rank of a distributed meta-training run (the message names the rank)."""


def _rank_world(group=None):
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(num_tasks: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """The contiguous slice of ``range(num_tasks)`` that ``rank`` takes: the first
    ``num_tasks % world_size`` ranks take one task more. Every rank must get at least one task."""
    r, w = _rank_world()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    if not isinstance(num_tasks, int) or num_tasks < world_size:
        raise ValueError(f"num_tasks: {num_tasks} tasks cannot be shared by {world_size} ranks "
                         "(each rank needs at least one)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} is not in [0, {world_size})")
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class MetaGradReducer:
    """Task-weighted, bucketed, overlapped all-reduce of meta-gradients (see the module docstring).

    Args:
        params: the meta-parameters (e.g. ``meta.parameters()``), in the same order on every rank.
        bucket_mb: bucket size in MiB (DDP's default is 25).
        group: the process group (default: the world).
    """

    def __init__(self, params, bucket_mb: float = 25.0, group=None):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: no parameter requires grad")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb: must be > 0, got {bucket_mb}")
        self.group = group
        cap = int(bucket_mb * 2**20)
        self.buckets: list[list[int]] = [[]]
        size = 0
        for i, p in enumerate(self.params):
            nbytes = p.numel() * p.element_size()
            if self.buckets[-1] and size + nbytes > cap:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += nbytes
        self._bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, p in enumerate(self.params)]
        self._active = False

    def _make_hook(self, i):
        def hook(_param):
            if self._active:
                self._ready[i] = True
                self._launch_ready()
        return hook

    def _launch_ready(self):
        # buckets go out strictly in order, so every rank issues the same collective sequence
        while self._next < len(self.buckets) and all(self._ready[i] for i in self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b):
        idx = self.buckets[b]
        grads = []
        for i in idx:
            p = self.params[i]
            grads.append((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1))
        flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._pending.append((b, flat, work))

    def _wait(self, work, what):
        rank, world = _rank_world(self.group)
        try:
            work.wait()
        except Exception as e:
            raise RankError(f"rank {rank} of {world}: {what} failed; another rank probably raised "
                            f"or died ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    def backward(self, loss: torch.Tensor, num_tasks: int) -> torch.Tensor:
        """Backpropagates ``loss`` (the mean over this rank's ``num_tasks`` tasks) and leaves in each
        parameter's ``.grad`` the meta-gradient of the mean over all ranks' tasks. Returns that
        global mean loss (detached). Existing ``.grad`` values are overwritten."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss: expected a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks: expected an int >= 1, got {num_tasks!r}")
        rank, world = _rank_world(self.group)
        for p in self.params:
            p.grad = None
        stats = torch.stack([loss.detach().to(torch.float64) * num_tasks,
                             torch.tensor(float(num_tasks), dtype=torch.float64, device=loss.device)])
        if world == 1:
            (loss * num_tasks).backward()
            total, n = float(stats[0]), num_tasks
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(n)
            return torch.tensor(total / n, dtype=torch.float64).to(loss.dtype)
        stat_work = dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._ready = [False] * len(self.params)
        self._next, self._pending, self._active = 0, [], True
        try:
            (loss * num_tasks).backward()  # hooks launch bucket all-reduces as gradients arrive
            self._ready = [True] * len(self.params)
            self._launch_ready()           # unused parameters: their buckets go out now, in order
        finally:
            self._active = False
        self._wait(stat_work, "the all-reduce of the task counts")
        n = stats[1].item()
        for b, flat, work in self._pending:
            self._wait(work, f"the all-reduce of gradient bucket {b}")
            flat.div_(n)
            offset = 0
            for i in self.buckets[b]:
                p = self.params[i]
                chunk = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
        return (stats[0] / stats[1]).to(loss.dtype).cpu()

    def remove(self):
        """Removes the gradient hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def init_from_env(backend: str | None = None, timeout_s: float = 60.0):
    """init_process_group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), gloo on
    CPU and NCCL when CUDA is available unless ``backend`` says otherwise; a missed collective
    raises after ``timeout_s`` instead of hanging."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
