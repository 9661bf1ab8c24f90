"""Worker processes for tests/test_distributed.py (spawned; gloo on loopback)."""
import datetime
import os
import traceback

import torch
import torch.distributed as dist


def _init(rank, world, port, timeout_s):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def meta_grads(rank, world, port, cases, queue):
    """For each case (T, first_order, sizes or None): this rank's reduced meta-gradient."""
    try:
        _init(rank, world, port, 60)
        import fastmeta
        import fastmeta.distributed as fmd
        from fastmeta.harness import make_workload
        out = []
        for T, first_order, kind in cases:
            w = make_workload("sine", tasks=T, steps=3, dtype=torch.float64, seed=7)
            part = fmd.shard(T)
            if kind == "batched":
                meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order)
                reducer = fmd.MetaGradReducer(meta.parameters(), bucket_mb=0.004)  # several buckets
                loss = meta(w.xs[part], w.ys[part], w.xq[part], w.yq[part])
            else:  # the learn2learn-style loop with fastmeta.MAML
                maml = fastmeta.MAML(w.model, lr=w.inner_lr, first_order=first_order)
                reducer = fmd.MetaGradReducer(maml.parameters(), bucket_mb=0.004)
                total = 0.0
                for t in range(part.start, part.stop):
                    learner = maml.clone()
                    for _ in range(w.steps):
                        learner.adapt(torch.nn.functional.mse_loss(learner(w.xs[t]), w.ys[t]))
                    total = total + torch.nn.functional.mse_loss(learner(w.xq[t]), w.yq[t])
                loss = total / (part.stop - part.start)
            g_loss = reducer.backward(loss, num_tasks=part.stop - part.start)
            out.append(([p.grad.numpy().copy() for p in w.model.parameters()], float(g_loss), len(reducer.buckets)))
            reducer.remove()
        queue.put((rank, "ok", out))
    except Exception:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def failing(rank, world, port, queue):
    """Rank 1 raises before the all-reduce; rank 0 must get a RankError, not hang."""
    try:
        _init(rank, world, port, 4)
        import fastmeta
        import fastmeta.distributed as fmd
        from fastmeta.harness import make_workload
        w = make_workload("sine", tasks=4, steps=1, dtype=torch.float64)
        meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps)
        reducer = fmd.MetaGradReducer(meta.parameters())
        if rank == 1:
            raise RuntimeError("rank 1: simulated failure in the task sampler")
        loss = meta(w.xs[:2], w.ys[:2], w.xq[:2], w.yq[:2])
        reducer.backward(loss, num_tasks=2)
        queue.put((rank, "ok", None))
    except Exception as e:
        queue.put((rank, type(e).__name__, str(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
