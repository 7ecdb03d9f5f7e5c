"""The whole-plan check of ``netcarve.runtime.compile``: per model and batch, the whole-plan times of the per-layer
kernel choices ("tuned") and of the uniform variants the check builds ("dense", "sparse", "tuned_aten",
"tuned_direct"), timed interleaved in one process by ``compile`` itself, and the variant it keeps.

    python benchmarks/plan_check.py [--models transformer_tiny vit_tiny_cifar] [--batches 1 16] [--threads 2]
        [--sparse never] [--out benchmarks/results/plan_check.json]

Dense compiles (``--sparse never``) of zoo models, random weights; the autotune cache is not used (every layer
profiled afresh). Each compile is repeated ``--compiles`` times: the choice is a timing, so it can differ between
compiles on a noisy machine; the ratio tuned / chosen is what the check gains over the per-layer choices.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["transformer_tiny", "vit_tiny_cifar", "gru", "resnet56"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparse", default="never", choices=["never", "auto"])
    p.add_argument("--compiles", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results" / "plan_check.json"))
    a = p.parse_args()

    from netcarve.measure import environment
    from netcarve.models import create_model
    from netcarve.runtime import compile as ncompile
    from netcarve.runtime import kernel_status

    if not kernel_status()["available"]:
        raise SystemExit(f"native kernels unavailable: {kernel_status()['reason']}")
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models:
        for batch in a.batches:
            torch.manual_seed(0)
            m = create_model(name).eval()
            x = torch.randn(batch, *m.input_shape)
            for k in range(a.compiles):
                t0 = time.perf_counter()
                with torch.no_grad():
                    c = ncompile(m, x, sparse=a.sparse, use_cache=False, repeats=a.repeats)
                    err = float((c(x) - m(x)).abs().max() / m(x).abs().max())
                secs = time.perf_counter() - t0
                check = dict(c.plan_check or {})
                chosen = check.get("chosen", "tuned")
                choices = [lc.choice for lc in c.layers]
                row = {"model": name, "batch": batch, "compile": k, "check_ms": {k2: v for k2, v in check.items()
                                                                                  if k2 != "chosen"},
                       "chosen": chosen, "choices": {ch: choices.count(ch) for ch in sorted(set(choices))},
                       "compile_seconds": round(secs, 2), "rel_err": err}
                if "tuned" in row["check_ms"] and chosen in row["check_ms"]:
                    row["tuned_over_chosen"] = round(row["check_ms"]["tuned"] / row["check_ms"][chosen], 3)
                rows.append(row)
                print(f"{name} b{batch} #{k}: {check} -> {chosen} {row['choices']} ({secs:.1f} s)", file=sys.stderr)
    out = {"benchmark": "plan_check", "command": "python " + " ".join(sys.argv), "threads": a.threads,
           "sparse": a.sparse, "rows": rows, "env": environment()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
