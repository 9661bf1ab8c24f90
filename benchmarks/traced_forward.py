"""Models written with their own forward, as meta-learning code writes them, on BatchedMAML:
their forward traced into batched steps (`fastmeta_vg`: value_and_grad on the auto backend) against
the same model run as a whole through the torch.func vmap fallback (`fastmeta_vg_untraced`: the
model given a forward pre-hook that does nothing, so that the planner calls it as a whole, the
path every custom forward took before), the same network written as an nn.Sequential
(`fastmeta_vg_sequential`) and the per-task loop, rows interleaved in rounds
(fastmeta.harness.time_interleaved), medians of whole meta-iterations, each row's meta-gradient
against the loop's.

Models (`--models`):
- `sine`: learn2learn's sine example model (three Linear layers, F.relu between them, 1-40-40-1),
  T=25, K=Q=10, S=5, inner lr 0.01 (mse): traced, it runs the fused MLP kernel;
- `omniglot_cnn`: four conv blocks, each a custom module (Conv2d -> BatchNorm2d -> F.relu ->
  MaxPool2d(2)), then x.view(x.size(0), -1) and a linear head; Omniglot's shape (1 x 28 x 28, 64
  channels, 5-way 1-shot, 15 query a class, S=1, inner lr 0.4), T=8 on the CPU, 32 on a GPU;
- `resnet_omniglot`: three ResNet blocks (two 3x3 convolutions with BatchNorm, a 1x1 shortcut with
  BatchNorm, their sum, ReLU, MaxPool2d(2); 32, 64, 64 channels), mean pooling and a linear head on
  the same tasks: not a chain, so one graph step (no Sequential row).
- `metamodule_omniglot`: omniglot_cnn with a MetaModule-style BatchNorm2d (forward(x, params=None),
  which torch.fx cannot trace): traced with that BatchNorm run through vmap, and (row
  `fastmeta_vg_lower_as`) with it declared a BatchNorm2d by fastmeta.lower_as;
- `functional_omniglot`: MAML reference code's functional conv net (a ParameterList, F.conv2d with
  stride 2 -> F.relu(inplace=True) -> F.batch_norm on running statistics held as Parameters, 64
  channels, x.view, F.linear) on the same tasks; no untraced row (the vmap fallback raises on
  F.batch_norm's update of the statistics).

    python benchmarks/traced_forward.py [--models sine,omniglot_cnn] [--order second,first] [--tasks T]
                                        [--device cpu|cuda] [--seconds 2]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import harness as H
from more_modules import _classes, _nothing  # (the benchmarks folder is the script's own)


class SineModel(nn.Module):
    def __init__(self, dim=40):
        super().__init__()
        self.hidden1, self.hidden2, self.hidden3 = nn.Linear(1, dim), nn.Linear(dim, dim), nn.Linear(dim, 1)

    def forward(self, x):
        x = F.relu(self.hidden1(x))
        x = F.relu(self.hidden2(x))
        return self.hidden3(x)

    def sequential(self):
        return nn.Sequential(self.hidden1, nn.ReLU(), self.hidden2, nn.ReLU(), self.hidden3)


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.normalize = nn.BatchNorm2d(cout, track_running_stats=False)
        self.max_pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.max_pool(F.relu(self.normalize(self.conv(x))))


class OmniglotCNN(nn.Module):
    def __init__(self, ways=5, hidden=64):
        super().__init__()
        self.features = nn.Sequential(ConvBlock(1, hidden), *(ConvBlock(hidden, hidden) for _ in range(3)))
        self.classifier = nn.Linear(hidden, ways)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)

    def sequential(self):
        mods = []
        for b in self.features:
            mods += [b.conv, b.normalize, nn.ReLU(), b.max_pool]
        return nn.Sequential(*mods, nn.Flatten(), self.classifier)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.pool(F.relu(out + self.shortcut(x)))


class ResNetSmall(nn.Module):
    def __init__(self, ways=5, widths=(32, 64, 64)):
        super().__init__()
        blocks, c = [], 1
        for w in widths:
            blocks.append(ResBlock(c, w))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(c, ways)

    def forward(self, x):
        return self.classifier(self.blocks(x).mean(dim=(2, 3)))

    def sequential(self):
        return None


class Learner(nn.Module):
    """The functional form of MAML reference code: a ParameterList of weights, running statistics as
    Parameters that do not require grad, F.conv2d -> F.relu(inplace=True) -> F.batch_norm blocks
    (stride-2 convolutions, Omniglot's configuration), x.view(x.size(0), -1), F.linear."""

    def __init__(self, ways=5, hidden=64):
        super().__init__()
        self.config = [(1, 3, 2), (hidden, 3, 2), (hidden, 3, 2), (hidden, 2, 1)]  # (in channels, kernel, stride)
        self.vars, self.vars_bn = nn.ParameterList(), nn.ParameterList()
        for cin, k, _ in self.config:
            w = nn.Parameter(torch.empty(hidden, cin, k, k))
            nn.init.kaiming_normal_(w)
            self.vars.extend([w, nn.Parameter(torch.zeros(hidden)), nn.Parameter(torch.ones(hidden)),
                              nn.Parameter(torch.zeros(hidden))])
            self.vars_bn.extend([nn.Parameter(torch.zeros(hidden), requires_grad=False),
                                 nn.Parameter(torch.ones(hidden), requires_grad=False)])
        w = nn.Parameter(torch.empty(ways, hidden))
        nn.init.kaiming_normal_(w)
        self.vars.extend([w, nn.Parameter(torch.zeros(ways))])

    def forward(self, x, vars=None, bn_training=True):
        v = self.vars if vars is None else vars
        for i, (_, _, stride) in enumerate(self.config):
            x = F.conv2d(x, v[4 * i], v[4 * i + 1], stride=stride, padding=0)
            x = F.relu(x, inplace=True)
            x = F.batch_norm(x, self.vars_bn[2 * i], self.vars_bn[2 * i + 1], weight=v[4 * i + 2],
                             bias=v[4 * i + 3], training=bn_training)
        x = x.view(x.size(0), -1)
        return F.linear(x, v[-2], v[-1])

    def sequential(self):
        """The same network of modules, holding the same tensors."""
        mods = []
        for i, (cin, k, stride) in enumerate(self.config):
            conv, bn = nn.Conv2d(cin, 1, k, stride=stride), nn.BatchNorm2d(1)
            conv.weight, conv.bias = self.vars[4 * i], self.vars[4 * i + 1]
            conv.out_channels = bn.num_features = self.vars[4 * i].shape[0]
            bn.weight, bn.bias = self.vars[4 * i + 2], self.vars[4 * i + 3]
            bn._buffers.update(running_mean=self.vars_bn[2 * i], running_var=self.vars_bn[2 * i + 1])
            mods += [conv, nn.ReLU(inplace=True), bn]
        head = nn.Linear(1, 1)
        head.weight, head.bias = self.vars[-2], self.vars[-1]
        return nn.Sequential(*mods, nn.Flatten(), head)


class MetaBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d as MetaModule libraries write it: forward(x, params=None), the input's rank
    checked and the batches counted in Python, so that torch.fx cannot trace it."""

    def forward(self, x, params=None):
        self._check_input_dim(x)
        weight = self.weight if params is None else params.get("weight")
        bias = self.bias if params is None else params.get("bias")
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias,
                            self.training or not self.track_running_stats, self.momentum, self.eps)


class MetaModuleCNN(OmniglotCNN):
    """OmniglotCNN with MetaBatchNorm2d in its blocks."""

    def __init__(self, ways=5, hidden=64):
        super().__init__(ways, hidden)
        for block in self.features:
            block.normalize = MetaBatchNorm2d(hidden, track_running_stats=False)


MODELS = ("sine", "omniglot_cnn", "resnet_omniglot", "functional_omniglot", "metamodule_omniglot")


def workload(name, tasks=None, device="cpu"):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "sine":
        T, S, lr, loss = tasks or 25, 5, 0.01, "mse"
        batch, model = H.sine_tasks(T, g), SineModel()
    elif name in ("omniglot_cnn", "resnet_omniglot", "functional_omniglot", "metamodule_omniglot"):
        T, S, lr, loss = tasks or (8 if device == "cpu" else 32), 1, 0.4, "cross_entropy"
        batch = _classes(T, 1, 15, 5, (1, 28, 28), g)
        model = {"omniglot_cnn": OmniglotCNN, "resnet_omniglot": ResNetSmall, "functional_omniglot": Learner,
                 "metamodule_omniglot": MetaModuleCNN}[name]()
    else:
        raise SystemExit(f"--models: unknown model {name!r} (one of {', '.join(MODELS)})")
    return H.Workload(name, model.to(device), *(t.to(device) for t in batch), lr, S, loss)


def run(name, tasks, order, device, seconds):
    w = workload(name, tasks, device)
    fo = order == "first"
    batch = (w.xs, w.ys, w.xq, w.yq)
    make = lambda model: fastmeta.BatchedMAML(model, w.inner_lr, w.steps, first_order=fo, loss=w.loss)  # noqa: E731

    def learned(grads):  # (the loop's: of the parameters that require grad)
        return [g for g in grads if g is not None]
    traced = make(w.model)
    assert name == "metamodule_omniglot" or "vmap(" not in fastmeta.explain(traced).replace("under vmap", "")
    rows = {"loop": H.make_step("loop", w, fo), "fastmeta_vg": lambda: traced.value_and_grad(*batch)[1]}
    # (F.batch_norm updating statistics: vmap raises on it, so the functional model has no such row)
    if name != "functional_omniglot":
        whole = copy.deepcopy(w.model)
        whole.register_forward_pre_hook(_nothing)
        untraced = make(whole)
        assert "vmap(" in fastmeta.explain(untraced)
        rows["fastmeta_vg_untraced"] = lambda: untraced.value_and_grad(*batch)[1]
    seq = w.model.sequential()  # (the same Parameters)
    if seq is not None:
        sequential = make(seq)
        rows["fastmeta_vg_sequential"] = lambda: sequential.value_and_grad(*batch)[1]
    if name == "metamodule_omniglot":  # its BatchNorms through vmap, or declared BatchNorm2d's (lower_as)
        assert "vmap(MetaBatchNorm2d)" in fastmeta.explain(traced)
        fastmeta.lower_as(MetaBatchNorm2d, nn.BatchNorm2d)  # (a BatchedMAML keeps the program it was built with)
        declared = make(w.model)
        assert "bn_relu_pool" in fastmeta.explain(declared)
        rows["fastmeta_vg_lower_as"] = lambda: declared.value_and_grad(*batch)[1]
    try:
        want = rows["loop"]()
        errs = {k: H.max_rel_err(learned(rows[k]()), list(want)) for k in rows if k != "loop"}
        timed = H.time_interleaved(rows, device, seconds=seconds, min_calls=3, max_seconds=4 * seconds)
    finally:
        fastmeta.lower_as(MetaBatchNorm2d, None)
    print(f"\n{name}, T={w.tasks}, S={w.steps}, {order} order, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| provider | median ms | x vs loop | x vs untraced | calls | max rel err vs loop |")
    print("|---|---|---|---|---|---|")
    base = timed["fastmeta_vg_untraced"][0] if "fastmeta_vg_untraced" in timed else None
    for k, (med, times, err) in timed.items():
        if med is None:
            print(f"| {k} | failed: {err} | | | | |")
            continue
        vs = f"{base / med:.2f}" if base else "-"
        print(f"| {k} | {med:.3f} | {timed['loop'][0] / med:.2f} | {vs} | {len(times)} | "
              + (f"{errs[k]:.1e} |" if k in errs else "- |"))
    return timed, errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--order", default="second,first")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args(argv)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for name in a.models.split(","):
        for order in a.order.split(","):
            run(name, a.tasks, order, a.device, a.seconds)


if __name__ == "__main__":
    main()
