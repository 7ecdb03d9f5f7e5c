"""Whole MobileNetV2 (CIFAR, random weights) in netcarve's plan with its depthwise convs and ReLU6 clamps on ATen
against the same plan as ``compile`` tunes it (depthwise layers on netcarve's depthwise kernel where that measured
faster, clamps on netcarve's kernel), the two alternated in one process: minimum over ``--rounds`` of the plan's own
median of ``--repeats`` runs.

    python benchmarks/depthwise_ab.py --batch 1 64 --threads 2

Results in ``benchmarks/results/depthwise_ab.json`` (``--out``) with the environment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "depthwise_ab.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=200, help="runs per median at batch 1 (a twentieth at larger ones)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from netcarve.measure import environment
    from netcarve.models import create_model
    from netcarve.runtime import compile, kernel_status, load_kernels
    from netcarve.runtime.plan import build_native

    st = kernel_status()
    if not st["available"]:
        raise SystemExit(f"native kernels unavailable: {st['reason']}")
    k = load_kernels()
    torch.manual_seed(0)
    m = create_model("mobilenetv2").eval()
    rows = []
    for b in a.batch:
        x = torch.randn(b, 3, 32, 32)
        c = compile(m, x, sparse="never")
        dws = [op for op in c.ops if op.kind == "conv" and op.p["groups"] > 1]
        chosen = [op.p["kernel"] for op in dws]
        plans = {}
        for name in ("aten", "tuned"):
            for op, ch in zip(dws, chosen):
                op.p["kernel"] = "aten" if name == "aten" else ch
            plans[name] = build_native(k, c.ops, c.nvals, c.output)
        with torch.no_grad():
            ref = m(x)
        diff = max(float((plans[n].run(x) - ref).abs().max()) for n in plans)
        reps = a.repeats if b == 1 else max(5, a.repeats // 20)
        t = {n: [] for n in plans}
        for _ in range(a.rounds):
            for n, pl in plans.items():
                k.set_native_clamp(n == "tuned")
                t[n].append(pl.time(x, reps, max(2, reps // 10)))
        k.set_native_clamp(True)
        aten, tuned = min(t["aten"]), min(t["tuned"])
        rows.append({"model": "mobilenetv2", "batch": b, "aten_ms": aten, "tuned_ms": tuned, "speedup": aten / tuned,
                     "depthwise_layers": len(dws), "depthwise_on_netcarve": sum(ch == "depthwise" for ch in chosen),
                     "max_abs_diff_to_model": diff, "rounds": a.rounds, "repeats": reps})
        print(f"mobilenetv2 b{b}: depthwise + clamp on ATen {aten:.3f} ms, tuned {tuned:.3f} ms ({aten / tuned:.2f}x; "
              f"{rows[-1]['depthwise_on_netcarve']} of {len(dws)} depthwise layers on netcarve's kernel)", flush=True)
    env = environment(a.threads)
    env["kernels"] = st["info"]
    out = Path(a.out)
    out.write_text(json.dumps({"benchmark": "depthwise_ab", "rows": rows, "env": env,
                               "command": "python benchmarks/depthwise_ab.py --batch " + " ".join(map(str, a.batch))
                               + f" --threads {a.threads}"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
