"""What tracking BatchNorm running statistics costs a BatchedMAML step: conv4 (64 channels,
BatchNorm2d -> ReLU -> MaxPool2d(2) blocks, an nn.Sequential) with PyTorch's default
`BatchNorm2d(64)` (track_running_stats=True: each pass records every task's batch statistics, as
the per-task loop's forward passes update them) against `track_running_stats=False`, on the
Omniglot shape (1 x 28 x 28, 5-way 1-shot, 15 query a class, S=1, inner lr 0.4), value_and_grad,
the two rows interleaved in rounds (fastmeta.harness.time_interleaved), medians. --recompute:
both BatchedMAML(recompute=True) (the first block as one conv_bn_relu_pool op).

    python benchmarks/bn_running_stats.py [--tasks 8] [--order second] [--device cpu] [--seconds 3]
                                          [--recompute]
"""
import argparse

import torch
from torch import nn

import fastmeta
from fastmeta import harness as H
from more_modules import _classes  # (the benchmarks folder is the script's own)


def conv4(track, channels=64, ways=5):
    blocks, c = [], 1
    for _ in range(4):
        blocks += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels, track_running_stats=track),
                   nn.ReLU(), nn.MaxPool2d(2)]
        c = channels
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels, ways))


def run(tasks, order, device, seconds, recompute=False):
    g = torch.Generator().manual_seed(0)
    batch = tuple(t.to(device) for t in _classes(tasks, 1, 15, 5, (1, 28, 28), g))
    rows = {}
    for track in (False, True):
        torch.manual_seed(0)
        meta = fastmeta.BatchedMAML(conv4(track).to(device), 0.4, 1, first_order=order == "first",
                                    loss="cross_entropy", recompute=recompute)
        rows[f"track_running_stats={track}"] = lambda meta=meta: meta.value_and_grad(*batch)[1]
    timed = H.time_interleaved(rows, device, seconds=seconds, min_calls=3, max_seconds=4 * seconds)
    print(f"\nconv4 64ch Omniglot shape, T={tasks}, S=1, {order} order{', recompute=True' if recompute else ''}, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| BatchNorm2d | median ms | calls | vs untracked |")
    print("|---|---|---|---|")
    base = timed["track_running_stats=False"][0]
    for k, (med, times, err) in timed.items():
        print(f"| {k} | failed: {err} | | |" if med is None else
              f"| {k} | {med:.1f} | {len(times)} | {med / base:.3f} |")
    return timed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--order", default="second")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--recompute", action="store_true")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return {order: run(a.tasks, order, a.device, a.seconds, a.recompute) for order in a.order.split(",")}


if __name__ == "__main__":
    main()
