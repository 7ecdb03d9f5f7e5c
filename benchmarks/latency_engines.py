"""Whole-model and per-layer latency of zoo models on every installed engine.

    python benchmarks/latency_engines.py --models resnet56 --threads 1 2 --batch 1

Writes one JSON per (model, batch, threads) to ``benchmarks/results/`` named after the CPU and the
software (e.g. ``latency-resnet56-b1-t2-amd-epyc-pt2.13.0.json``) and prints a summary: p50 / p90 per
engine and how much of p50 the per-layer rows account for. Each engine runs in its own process
(``netcarve.measure.measure_latency``); on a machine shared with other jobs, rerun and compare.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

import netcarve
from netcarve.measure import ENGINES, engine_available, environment, measure_latency

RESULTS = Path(__file__).resolve().parent / "results"


def _tag(env: dict) -> str:
    cpu = re.sub(r"[^a-z0-9]+", "-", (env.get("cpu_model") or "cpu").lower()).strip("-")[:24]
    return f"{cpu}-pt{(env.get('torch') or 'none').split('+')[0]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet56"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tag = _tag(environment())
    print(f"{'model':<16} {'b':>3} {'t':>2} {'engine':<12} {'p50 ms':>9} {'p90 ms':>9} {'layers/p50':>10}")
    for name in a.models:
        torch.manual_seed(0)
        model = netcarve.create_model(name)
        for batch in a.batch:
            x = netcarve.example_input(model, batch=batch)
            for threads in a.threads:
                record = {"model": name, "batch": batch, "threads": threads, "results": {}}
                for engine in a.engines:
                    if not engine_available(engine):
                        print(f"{name:<16} {batch:>3} {threads:>2} {engine:<12} not installed")
                        continue
                    r = measure_latency(
                        model,
                        x,
                        engine=engine,
                        threads=threads,
                        per_layer=True,
                        repeats=a.repeats,
                        rounds=a.rounds,
                    )
                    record["results"][engine] = r.to_dict()
                    record["env"] = r.env
                    ratio = r.per_layer_sum_ms / r.p50_ms if r.per_layer else float("nan")
                    print(
                        f"{name:<16} {batch:>3} {threads:>2} {engine:<12} {r.p50_ms:>9.3f} {r.p90_ms:>9.3f} "
                        f"{ratio:>10.2f}"
                    )
                path = a.out / f"latency-{name}-b{batch}-t{threads}-{tag}.json"
                path.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
