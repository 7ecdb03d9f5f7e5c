"""Staged rows in the kx-split path, layer by layer: chains of four 3x3 sparse convs (random weights at 10% density,
ReLU between, C channels in and out) on 32x32 maps, compiled into a native plan and timed with ``set_kx_stage`` on
and off, alternated in one process (minimum over ``--rounds`` of the native median). The staging threshold is set to
0 so that every eligible block is staged whatever its size: the rows show where the copy pays, and so where the
default threshold (``kx_stage_bytes``, 32 KiB of staged rows: 43+ channels on 32x32 maps) should sit. The 16x16 row is
a control: its planes are 1 KiB apart, so it is never staged and its ratio is the noise of the run.

    python benchmarks/kx_stage_ab.py --batch 1 8 64 --threads 2

Writes ``benchmarks/results/kx_stage_ab-<cpu>.json`` (``--out``) with the environment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
from _cxx_probe import RESULTS, cpu_slug


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 48, 64, 128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from netcarve.measure import environment
    from netcarve.runtime import compile as compile_plan
    from netcarve.runtime import kernel_status, load_kernels

    st = kernel_status()
    if not st["available"]:
        raise SystemExit(f"native kernels unavailable: {st['reason']}")
    k = load_kernels()
    default_bytes = k.kx_stage_bytes()
    rows = []
    try:
        k.set_kx_stage_bytes(0)
        for batch in a.batch:
            for ch, hw in [(c, 32) for c in a.channels] + [(64, 16)]:
                torch.manual_seed(0)
                layers = []
                for _ in range(4):
                    conv = nn.Conv2d(ch, ch, 3, padding=1)
                    with torch.no_grad():
                        conv.weight.mul_((torch.rand_like(conv.weight) < 0.1).float())
                    layers += [conv, nn.ReLU()]
                m = nn.Sequential(*layers).eval()
                x = torch.randn(batch, ch, hw, hw)
                plan = compile_plan(m, x, sparse="always")
                repeats = max(10, 400 // batch)
                times = {False: [], True: []}
                for _ in range(a.rounds):
                    for on in (False, True):
                        k.set_kx_stage(on)
                        times[on].append(plan.time(x, repeats, 2))
                k.set_kx_stage(True)
                off, on = min(times[False]), min(times[True])
                staged_kib = ch * 6 * hw * 4 / 1024 if hw == 32 else None
                rows.append({"channels": ch, "map": hw, "batch": batch, "in_place_ms": off, "staged_ms": on,
                             "speedup": off / on, "staged_rows_kib": staged_kib,
                             "staged_by_default": bool(staged_kib is not None and staged_kib * 1024 > default_bytes)})
                print(f"C={ch:<4d} {hw}x{hw} b{batch:<3d} in place {off:8.3f} ms  staged {on:8.3f} ms  x{off / on:.2f}"
                      + ("  (control: never staged)" if hw != 32 else f"  ({staged_kib:.0f} KiB staged)"), flush=True)
    finally:
        k.set_kx_stage(True)
        k.set_kx_stage_bytes(default_bytes)
    env = environment()
    out = a.out or RESULTS / f"kx_stage_ab-{cpu_slug(env)}.json"
    out.write_text(json.dumps({"benchmark": "kx_stage_ab", "threads": a.threads, "rounds": a.rounds,
                               "command": f"python benchmarks/kx_stage_ab.py --batch {' '.join(map(str, a.batch))} "
                                          f"--threads {a.threads}",
                               "default_stage_bytes": default_bytes, "rows": rows, "env": env}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
