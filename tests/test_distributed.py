"""Meta-gradients over 2 gloo processes on loopback equal the single-process meta-gradient."""
import multiprocessing as mp
import socket
import time

import pytest
import torch

import fastmeta
import fastmeta.distributed as fmd
from fastmeta.harness import make_workload
from conftest import assert_rel_close
import _dist_worker


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, args, world=2, timeout=180):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.time() + timeout
    try:
        while len(results) < world:
            left = deadline - time.time()
            assert left > 0, f"distributed workers did not finish in {timeout}s: got {sorted(results)}"
            rank, status, payload = q.get(timeout=left)
            results[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


def single_process(T, first_order):
    w = make_workload("sine", tasks=T, steps=3, dtype=torch.float64, seed=7)
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps, first_order=first_order)
    loss = meta(w.xs, w.ys, w.xq, w.yq)
    return list(torch.autograd.grad(loss, list(w.model.parameters()))), float(loss.detach())


def test_shard_is_contiguous_uneven_and_complete():
    parts = [fmd.shard(11, r, 3) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 11)]
    with pytest.raises(ValueError, match="num_tasks"):
        fmd.shard(1, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        fmd.shard(4, 2, 2)


def test_two_ranks_equal_one_process():
    cases = [(4, False, "batched"), (5, False, "batched"), (4, True, "batched"), (5, True, "batched"),
             (5, False, "maml")]
    res = spawn(_dist_worker.meta_grads, (cases,))
    for rank, (status, payload) in res.items():
        assert status == "ok", f"rank {rank}:\n{payload}"
    for i, (T, first_order, kind) in enumerate(cases):
        want, want_loss = single_process(T, first_order)
        for rank in (0, 1):
            grads, loss, nbuckets = res[rank][1][i]
            grads = [torch.from_numpy(g) for g in grads]
            assert nbuckets > 1
            assert_rel_close(grads, want, 1e-10, f"T={T} fo={first_order} {kind} rank {rank}")
            assert loss == pytest.approx(want_loss, rel=1e-12)


def test_a_failing_rank_does_not_hang_the_others():
    t0 = time.time()
    res = spawn(_dist_worker.failing, (), timeout=120)
    assert time.time() - t0 < 100
    status1, msg1 = res[1]
    assert status1 == "RuntimeError" and "rank 1" in msg1
    status0, msg0 = res[0]
    assert status0 == "RankError" and msg0.startswith("rank 0 of 2:"), msg0


def test_single_process_reducer_is_the_plain_mean():
    w = make_workload("sine", tasks=3, steps=2, dtype=torch.float64)
    meta = fastmeta.BatchedMAML(w.model, w.inner_lr, w.steps)
    reducer = fmd.MetaGradReducer(meta.parameters())
    reducer.backward(meta(w.xs, w.ys, w.xq, w.yq), num_tasks=3)
    ref = list(torch.autograd.grad(meta(w.xs, w.ys, w.xq, w.yq), list(w.model.parameters())))
    assert_rel_close([p.grad for p in w.model.parameters()], ref, 1e-12, "grads")
    with pytest.raises(ValueError, match="num_tasks"):
        reducer.backward(meta(w.xs, w.ys, w.xq, w.yq), num_tasks=0)
