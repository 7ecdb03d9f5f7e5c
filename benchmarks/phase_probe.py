"""Does this machine run at two speeds? An FMA-bound plan and a load-bound plan of the same model, alternated in
one process every few seconds for a while: if the host throttles wide FMA work at times (a busy SMT sibling on the
host, a frequency limit), the FMA-bound plan slows far more than the load-bound one in those phases, and any
autotuning or A/B measurement taken in such a phase ranks kernels differently than it would a few seconds later.

    python benchmarks/phase_probe.py --seconds 60 --threads 2

The two plans: a dense ResNet-56 (random weights, batch 1) compiled with ``sparse="never"`` (netcarve's register-
blocked direct conv: FMA-bound) and with ``sparse="always"`` (the tap-list kernel on the same dense weights: load-
bound). Each sample is the minimum over 2 medians of ``--repeats`` runs per plan, both plans back to back; samples
every ``--interval`` seconds. Writes ``benchmarks/results/phase_probe-<cpu>.json`` (``--out``) with every sample,
their spread per plan, and the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import netcarve
from netcarve.measure import environment
from netcarve.runtime import compile  # noqa: A004

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long to sample")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = netcarve.create_model("resnet56").eval()
    x = torch.randn(1, 3, 32, 32)
    plans = {"direct (FMA-bound)": compile(model, x, sparse="never", use_cache=False),
             "sparse taps on dense weights (load-bound)": compile(model, x, sparse="always", use_cache=False)}
    samples = []
    t0 = time.time()
    while time.time() - t0 < a.seconds:
        row = {"t_s": round(time.time() - t0, 2)}
        for name, c in plans.items():
            row[name] = round(min(c._plan.time(x, a.repeats, 10) for _ in range(2)), 4)
        samples.append(row)
        print(row, flush=True)
        time.sleep(a.interval)
    summary = {}
    for name in plans:
        v = [s[name] for s in samples]
        summary[name] = {"min_ms": min(v), "median_ms": statistics.median(v), "max_ms": max(v),
                         "max_over_min": round(max(v) / min(v), 3)}
    ratio = [s["direct (FMA-bound)"] / s["sparse taps on dense weights (load-bound)"] for s in samples]
    summary["direct / sparse, per sample"] = {"min": round(min(ratio), 3), "max": round(max(ratio), 3)}
    env = environment(threads=a.threads)
    doc = {"benchmark": "phase_probe", "command": f"python benchmarks/phase_probe.py --seconds {a.seconds:g} "
           f"--interval {a.interval:g} --threads {a.threads} --repeats {a.repeats}", "model": "resnet56 (random "
           "weights), batch 1", "summary": summary, "samples": samples, "env": env}
    out = a.out or RESULTS / f"phase_probe-{env.get('cpu_model', 'cpu').lower().replace(' ', '-')}.json"
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
