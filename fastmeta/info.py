"""``python -m fastmeta.info``: versions, device, which backends are built / usable, and why not."""
from __future__ import annotations

import argparse
import platform
import sys


def report() -> dict:
    import torch

    from . import __version__
    from . import ops  # noqa: F401  (registers the ops)
    from .backend import BACKENDS, OPS, build_status, get_backend, select, why_unavailable

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = {d: {b: why_unavailable(b, d) for b in BACKENDS} for d in devices}
    chosen = {}
    for op in OPS:
        chosen[op] = {}
        for d in devices:
            try:
                chosen[op][d] = select(op, d)
            except Exception as e:
                chosen[op][d] = f"error: {e}"
    return {
        "fastmeta": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(), "requested_backend": get_backend(),
        "build": build_status(), "backends": backends, "chosen": chosen,
        "implemented": {op: list(impl) for op, (impl, _) in OPS.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmeta.info", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--short", action="store_true", help="one line per backend")
    args = ap.parse_args(argv)
    r = report()
    if args.json:
        import json
        print(json.dumps(r, indent=1, default=str))
        return 0
    print(f"fastmeta {r['fastmeta']}  torch {r['torch']}  triton {r['triton']}  python {r['python']}")
    if not args.short:
        print(f"platform {r['platform']}, {r['threads']} threads, GPU: {r['cuda'] or 'none'}")
        print(f"requested backend: {r['requested_backend']}")
    for dev, bs in r["backends"].items():
        for b, why in bs.items():
            print(f"  [{dev}] {b:<7} {'available' if why is None else 'unavailable: ' + why}")
    if not args.short:
        print("auto choice per op:")
        for op, per in r["chosen"].items():
            impl = ", ".join(r["implemented"][op])
            print(f"  {op:<20} " + "  ".join(f"{d}: {b}" for d, b in per.items()) + f"   (implemented: {impl})")
        if r["build"].get("log"):
            print("build log (tail):\n" + r["build"]["log"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
