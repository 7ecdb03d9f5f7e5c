"""The lanes conv (16 images per vector, netcarve.runtime.lanes) layer by layer: one 3x3 stride-1 sparse conv (random
weights at each ``--densities`` value, C channels in and out, a ReLU-ed random input) in a one-step native plan,
timed at every chunk size of ``--chunk-kib`` (``set_lanes_chunk_bytes``: the input window each chunk of channels may
fill, 32 KiB by default) and every register block of ``--pixels`` (``set_lanes_pixels``: 8 by default), alternated
in one process over ``--rounds`` rounds (minimum of the native medians). Reported: GFLOP/s of the non-zero
multiply-adds (2 x non-zeros x output pixels x images / time), per setting, and which setting was fastest.

    python benchmarks/lanes_layers.py --batch 64 --threads 2

Writes ``benchmarks/results/lanes_layers-<cpu>.json`` (``--out``) with the environment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _cxx_probe import RESULTS, cpu_slug


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["64x32", "128x16", "256x8", "512x4", "512x2"], help="CHANNELSxMAP")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.45])
    p.add_argument("--chunk-kib", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--pixels", type=int, nargs="+", default=[8])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from netcarve.measure import environment
    from netcarve.runtime import kernel_status, load_kernels
    from netcarve.runtime.kernels import to_lanes

    st = kernel_status()
    if not st["available"]:
        raise SystemExit(f"native kernels unavailable: {st['reason']}")
    k = load_kernels()
    old = k.lanes_settings()
    settings = [(kib, px) for kib in a.chunk_kib for px in a.pixels]
    rows = []
    g = torch.Generator().manual_seed(0)
    try:
        for shape in a.shapes:
            c, hw = (int(v) for v in shape.split("x"))
            for d in a.densities:
                x = torch.randn(a.batch, c, hw, hw, generator=g).relu()
                w = torch.randn(c, c, 3, 3, generator=g) * (torch.rand(c, c, 3, 3, generator=g) < d)
                lx = to_lanes(x)
                flop = 2 * int((w != 0).sum()) * hw * hw * 16 * lx.shape[0]
                plan = k.Plan(2, 1)
                plan.add_lanes_conv("conv", [0], 1, w, None, 1, 1, False, False)
                best = {s: float("inf") for s in settings}
                for _ in range(a.rounds):
                    for kib, px in settings:
                        k.set_lanes_chunk_bytes(kib * 1024)
                        k.set_lanes_pixels(px)
                        best[(kib, px)] = min(best[(kib, px)], float(plan.time(lx, a.repeats, 2)))
                gf = {f"{kib}KiB/{px}px": round(flop / best[(kib, px)] / 1e6, 1) for kib, px in settings}
                top = max(gf, key=gf.get)
                rows.append({"channels": c, "map": hw, "density": d, "gflops": gf, "fastest": top})
                print(f"C={c:<4d} {hw:>2d}x{hw:<2d} density {d:.2f}: "
                      + "  ".join(f"{s} {v:6.1f}" for s, v in gf.items()) + f"  fastest {top}", flush=True)
    finally:
        k.set_lanes_chunk_bytes(old[1])
        k.set_lanes_pixels(old[0])
    env = environment(a.threads)
    out = a.out or RESULTS / f"lanes_layers-{cpu_slug(env)}.json"
    out.write_text(json.dumps({"benchmark": "lanes_layers", "batch": a.batch, "threads": a.threads,
                               "rounds": a.rounds, "command": "python benchmarks/lanes_layers.py --batch "
                               f"{a.batch} --threads {a.threads}", "rows": rows, "env": env}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
