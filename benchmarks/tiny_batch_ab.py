"""Up to which batch should 4x4 / 2x2 sparse convs take the tiny-map path? Whole VGG-16 plans (pattern + connectivity
and 90% unstructured, the work directory of ``sparse_runtime.py``) at each batch, timed with ``set_tiny_max_batch``
at two limits, alternated in one process (minimum over ``--rounds`` of the native median).

    python benchmarks/tiny_batch_ab.py --batch 16 32 --limits 8 64 --threads 2

Writes ``benchmarks/results/tiny_batch_ab.json`` (``--out``) with the environment.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(os.environ.get("NETCARVE_CACHE", Path.home() / ".cache" / "netcarve")) / "bench" / "sparse_runtime"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--limits", type=int, nargs=2, default=[8, 64], metavar=("LOW", "HIGH"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "tiny_batch_ab.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import netcarve
    from netcarve.measure import environment
    from netcarve.runtime import compile as compile_plan
    from netcarve.runtime import load_kernels

    k = load_kernels()
    old = k.tiny_max_batch()
    rows = []
    try:
        for name in ("vgg16-pattern-projected", "vgg16-unstructured90-projected"):
            if not (WORK / name / "manifest.json").exists():
                print(f"skipped {name}: run benchmarks/sparse_runtime.py --models vgg16 first")
                continue
            m = netcarve.load(WORK / name).eval()
            for b in a.batch:
                x = torch.randn(b, 3, 32, 32)
                plan = compile_plan(m, x, sparse="always")
                t = {lim: [] for lim in a.limits}
                for _ in range(a.rounds):
                    for lim in a.limits:
                        k.set_tiny_max_batch(lim)
                        t[lim].append(plan.time(x, 10, 2))
                lo, hi = (min(t[lim]) for lim in a.limits)
                rows.append({"model": name, "batch": b, f"limit_{a.limits[0]}_ms": lo, f"limit_{a.limits[1]}_ms": hi,
                             "speedup_high_limit": lo / hi})
                print(f"{name:32s} b{b:<3d} limit {a.limits[0]}: {lo:8.3f} ms  limit {a.limits[1]}: {hi:8.3f} ms  "
                      f"x{lo / hi:.2f}", flush=True)
    finally:
        k.set_tiny_max_batch(old)
    a.out.write_text(json.dumps({"benchmark": "tiny_batch_ab", "threads": a.threads, "rounds": a.rounds,
                                 "command": f"python benchmarks/tiny_batch_ab.py --batch {' '.join(map(str, a.batch))} "
                                            f"--limits {a.limits[0]} {a.limits[1]} --threads {a.threads}",
                                 "rows": rows, "env": environment()}, indent=1))
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
