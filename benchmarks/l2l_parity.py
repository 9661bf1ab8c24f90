"""fastmeta.MAML / MetaSGD against learn2learn 0.2.0's MAML / MetaSGD on the same models.

    python benchmarks/l2l_parity.py [--sdist learn2learn-0.2.0.tar.gz]

learn2learn's algorithms are loaded from its source distribution (`pip download --no-deps
learn2learn==0.2.0` fetches it, there being no wheel, unless --sdist names one). Its package needs
gym and torchvision to import, so only algorithms/{base_learner,maml,meta_sgd}.py and
utils/__init__.py are extracted into a temporary directory and imported from there. For 13 kinds
of model, MAML and Meta-SGD, both orders, one and two adaptation steps, a clone of a clone, and
every allow_unused / allow_nograd combination, it compares the query loss, the meta-gradient of
every parameter and the buffers (BatchNorm running statistics) afterwards (float64, 1e-9), or that
both raise. Prints each difference, then the counts.
"""
import argparse
import contextlib
import glob
import io
import itertools
import os
import subprocess
import sys
import tarfile
import tempfile


def load_learn2learn(sdist=None):
    tmp = tempfile.mkdtemp(prefix="l2l_")
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "learn2learn==0.2.0", "-d", tmp], check=True)
        sdist = glob.glob(os.path.join(tmp, "learn2learn-*.tar.gz"))[0]
    pkg = os.path.join(tmp, "l2l")
    os.makedirs(pkg)
    wanted = {"algorithms/base_learner.py": "base_learner.py", "algorithms/maml.py": "maml.py",
              "algorithms/meta_sgd.py": "meta_sgd.py", "utils/__init__.py": "utils.py"}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/learn2learn/", 1)[-1]
            if rel in wanted:
                text = tar.extractfile(member).read().decode()
                text = text.replace("learn2learn.algorithms.base_learner", "l2l.base_learner")
                text = text.replace("learn2learn.utils", "l2l.utils")
                with open(os.path.join(pkg, wanted[rel]), "w") as f:
                    f.write(text)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    sys.path.insert(0, tmp)
    import l2l.maml
    import l2l.meta_sgd
    return l2l.maml, l2l.meta_sgd


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sdist", help="learn2learn-0.2.0.tar.gz (default: pip download it)")
L2M, L2S = load_learn2learn(parser.parse_args().sdist)

import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastmeta  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_default_dtype(torch.float64)

class Shared(nn.Module):
    def __init__(s):
        super().__init__(); s.a = nn.Linear(4, 4); s.b = s.a; s.out = nn.Linear(4, 3)
    def forward(s, x): return s.out(torch.tanh(s.b(torch.relu(s.a(x)))))
class Frozen(nn.Module):
    def __init__(s):
        super().__init__(); s.a = nn.Linear(4, 5); s.out = nn.Linear(5, 3); s.a.weight.requires_grad_(False)
    def forward(s, x): return s.out(torch.relu(s.a(x)))
class Unused(nn.Module):
    def __init__(s):
        super().__init__(); s.a = nn.Linear(4, 5); s.out = nn.Linear(5, 3); s.extra = nn.Linear(2, 2)
    def forward(s, x): return s.out(torch.relu(s.a(x)))
class RNNNet(nn.Module):
    def __init__(s, cell):
        super().__init__(); s.rnn = cell(4, 6, batch_first=True); s.out = nn.Linear(6, 3)
    def forward(s, x):
        y, _ = s.rnn(x.view(x.shape[0], 2, 2).repeat(1, 1, 2)); return s.out(y[:, -1])
class Attn(nn.Module):
    def __init__(s):
        super().__init__(); s.inp = nn.Linear(4, 8); s.att = nn.MultiheadAttention(8, 2, batch_first=True); s.ln = nn.LayerNorm(8); s.out = nn.Linear(8, 3)
    def forward(s, x):
        h = s.inp(x).unsqueeze(0); h = s.ln(h + s.att(h, h, h)[0]); return s.out(h[0])
class Emb(nn.Module):
    def __init__(s):
        super().__init__(); s.e = nn.Embedding(10, 4); s.out = nn.Linear(4, 3)
    def forward(s, x): return s.out(s.e((x.abs() * 3).long().clamp(max=9)).mean(1))
