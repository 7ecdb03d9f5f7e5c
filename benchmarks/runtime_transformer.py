"""A block-sparse transformer on netcarve's runtime against the dense engines, and netcarve's transformer kernels
(attention, LayerNorm, activations: ``set_native_transformer``) against ATen's inside the same plan.

    python benchmarks/runtime_transformer.py --threads 2 --out benchmarks/results/runtime_transformer-emr.json
    python benchmarks/runtime_transformer.py --model vit_tiny_cifar --threads 2 \
        --out benchmarks/results/runtime_transformer-vit-emr.json

The model: a zoo transformer (``transformer_tiny``: 4 pre-norm blocks, d=64, 4 heads, 32 tokens; ``vit_tiny_cifar``:
ViT-Tiny widths, 12 blocks, d=192, 3 heads, 65 tokens), every linear (qkv / proj inside attention, MLPs, embedding,
head) pruned one-shot to 90% in 4x16 tiles by ``netcarve sparsify MODEL --scheme block --block 4x16 --sparsity 0.9
--algorithm oneshot --finetune-epochs 0 --include-first-last`` (untrained weights: latency does not depend on the
values).

1. ``netcarve bench RUN --batch B --json`` per batch: every engine in its own process (minimum over rounds of medians).
2. In one process, alternated per round: the compiled plan with netcarve's transformer kernels and with ATen's
   (median of ``--repeats`` calls per round, minimum over rounds), and the plan's time per step kind (native).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _timing import median_ms  # noqa: E402

WORK = Path(os.path.expanduser("~/.cache/netcarve/bench/runtime_transformer"))
PREPARE = ["--scheme", "block", "--block", "4x16", "--sparsity", "0.9", "--algorithm", "oneshot",
           "--finetune-epochs", "0", "--include-first-last"]


def _cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "netcarve", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"netcarve {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--engines", nargs="+", default=["torch", "onnxruntime", "openvino", "netcarve-dense", "netcarve"])
    p.add_argument("--model", default="transformer_tiny")
    p.add_argument("--run", default=None, help="the sparse run directory (made by netcarve sparsify if missing; "
                                               "default: ~/.cache/netcarve/bench/runtime_transformer/MODEL-block90)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "runtime_transformer.json"))
    a = p.parse_args()
    run = Path(a.run) if a.run else WORK / f"{'tt' if a.model == 'transformer_tiny' else a.model}-block90"
    prepare = ["sparsify", a.model, *PREPARE]
    if not (run / "manifest.json").exists():
        print(f"[runtime_transformer] preparing {run}", file=sys.stderr)
        _cli(*prepare, "--out", str(run))

    out: dict = {"benchmark": "runtime_transformer", "model": a.model, "command": "python " + " ".join(sys.argv),
                 "prepare": "netcarve " + " ".join(prepare) + " --out RUN", "engines": {}, "ab": {}}
    for b in a.batches:
        print(f"[runtime_transformer] netcarve bench, batch {b}", file=sys.stderr)
        res = json.loads(_cli("bench", str(run), "--batch", str(b), "--threads", str(a.threads), "--rounds",
                              str(a.rounds), "--engines", *a.engines, "--json"))
        out["engines"][f"batch{b}"] = {k: {"latency_ms": v["latency_ms"], "rounds_ms": v.get("rounds_ms")}
                                       for k, v in res["engines"].items()}
        out["env"] = res.get("env")

    torch.set_num_threads(a.threads)
    from netcarve.models import create_model
    from netcarve.runtime import compile as ncompile
    from netcarve.runtime import load_kernels
    from netcarve.serialize import load

    mod = load_kernels()
    if mod is None:
        raise SystemExit("native kernels unavailable")
    model = load(run).eval()
    shape = tuple(create_model(a.model).input_shape)
    for b in a.batches:
        x = torch.randn(b, *shape)
        with torch.no_grad():
            cm = ncompile(model, x)
            ref = model(x)
            times: dict[str, list[float]] = {"netcarve kernels": [], "aten": []}
            for _ in range(a.rounds):
                for name, on in (("netcarve kernels", True), ("aten", False)):
                    mod.set_native_transformer(on)
                    try:
                        for _ in range(10):
                            cm(x)
                        times[name].append(median_ms(cm, x, repeats=a.repeats))
                        err = float((cm(x) - ref).abs().max() / ref.abs().max())
                        assert err <= 1e-4, (name, err)
                    finally:
                        mod.set_native_transformer(True)
            kinds: dict[str, float] = {}
            for st in cm.profile(x, repeats=a.repeats):
                kinds[st["kind"]] = kinds.get(st["kind"], 0.0) + st["ms"]
        best = {k: min(v) for k, v in times.items()}
        out["ab"][f"batch{b}"] = {"ms": best, "rounds_ms": times,
                                  "speedup_netcarve_kernels": best["aten"] / best["netcarve kernels"],
                                  "profile_ms_by_kind": {k: round(v, 4) for k, v in sorted(kinds.items(),
                                                                                           key=lambda kv: -kv[1])}}
        print(f"batch {b}: netcarve kernels {best['netcarve kernels']:.3f} ms, aten {best['aten']:.3f} ms "
              f"({best['aten'] / best['netcarve kernels']:.2f}x); engines: "
              + ", ".join(f"{k} {v['latency_ms']:.3f}" for k, v in out["engines"][f"batch{b}"].items()))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
