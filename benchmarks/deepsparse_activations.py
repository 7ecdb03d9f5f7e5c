"""Does DeepSparse's lead on sparse VGG-16 at batch 64 come from the zeros after each ReLU? The same sparse model timed
twice per engine: as it is (about half of every ReLU's outputs are zero) and with every ``nn.ReLU`` replaced by an
identity (activations dense, the weights unchanged), in DeepSparse and in netcarve's runtime, each engine in its own
process (``measure_latency``: minimum over ``--rounds`` of the median of ``--repeats`` runs), both passes in turn.

If DeepSparse skipped zero activations, removing the ReLUs would slow it down by about the share of zeros (~2x);
if it only exploits the weights' zeros, both versions run alike.

    python benchmarks/deepsparse_activations.py --cells vgg16-unstructured90-projected vgg16-pattern-projected

The cells are the sparse models ``benchmarks/sparse_runtime.py`` projects into ``~/.cache/netcarve/bench/sparse_runtime``
(run it first); DeepSparse comes from its own virtualenv (``$NETCARVE_DEEPSPARSE_PYTHON`` or
``~/.cache/netcarve/venvs/deepsparse``, see ``netcarve bench --help``). Writes
``benchmarks/results/deepsparse_activations-<cpu>.json`` (``--out``) with the environment.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from _cxx_probe import RESULTS, cpu_slug

WORK = Path("~/.cache/netcarve/bench/sparse_runtime").expanduser()


def _without_relu(model: nn.Module) -> tuple[nn.Module, int]:
    lin = copy.deepcopy(model)
    n = 0
    for mod in list(lin.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(mod, name, nn.Identity())
                n += 1
    return lin, n


def _zero_shares(model: nn.Module, x: torch.Tensor) -> list[float]:
    shares: list[float] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: shares.append(round(float((o == 0).float().mean()), 3)))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", nargs="+", default=["vgg16-unstructured90-projected", "vgg16-pattern-projected"])
    p.add_argument("--engines", nargs="+", default=["deepsparse", "netcarve"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    import netcarve
    from netcarve.measure import environment
    from netcarve.measure.latency import measure_latency

    rows = []
    for cell in a.cells:
        src = WORK / cell
        if not (src / "manifest.json").exists():
            print(f"{cell}: no model at {src} (run benchmarks/sparse_runtime.py first); skipped", flush=True)
            continue
        model = netcarve.load(src).eval()
        lin, n = _without_relu(model)
        if n == 0:
            print(f"{cell}: no nn.ReLU modules to replace; skipped", flush=True)
            continue
        x = torch.randn(a.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        zeros = _zero_shares(model, x)
        print(f"{cell}: {n} ReLUs; share of zeros after each: {zeros}", flush=True)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(a.passes):
            for label, m in (("relu", model), ("no-relu", lin)):
                for eng in a.engines:
                    r = measure_latency(m, x, engine=eng, threads=a.threads, repeats=a.repeats, rounds=a.rounds)
                    times.setdefault((eng, label), []).append(r.p50_ms)
                    print(f"  {eng:<10} {label:<8} {r.p50_ms:8.2f} ms", flush=True)
        for eng in a.engines:
            with_relu, without = min(times[(eng, "relu")]), min(times[(eng, "no-relu")])
            rows.append({"cell": cell, "engine": eng, "batch": a.batch, "relus": n, "zero_share_after_relu": zeros,
                         "relu_ms": times[(eng, "relu")], "no_relu_ms": times[(eng, "no-relu")],
                         "best_relu_ms": with_relu, "best_no_relu_ms": without,
                         "slowdown_without_relu_zeros": without / with_relu})
            print(f"{cell} {eng}: {with_relu:.2f} ms with ReLUs, {without:.2f} ms without "
                  f"({without / with_relu:.2f}x)", flush=True)
    env = environment(a.threads)
    out = a.out or RESULTS / f"deepsparse_activations-{cpu_slug(env)}.json"
    out.write_text(json.dumps({"benchmark": "deepsparse_activations",
                               "command": "python benchmarks/deepsparse_activations.py " + " ".join(sys.argv[1:]),
                               "rows": rows, "env": env}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
