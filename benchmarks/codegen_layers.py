"""Per-layer generated code (``netcarve.runtime.codegen``) against the runtime's sparse tap-list kernel, layer by layer,
side by side in one process: VGG-16's 3x3 conv shapes on CIFAR-10 (64 channels at 32x32 down to 512 at 2x2) with
pattern (4 of 9) + connectivity at ~8x weight reduction (density 12.3%) or 90% unstructured sparsity.

    python benchmarks/codegen_layers.py --threads 2 --batch 64 1 --out benchmarks/results/codegen_layers-zen4.json

Each layer is a one-step native plan per kernel (bias + ReLU fused), timed from C++ (``Plan.time``: median of
``--reps`` calls after warm-up); the two kernels alternate for ``--rounds`` rounds and the row keeps each kernel's
fastest round and the median of the per-round ratios (this VM changes speed for seconds at a time). Also recorded:
the generated library's size and build time, and both kernels' max abs difference to ``torch.conv2d``. Needs
AVX-512 and a compiler driver (generated code); writes the environment with the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from netcarve.measure import environment
from netcarve.runtime import codegen
from netcarve.runtime._build import load_kernels
from netcarve.runtime.kernels import conv_taps
from netcarve.sparsity import make_scheme

RESULTS = Path(__file__).resolve().parent / "results" / "codegen_layers.json"
# (channels, map size) of VGG-16's 3x3 convs after the first (3 -> 64 stays dense)
LAYERS = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]


def _weight(c: int, scheme: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, 3, 3, generator=g)
    if scheme == "pattern":  # 4-entry patterns (2.25x) and 72.2% of the kernels removed: 8.1x in all
        s = make_scheme("pattern", connectivity=0.722)
        return w * s.project(w, s.default_level())
    return w * (torch.rand(w.shape, generator=g) >= 0.9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", nargs="+", type=int, default=[64])
    p.add_argument("--schemes", nargs="+", default=["pattern", "unstructured90"], choices=["pattern", "unstructured90"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=0, help="calls per timing (0: ~0.2 GMAC of work per timing)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    ok, why = codegen.host_supported()
    if not ok:
        raise SystemExit(why)
    mod = load_kernels()
    if mod is None:
        raise SystemExit("netcarve's native kernels are unavailable")
    torch.set_num_threads(a.threads)
    rows = []
    for scheme in a.schemes:
        for i, (c, hw) in enumerate(LAYERS):
            w = _weight(c, scheme, seed=i)
            b = torch.randn(c)
            t0 = time.perf_counter()
            lib = codegen.build_conv(w, name=f"vgg16-{c}x{hw}-{scheme}")
            build_s = time.perf_counter() - t0
            t = conv_taps(w)
            sparse = mod.Plan(2, 1)
            sparse.add_conv("c", [0], 1, w, b, [t["ptr"], t["chan"], t["pos"], t["w"], t["order"]], None, 1, 1, 1,
                            True, 1)
            gen = mod.Plan(2, 1)
            gen.add_conv_gen("c", [0], 1, w, b, str(lib), 1, 1, True)
            for n in a.batch:
                x = torch.randn(n, c, hw, hw)
                ref = torch.relu(torch.conv2d(x, w, b, 1, 1))
                nz = int((w != 0).sum()) * n * hw * hw
                reps = a.reps or max(3, int(2e8 / max(nz, 1)))
                ts, tg = [], []
                for _ in range(a.rounds):
                    ts.append(sparse.time(x, reps, 2))
                    tg.append(gen.time(x, reps, 2))
                ratios = sorted(s_ / g_ for s_, g_ in zip(ts, tg))
                row = {"layer": f"{c}->{c} 3x3 at {hw}x{hw}", "scheme": scheme, "batch": n,
                       "density": float((w != 0).float().mean()), "nonzero_macs": nz,
                       "sparse_ms": min(ts), "generated_ms": min(tg), "speedup_median": ratios[len(ratios) // 2],
                       "sparse_useful_gmacs": nz / min(ts) / 1e6, "generated_useful_gmacs": nz / min(tg) / 1e6,
                       "generated_bytes": os.path.getsize(lib), "build_seconds": round(build_s, 2),
                       "sparse_max_abs_diff": float((sparse.run(x) - ref).abs().max()),
                       "generated_max_abs_diff": float((gen.run(x) - ref).abs().max())}
                rows.append(row)
                print(f"{scheme:<14} {row['layer']:<22} b{n:<3} sparse {row['sparse_ms']:8.3f} ms "
                      f"({row['sparse_useful_gmacs']:5.1f} GMAC/s)  generated {row['generated_ms']:8.3f} ms "
                      f"({row['generated_useful_gmacs']:5.1f})  x{row['speedup_median']:.2f}  "
                      f"[{row['generated_bytes'] / 2**20:.2f} MiB, {build_s:.1f} s]", flush=True)
    cmd = (f"python benchmarks/codegen_layers.py --threads {a.threads} --batch {' '.join(map(str, a.batch))}"
           + (f" --out {a.out}" if a.out != RESULTS else ""))
    doc = {"benchmark": "codegen_layers", "command": cmd, "rounds": a.rounds, "rows": rows,
           "env": environment(a.threads)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
