"""fastmeta::inner_update_scalar with its autograd in C++ (the op's Autograd kernel, what
ops.inner_update calls on the cpp and cuda backends) against the same op under a Python
torch.autograd.Function with the same backward: one update of the sine MLP's six parameter tensors
for T tasks (step-0 broadcast meta-parameters, per-task gradients, all requiring grad), the update
alone and the update with its backward (torch.autograd.grad of the outputs' sum). The rows are
interleaved in rounds (fastmeta.harness.time_interleaved); medians of single calls, microseconds.

    python benchmarks/inner_update_autograd.py [--tasks 1,25] [--seconds 2] [--threads 1]
"""
import argparse
import platform

import torch

import fastmeta
from fastmeta import harness as H
from fastmeta.ops.inner_update import _register_cpp


class PythonFunction(torch.autograd.Function):
    """The same op and backward as csrc/inner_update.cpp's InnerUpdate, in Python."""

    @staticmethod
    def forward(ctx, n, lr, *tensors):
        outs = torch.ops.fastmeta.inner_update_scalar(list(tensors[:n]), list(tensors[n:]), lr)
        ctx.lr, ctx.shapes = lr, [p.shape for p in tensors[:n]]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gos):
        dp = [None if go is None else go.sum_to_size(s) for go, s in zip(gos, ctx.shapes)]
        dg = [None if go is None else go * (-ctx.lr) for go in gos]
        return (None, None, *dp, *dg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="1,25")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _register_cpp()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, fastmeta "
          f"{fastmeta.__version__}, {torch.get_num_threads()} thread(s)")
    print("| T | what | Python Function us | C++ autograd us | ratio |")
    print("|---|---|---|---|---|")
    for T in (int(t) for t in args.tasks.split(",")):
        model = H.make_workload("sine", tasks=1).model
        params = [p.detach().requires_grad_() for p in model.parameters()]
        grads = [torch.randn(T, *p.shape, requires_grad=True) for p in params]
        n = len(params)

        def cpp():
            return torch.ops.fastmeta.inner_update_scalar(params, grads, 0.01)

        def python():
            return PythonFunction.apply(n, 0.01, *params, *grads)

        def with_backward(f):
            def run():
                torch.autograd.grad(sum(o.sum() for o in f()), params + grads)
            return run
        for a, b in zip(cpp(), python()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for what, fns in (("update", (python, cpp)), ("update + backward", (with_backward(python), with_backward(cpp)))):
            res = H.time_interleaved({"python": fns[0], "cpp": fns[1]}, seconds=args.seconds, max_calls=10 ** 6)
            py, cc = (res[k][0] * 1e3 for k in ("python", "cpp"))
            print(f"| {T} | {what} | {py:.1f} | {cc:.1f} | {py / cc:.2f}x |")


if __name__ == "__main__":
    main()