class BN(nn.Module):
    def __init__(s):
        super().__init__(); s.a = nn.Linear(4, 6); s.bn = nn.BatchNorm1d(6); s.out = nn.Linear(6, 3)
    def forward(s, x): return s.out(torch.relu(s.bn(s.a(x))))
class GradBuf(nn.Module):
    def __init__(s):
        super().__init__(); s.a = nn.Linear(4, 3); s.register_buffer("scale", torch.ones(3))
    def forward(s, x): return s.a(x) * s.scale
class ParamOnly(nn.Module):
    def __init__(s):
        super().__init__(); s.w = nn.Parameter(torch.randn(3, 4)); s.b = nn.Parameter(torch.zeros(3))
    def forward(s, x): return x @ s.w.t() + s.b

def models():
    yield "mlp", lambda: nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))
    yield "conv", lambda: nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 4, 2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    yield "shared", Shared
    yield "frozen", Frozen
    yield "unused", Unused
    yield "rnn", lambda: RNNNet(nn.RNN)
    yield "lstm", lambda: RNNNet(nn.LSTM)
    yield "gru", lambda: RNNNet(nn.GRU)
    yield "attn", Attn
    yield "emb", Emb
    yield "bn", BN
    yield "gradbuf", GradBuf
    yield "paramonly", ParamOnly

def run(lib, kind, name, make, fo, steps, kw, clone_kw, twice):
    torch.manual_seed(0)
    model = make()
    if name == "gradbuf":
        model.scale.requires_grad_(True)
    if kind == "maml":
        alg = (L2M.MAML if lib == "l2l" else fastmeta.MAML)(model, lr=0.1, first_order=fo, **kw)
    else:
        alg = (L2S.MetaSGD if lib == "l2l" else fastmeta.MetaSGD)(model, lr=0.1, first_order=fo)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(6, 4, generator=g); ys = torch.randint(0, 3, (6,), generator=g)
    learner = alg.clone(**clone_kw)
    if twice:
        learner = learner.clone()
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(xs), ys))
    loss = F.cross_entropy(learner(xs * 0.5), ys)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in alg.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]  # BatchNorm running statistics
    return loss.detach(), grads, [n for n, _ in alg.named_parameters()], buffers

bad = 0; n = 0
for name, make in models():
    for kind, fo, steps, kwi, twice in itertools.product(["maml", "metasgd"], [False, True], [1, 2], range(4), [False, True]):
        kw = [{}, {"allow_unused": True}, {"allow_nograd": True}, {"allow_unused": True, "allow_nograd": True}][kwi]
        if kind == "metasgd" and kwi: continue
        out = {}
        for lib in ["l2l", "fm"]:
            try:  # (learn2learn prints the traceback of an error it re-raises)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    out[lib] = run(lib, kind, name, make, fo, steps, kw, {}, twice)
            except Exception as e:
                out[lib] = e
        n += 1
        a, b = out["l2l"], out["fm"]
        tag = f"{name} {kind} fo={fo} S={steps} kw={kw} twice={twice}"
        if isinstance(a, Exception) or isinstance(b, Exception):
            if isinstance(a, Exception) and isinstance(b, Exception):
                continue
            bad += 1
            print("ERRDIFF", tag, "l2l:", repr(a)[:150] if isinstance(a, Exception) else "ok", "| fm:", repr(b)[:200] if isinstance(b, Exception) else "ok")
            continue
        la, ga, na, ba = a; lb, gb, nb, bb = b
        msgs = []
        if na != nb: msgs.append(f"names {na} vs {nb}")
        for i, (x, y) in enumerate(zip(ba, bb)):
            if (x.double() - y.double()).abs().max() > 1e-9 * (1 + x.double().abs().max()):
                msgs.append(f"buffer {i} differs")
        if abs(la - lb) > 1e-10: msgs.append(f"loss {la.item()} vs {lb.item()}")
        for i, (x, y) in enumerate(zip(ga, gb)):
            if (x is None) != (y is None): msgs.append(f"grad {i} none {x is None} vs {y is None}")
            elif x is not None and (x - y).abs().max() > 1e-9 * (1 + x.abs().max()): msgs.append(f"grad {i} diff {(x-y).abs().max().item():.2e}")
        if msgs:
            bad += 1; print("DIFF", tag, msgs[:4])
print(f"{n} cases, {n - bad} agree, {bad} differ")
