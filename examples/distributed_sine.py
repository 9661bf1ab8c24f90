"""Sine-wave MAML over several processes with torch.distributed.

    torchrun --nproc_per_node=2 examples/distributed_sine.py --tasks 50 --iterations 100
    python examples/distributed_sine.py --tasks 50 --iterations 100        # one process, same result

Every rank builds the same meta-parameters (same seed) and draws the same global meta-batch of
sine tasks each iteration (seeded by the iteration), then works on its own shard of the tasks;
MetaGradReducer averages the meta-gradient over all tasks, weighted by shard size. Rank 0 prints one
JSON line per iteration with the global mean query loss, so runs with different numbers of
processes can be compared line by line.
"""
import argparse
import json
import os
import sys
import time

import torch

import fastmeta
import fastmeta.distributed as fmd
from fastmeta.harness import sine_mlp, sine_tasks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=50, help="global meta-batch size")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: leave)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        fmd.init_from_env()
    rank = torch.distributed.get_rank() if distributed else 0
    dtype = getattr(torch, args.dtype)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    try:
        torch.manual_seed(args.seed)  # the same meta-parameters on every rank
        model = sine_mlp().to(device=device, dtype=dtype)
        meta = fastmeta.BatchedMAML(model, args.inner_lr, args.steps, first_order=args.first_order)
        opt = torch.optim.Adam(meta.parameters(), lr=args.lr)
        reducer = fmd.MetaGradReducer(meta.parameters())
        part = fmd.shard(args.tasks)
        for it in range(args.iterations):
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
            xs, ys, xq, yq = (t.to(device=device, dtype=dtype) for t in sine_tasks(args.tasks, g))
            loss = meta(xs[part], ys[part], xq[part], yq[part])
            global_loss = reducer.backward(loss, num_tasks=part.stop - part.start)
            opt.step()
            if rank == 0:
                ms = (time.perf_counter() - t0) * 1e3
                print(json.dumps({"iteration": it, "loss": float(global_loss), "ms": round(ms, 3)}), flush=True)
    except Exception as e:
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
