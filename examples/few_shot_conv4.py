"""Few-shot classification with the conv4 network of MAML (Finn et al. 2017) on BatchedMAML.

    python examples/few_shot_conv4.py --iterations 200                   # CPU or the default GPU
    python examples/few_shot_conv4.py --device cuda --tasks 32 --tune --graphed

The tasks are synthetic so that the script runs anywhere without a download: a pool of classes,
each a random 1 x 28 x 28 prototype; a task draws `ways` classes, and its images are a class's
prototype plus noise (`shots` per class in the support set, `query` per class in the query set),
labels permuted per task. Swap `sample_tasks` for an Omniglot / mini-ImageNet loader with the same
shapes ([T, ways * shots, C, H, W] images, [T, ways * shots] labels) to train on real data.

Each iteration: one meta-step over `tasks` tasks (second order unless --first-order), Adam on the
meta-parameters. --tune times the step on each available backend first and keeps the fastest
(fastmeta.tune); --graphed (CUDA) captures the step in one CUDA graph (fastmeta.graphed);
--task-chunk N holds N tasks' graphs at a time; --anil adapts only the head in the inner loop
(ANIL); --maml-plus-plus learns a rate per layer and inner step and BatchNorm weights per inner
step, and trains on the weighted query losses of every step, the weights annealed towards the
last step over --anneal iterations (MAML++); --reptile trains with Reptile's update instead
(BatchedMAML.reptile_grad on the support sets; the query sets then only measure). Prints one JSON
line every --log-every iterations:
the mean query loss, the query accuracy after adaptation, and the step time.
"""
import argparse
import json
import sys
import time

import torch

import fastmeta
from fastmeta.harness import conv4


def sample_tasks(prototypes, T, ways, shots, query, noise, generator):
    """xs [T, ways*shots, C, H, W], ys [T, ways*shots], xq [T, ways*query, ...], yq [T, ways*query]."""
    n_classes = prototypes.shape[0]
    classes = torch.stack([torch.randperm(n_classes, generator=generator)[:ways] for _ in range(T)])  # [T, ways]

    def draw(per_class):
        labels = torch.arange(ways).repeat_interleave(per_class).expand(T, -1)  # [T, ways*per_class]
        protos = prototypes[classes.gather(1, labels)]                            # [T, ways*per_class, C, H, W]
        return protos + noise * torch.randn(protos.shape, generator=generator), labels.contiguous()

    xs, ys = draw(shots)
    xq, yq = draw(query)
    return xs, ys, xq, yq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=8, help="meta-batch size T")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--query", type=int, default=15, help="query images per class")
    ap.add_argument("--classes", type=int, default=100, help="size of the synthetic class pool")
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1, help="inner steps S")
    ap.add_argument("--inner-lr", type=float, default=0.4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--task-chunk", type=int, default=None)
    ap.add_argument("--recompute", action="store_true",
                    help="recompute the first conv block's output (and, with --checkpoint-steps or "
                         "--first-order, the query's later blocks') in the backward instead of keeping it")
    ap.add_argument("--checkpoint-steps", action="store_true",
                    help="keep no graph across inner steps; the outer backward recomputes each step's")
    ap.add_argument("--anil", action="store_true",
                    help="ANIL: the inner loop adapts the linear head only (the body is still meta-learned)")
    ap.add_argument("--maml-plus-plus", action="store_true",
                    help="MAML++: learned rates per layer and inner step, per-step BatchNorm, the multi-step loss")
    ap.add_argument("--anneal", type=int, default=None,
                    help="--maml-plus-plus: iterations over which the step losses' weight moves to the last "
                         "step (default: half the iterations)")
    ap.add_argument("--reptile", action="store_true",
                    help="Reptile: the update theta - the tasks' mean adapted theta (the query sets only measure)")
    ap.add_argument("--tune", action="store_true", help="fastmeta.tune before training")
    ap.add_argument("--graphed", action="store_true", help="capture the step in a CUDA graph (CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.graphed and args.device != "cuda":
        ap.error("--graphed needs --device cuda")
    if args.graphed and args.maml_plus_plus:
        ap.error("--maml-plus-plus changes the step losses' weights each iteration, which a captured graph "
                 "fixes: leave out --graphed")
    if args.graphed and args.reptile:
        ap.error("--graphed captures value_and_grad's step; --reptile runs reptile_grad: leave out --graphed")
    anneal = args.anneal or max(1, args.iterations // 2)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    prototypes = torch.randn(args.classes, 1, 28, 28, generator=g)
    model = conv4(1, args.channels, args.ways, 28).to(args.device)
    meta = fastmeta.BatchedMAML(model, args.inner_lr, args.steps, first_order=args.first_order,
                                loss="cross_entropy", task_chunk=args.task_chunk, recompute=args.recompute,
                                checkpoint_steps=args.checkpoint_steps,
                                inner_params=model[-1] if args.anil else None,
                                learn_inner_lr="per_layer_step" if args.maml_plus_plus else False,
                                per_step_bn=args.maml_plus_plus)
    opt = torch.optim.Adam(meta.parameters(), lr=args.lr)

    def batch():
        return [t.to(args.device) for t in sample_tasks(prototypes, args.tasks, args.ways, args.shots, args.query,
                                                        args.noise, g)]

    if args.tune:
        print(fastmeta.tune(meta, *batch()), file=sys.stderr)
    if args.reptile:
        def step(xs, ys, xq, yq):
            return meta.reptile_grad(xs, ys)
    else:
        step = fastmeta.graphed(meta, *batch()) if args.graphed else meta.value_and_grad
    for it in range(1, args.iterations + 1):
        xs, ys, xq, yq = batch()
        if args.maml_plus_plus:
            meta.step_loss_weights = fastmeta.step_loss_schedule(args.steps, it - 1, anneal)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, grads = step(xs, ys, xq, yq)
        for p, gr in zip(meta.parameters(), grads):
            p.grad = gr
        opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0)
        if it % args.log_every == 0 or it == args.iterations:
            with torch.no_grad():
                if args.reptile:  # (its step's loss is the support loss: the query loss after adaptation here)
                    loss = meta(xs, ys, xq, yq)
                params = meta.adapt(xs, ys)
                acc = (meta.predict(params, xq).argmax(-1) == yq).float().mean()
            print(json.dumps({"iteration": it, "query_loss": round(float(loss), 4),
                              "query_accuracy": round(float(acc), 4), "step_ms": round(ms, 2)}), flush=True)


if __name__ == "__main__":
    main()
