"""netcarve's dense panel linear kernel (the plan's "direct" linear) against ATen's addmm, per shape, in one process.

    python benchmarks/dense_linear.py --threads 2 --out benchmarks/results/dense_linear-zen4.json

1. ``y = x @ w^T + b`` for (rows M, in K, out N) shapes of transformer and MLP layers. The two kernels alternate
   within each round (median of ``--repeats`` calls), minimum over ``--rounds`` rounds; the weights are packed once,
   outside the timing, as a compiled plan does. Every output is checked against ``F.linear``.
2. Whole dense zoo models compiled once (autotuned: each linear / GRU picks the panel kernel or ATen's), then timed
   with the panel kernel on and switched off (``set_direct_linear(False)``: ATen's addmm), alternated per round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _timing import median_ms  # noqa: E402

SHAPES = [(16, 256, 768), (32, 256, 768), (32, 256, 1024), (32, 1024, 256), (32, 256, 5000), (64, 384, 128),
          (128, 512, 512), (512, 256, 1024), (2048, 192, 768)]


PLANS = [("transformer_tiny", 1), ("transformer_tiny", 16), ("vit_tiny_cifar", 1), ("vit_tiny_cifar", 16),
         ("gru", 1), ("gru", 32), ("lstm", 32)]


def plans(mod, rounds: int, repeats: int) -> list[dict]:
    from netcarve.models import create_model
    from netcarve.runtime import compile as ncompile

    out = []
    for name, batch in PLANS:
        torch.manual_seed(0)
        m = create_model(name).eval()
        x = torch.randn(batch, *m.input_shape)
        with torch.no_grad():
            c = ncompile(m, x, sparse="never")
            ref = m(x)
            times: dict[str, list[float]] = {"panel": [], "aten": []}
            for _ in range(rounds):
                for k, on in (("panel", True), ("aten", False)):
                    mod.set_direct_linear(on)
                    try:
                        for _ in range(3):
                            c(x)
                        times[k].append(median_ms(c, x, repeats=repeats))
                        err = float((c(x) - ref).abs().max() / ref.abs().max())
                        assert err <= 1e-4, (name, k, err)
                    finally:
                        mod.set_direct_linear(True)
        best = {k: min(v) for k, v in times.items()}
        choices = {lc.name: lc.choice for lc in c.layers if lc.kind in ("linear", "rnn")}
        out.append({"model": name, "batch": batch, "ms": best, "speedup": best["aten"] / best["panel"],
                    "on_panel": sum(v == "direct" for v in choices.values()), "linear_layers": len(choices),
                    "rounds_ms": times})
        print(f"{name} batch {batch}: panel {best['panel']:.3f} ms, ATen {best['aten']:.3f} ms "
              f"({best['aten'] / best['panel']:.2f}x; {out[-1]['on_panel']} of {len(choices)} on the panel kernel)",
              file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dense_linear.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from netcarve.measure.env import environment
    from netcarve.runtime import kernel_status, load_kernels

    if not kernel_status()["available"]:
        raise SystemExit(f"native kernels unavailable: {kernel_status()['reason']}")
    mod = load_kernels()
    rows = []
    for m, k, n in SHAPES:
        torch.manual_seed(0)
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        wp, bp = mod.pack_panels(w, b)
        ref = F.linear(x, w, b)
        err = float((mod.dense_panel(x, wp, bp, n) - ref).abs().max() / ref.abs().max())
        assert err <= 1e-5, (m, k, n, err)
        fns = {"aten_addmm": (torch.addmm, (b, x, w.t())), "netcarve_panel": (mod.dense_panel, (x, wp, bp, n))}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(a.rounds):
            for name, (fn, args) in fns.items():
                for _ in range(3):
                    fn(*args)
                times[name].append(median_ms(fn, *args, repeats=a.repeats))
        best = {name: min(v) for name, v in times.items()}
        flop = 2 * m * k * n
        row = {"M": m, "K": k, "N": n, "ms": best, "gflops": {name: flop / t / 1e6 for name, t in best.items()},
               "speedup": best["aten_addmm"] / best["netcarve_panel"], "max_rel_error": err, "rounds_ms": times}
        rows.append(row)
        print(f"{m:5d} x {k:5d} x {n:5d}: ATen {best['aten_addmm']:.3f} ms ({row['gflops']['aten_addmm']:.0f} GFLOP/s), "
              f"panel {best['netcarve_panel']:.3f} ms ({row['gflops']['netcarve_panel']:.0f} GFLOP/s), "
              f"{row['speedup']:.2f}x", file=sys.stderr)
    out = {"benchmark": "dense_linear", "command": "python " + " ".join(sys.argv), "threads": a.threads,
           "env": environment(threads=a.threads), "rows": rows, "plans": plans(mod, a.rounds, a.repeats)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
