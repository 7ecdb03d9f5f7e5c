"""BSR linear layers with many rows (batch x tokens): row tiles (``set_bsr_row_tile``) against all rows at once
and against the dense product, alternated in one process, each as a one-step native plan.

    python benchmarks/bsr_row_tile_ab.py --threads 2 --out benchmarks/results/bsr_row_tile_ab-emr.json

90% sparse weights in 4 x 16 tiles; per shape the minimum over ``--rounds`` of the plan's median time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# (rows, in features, batch x tokens): transformer_tiny at batch 64, vit_tiny_cifar (65 tokens) at batch 1 / 2 / 16
SHAPES = [(192, 64, 2048), (128, 64, 2048), (64, 64, 2048), (256, 1024, 128), (1536, 512, 256), (384, 128, 32),
          (576, 192, 65), (768, 192, 65), (192, 768, 65), (576, 192, 130), (192, 768, 130), (576, 192, 1040),
          (192, 768, 1040)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bsr_row_tile_ab.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from netcarve.measure import environment
    from netcarve.runtime import kernel_status, load_kernels
    from netcarve.runtime.kernels import bsr_tensors
    from netcarve.sparsity import make_scheme

    if not kernel_status()["available"]:
        raise SystemExit(f"native kernels unavailable: {kernel_status()['reason']}")
    mod = load_kernels()
    torch.manual_seed(0)
    rows = []
    default_tile = mod.bsr_row_tile()
    for r, k, m in SHAPES:
        w = torch.randn(r, k)
        w = w * make_scheme("block", block=[4, 16]).project(w, 0.9)
        b = torch.randn(r)
        bt = bsr_tensors(w, (4, 16))
        x = torch.randn(m, k)
        sparse, dense = mod.Plan(2, 1), mod.Plan(2, 1)
        sparse.add_linear("fc", 0, 1, w, b, False, list(bt), True, False)
        dense.add_linear("fc", 0, 1, w, b, False, list(bt), False, False)
        ref = torch.addmm(b, x, w.t())
        t: dict[str, list[float]] = {}
        for _ in range(a.rounds):
            for tile in (0, 32, 64, 128):
                mod.set_bsr_row_tile(tile)
                y = sparse.run(x)
                assert float((y - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
                t.setdefault(f"tile{tile}", []).append(sparse.time(x, a.repeats, a.repeats // 10))
            t.setdefault("dense", []).append(dense.time(x, a.repeats, a.repeats // 10))
        mod.set_bsr_row_tile(default_tile)
        best = {key: min(v) for key, v in t.items()}
        rows.append({"shape": f"{r}x{k}", "rows": m, **{f"{key}_ms": v for key, v in best.items()},
                     "tile64_vs_untiled": best["tile0"] / best["tile64"], "tile64_vs_dense": best["dense"] / best["tile64"],
                     "tile32_vs_tile64": best["tile64"] / best["tile32"], "tile32_vs_dense": best["dense"] / best["tile32"]})
        print(f"{r}x{k} rows {m}: untiled {best['tile0'] * 1e3:.1f} us, tiles of 32 {best['tile32'] * 1e3:.1f} us, "
              f"of 64 {best['tile64'] * 1e3:.1f} us, "
              f"of 128 {best['tile128'] * 1e3:.1f} us, dense {best['dense'] * 1e3:.1f} us", flush=True)
    Path(a.out).write_text(json.dumps({"benchmark": "bsr_row_tile_ab", "threads": a.threads,
                                       "command": f"python benchmarks/bsr_row_tile_ab.py --threads {a.threads}",
                                       "rows": rows, "env": environment()}, indent=1))
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
