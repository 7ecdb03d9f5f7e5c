"""Sparse models on netcarve's native runtime against the best dense engines, side by side in one run.

    python benchmarks/sparse_runtime.py --models resnet56 vgg16 --batch 1 64 --threads 2
    python benchmarks/sparse_runtime.py --models resnet56-channel      # issue 3: compact model vs MACs cut
    python benchmarks/sparse_runtime.py --models gru --batch 1 32      # block-sparse 2-layer GRU end to end
    python benchmarks/sparse_runtime.py --models gru-bi --batch 1 64   # the same, bidirectional (random weights)

For each model and variant (dense; pattern 4-of-9 + connectivity 3.6x, about 8x fewer weights in the 3x3
convs; 90% unstructured) and batch size, ``netcarve bench`` times every engine in its own process (torch
eager, onnxruntime, openvino, netcarve native with every conv dense, netcarve autotuned sparse, deepsparse
when its virtualenv exists), ``--threads`` threads, minimum over rounds of medians (``--passes N``: the whole engine list N times over, each
engine's fastest pass kept, so that no engine is timed only in one of this VM's slow stretches). Results go to
``benchmarks/results/sparse_runtime.json`` with the environment.

Weights: the fine-tuned runs of ``benchmarks/sparsity_cifar.py`` when they exist in its work directory
(the row says which), else a one-shot projection of the dense model (same zero structure, no fine-tune:
latency does not depend on the accuracy). VGG-16 is the model trained by ``sparsity_cifar.py --preset
vgg16`` (random weights otherwise, noted). ``resnet56-channel`` is the channel-pruned compact ResNet-56 of
``benchmarks/structural_resnet56.py`` against the dense ResNet-56 (both dense kernels). ``gru-bi`` is the zoo GRU
bidirectional (2 x 128 per direction, mean over time) with random weights, dense and block 4x16 90% (one-shot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_runtime.json"
CACHE = Path(os.path.expanduser("~/.cache/netcarve/bench"))
SPARSITY_WORK = CACHE / "sparsity_cifar"
STRUCT_WORK = CACHE / "structural_resnet56"
WORK = CACHE / "sparse_runtime"

VARIANTS = {
    "pattern": {"scheme": "pattern", "patterns": 8, "connectivity": 3.6},
    "unstructured90": {"scheme": "unstructured", "sparsity": 0.9},
}
# the GRU (2 x 128 on CIFAR-10 rows, trained by sparsity_cifar.py): its fine-tuned block-sparse cells
GRU_CELLS = {"block4x16-90": "gru-block-b4x16-s0.9-oneshot-e4", "block16x16-90": "gru-block-b16x16-s0.9-oneshot-e4",
             "block4x16-90-balanced": "gru-block-b4x16-s0.9-balanced-oneshot-e4"}
# without the trained GRU: the same architecture with random weights, projected one-shot (latency does not depend
# on the values, only on the zero structure)
GRU_FLAGS = {"block4x16-90": {"scheme": "block", "block": "4x16", "sparsity": 0.9},
             "block16x16-90": {"scheme": "block", "block": "16x16", "sparsity": 0.9},
             "block4x16-90-balanced": {"scheme": "block", "block": "4x16", "sparsity": 0.9, "balanced": True}}


def _log(msg: str) -> None:
    print(f"[sparse_runtime {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# models without pretrained weights: trained by sparsity_cifar.py into SPARSITY_WORK / dir, else the zoo model
# with random weights
TRAINED_HERE = {"vgg16": ("vgg16-dense", "vgg16_bn"), "gru": ("gru-dense", "gru")}


def _dense_source(model: str) -> tuple[str, str | None, str]:
    if model in TRAINED_HERE:
        sub, zoo_name = TRAINED_HERE[model]
        d = SPARSITY_WORK / sub
        if (d / "manifest.json").exists():
            return str(d), None, f"trained here ({d})"
        return zoo_name, None, f"random weights ({model} not trained here)"
    return model, "pretrained", "pretrained"


def _cell(model: str, variant: str) -> Path | None:
    """A fine-tuned run of sparsity_cifar.py for this model / variant, if any."""
    flags = VARIANTS[variant]
    stem = {"pattern": f"{model}-pattern-p8-c3.6-oneshot", "unstructured90": f"{model}-unstructured-s0.9-oneshot"}[variant]
    for d in sorted(SPARSITY_WORK.glob(stem + "-e*")):
        if (d / "report.json").exists() and flags:
            return d
    return None


def _projected(model: str, variant: str, data_dir) -> Path:
    from netcarve.flows.sparsify import SparsifyRecipe, plan_from_args, run_recipe

    if model == "gru-bi":
        src, weights = str(WORK / "gru-bi-dense-random"), None
    else:
        src, weights, _ = _dense_source(model)
    out = WORK / (f"{model}-{variant}-projected" + ("-random" if model == "gru" and not Path(src).exists() else ""))
    if (out / "report.json").exists():
        return out
    flags = GRU_FLAGS[variant] if model.startswith("gru") else VARIANTS[variant]
    ns = argparse.Namespace(plan=None, layers=None, types=None, exclude=None, include_first_last=False,
                            balanced=flags.get("balanced", False),
                            **{k: flags.get(k) for k in ("scheme", "sparsity", "n", "m", "block",
                                                                        "patterns", "connectivity", "length",
                                                                        "keep", "groups")})
    recipe = SparsifyRecipe.from_dict({"model": src, "weights": weights, "out": str(out), "plan": plan_from_args(ns),
                                       "data_dir": data_dir, "algorithm": "oneshot", "test_subset": 500})
    run_recipe(recipe, progress=False, threads=torch.get_num_threads())
    return out


def _bench(model_dir_or_name: str, weights, batch: int, threads: int, engines, repeats: int, rounds: int,
           passes: int = 1) -> dict:
    """``netcarve bench`` of one model; ``passes`` > 1: the engine list timed that many times over, each engine's
    fastest pass kept."""
    from netcarve.flows.bench import rank_against_dense, run_bench
    from netcarve.flows.common import resolve_model
    from netcarve.models import example_input

    m = resolve_model(model_dir_or_name, weights)
    docs = []
    for k in range(max(1, passes)):
        docs.append(run_bench(m, example_input(m, batch=batch), engines=engines, threads=threads, repeats=repeats,
                              rounds=rounds, progress=lambda e, k=k: _log(f"  {e}" + (f" (pass {k + 1})" if passes > 1 else ""))))
    if len(docs) == 1:
        return docs[0]
    # an engine's result is its fastest pass (the passes spread each engine over minutes: this VM slows down for
    # seconds at a time, long enough to cover one engine's whole timing)
    out = dict(docs[0])
    out["engines"] = {}
    for name in docs[0]["engines"]:
        have = [d for d in docs if name in d["engines"]]
        best = min(have, key=lambda d: d["engines"][name]["latency_ms"])
        out["engines"][name] = {**best["engines"][name], "passes_ms": [d["engines"][name]["latency_ms"] for d in have]}
        if name == "netcarve":
            out["layers"] = best["layers"]  # the per-layer profile of netcarve's fastest pass
    rank_against_dense(out)
    out["passes"] = len(docs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet56", "vgg16"],
                   help="resnet56, vgg16 (dense + pattern + unstructured90), resnet56-channel, gru (block-sparse cells)")
    p.add_argument("--variants", nargs="+", default=["dense", "pattern", "unstructured90"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", nargs="+",
                   default=["torch", "onnxruntime", "openvino", "netcarve-dense", "netcarve", "deepsparse"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--passes", type=int, default=1,
                   help="time the whole engine list this many times over and keep each engine's fastest pass")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    doc = json.loads(a.out.read_text()) if a.out.exists() else {"benchmark": "sparse_runtime", "rows": []}
    rows = doc["rows"]

    def record(row):
        rows[:] = [r for r in rows if (r["model"], r["variant"], r["batch"]) != (row["model"], row["variant"], row["batch"])]
        rows.append(row)
        doc["command"] = "python benchmarks/sparse_runtime.py " + " ".join(sys.argv[1:])
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1))

    for model in a.models:
        if model == "gru-bi":
            dense_dir = WORK / "gru-bi-dense-random"
            if not (dense_dir / "manifest.json").exists():
                import netcarve

                torch.manual_seed(0)
                netcarve.save(netcarve.create_model("gru", bidirectional=True, pool="mean").eval(), dense_dir)
            for batch in a.batch:
                for variant in ("dense", "block4x16-90"):
                    src = str(dense_dir) if variant == "dense" else str(_projected("gru-bi", variant, a.data_dir))
                    _log(f"gru-bi {variant} batch {batch}")
                    res = _bench(src, None, batch, a.threads, a.engines, a.repeats, a.rounds, a.passes)
                    record({"model": "gru-bi", "variant": variant, "batch": batch, "source": Path(src).name,
                            "weights": "random weights" + (", one-shot block projection" if variant != "dense" else ""),
                            **res})
            continue
        if model == "gru":
            dense_src, _, dense_note = _dense_source("gru")
            trained = Path(dense_src).exists()
            if not trained:
                _log("no trained GRU (benchmarks/sparsity_cifar.py grid --preset gru): random weights, block-sparse "
                     "variants projected one-shot")
            for batch in a.batch:
                for variant in ["dense", *GRU_CELLS]:
                    if variant == "dense":
                        src, weights, note = dense_src, None, dense_note
                    elif trained and (SPARSITY_WORK / GRU_CELLS[variant] / "manifest.json").exists():
                        src, weights, note = str(SPARSITY_WORK / GRU_CELLS[variant]), None, "fine-tuned cell"
                    else:
                        src, weights, note = str(_projected("gru", variant, a.data_dir)), None, \
                            "one-shot projection of the " + ("trained" if trained else "random-weight") + " GRU"
                    _log(f"gru {variant} batch {batch} ({note})")
                    res = _bench(src, weights, batch, a.threads, a.engines, a.repeats, a.rounds, a.passes)
                    record({"model": "gru", "variant": variant, "batch": batch, "source": Path(src).name,
                            "weights": note, **res})
            continue
        if model == "resnet56-channel":
            compact = STRUCT_WORK / "netcarve-all-r8" / "pruned"
            if not (compact / "manifest.json").exists():
                _log(f"no channel-pruned ResNet-56 at {compact}: run benchmarks/structural_resnet56.py first")
                continue
            for batch in a.batch:
                for variant, (src, w) in {"dense": ("resnet56", "pretrained"), "channel-pruned": (str(compact), None)}.items():
                    _log(f"resnet56-channel {variant} batch {batch}")
                    res = _bench(src, w, batch, a.threads, [e for e in a.engines if e != "deepsparse"],
                                 a.repeats, a.rounds, a.passes)
                    record({"model": "resnet56-channel", "variant": variant, "batch": batch, "source": src, **res})
            continue
        for variant in a.variants:
            if variant == "dense":
                src, w, note = _dense_source(model)
            else:
                cell = _cell(model, variant)
                if cell is not None:
                    src, w, note = str(cell), None, f"fine-tuned run {cell.name}"
                else:
                    src, w, note = str(_projected(model, variant, a.data_dir)), None, "one-shot projection (no fine-tune)"
            for batch in a.batch:
                _log(f"{model} {variant} batch {batch} ({note})")
                res = _bench(src, w, batch, a.threads, a.engines, a.repeats, a.rounds, a.passes)
                record({"model": model, "variant": variant, "batch": batch, "source": note, **res})
    _print(rows)


def _print(rows) -> None:
    names = ["torch", "onnxruntime", "openvino", "deepsparse", "netcarve-dense", "netcarve", "netcarve-gen"]
    print(f"{'model':<18} {'variant':<15} {'batch':>5} " + " ".join(f"{n:>14}" for n in names) + f" {'vs best dense':>14}")
    for r in rows:
        e = r["engines"]
        cells = " ".join(f"{e[n]['latency_ms']:14.3f}" if n in e else f"{'-':>14}" for n in names)
        sp = e.get("netcarve", {}).get("speedup_vs_fastest_dense")
        print(f"{r['model']:<18} {r['variant']:<15} {r['batch']:>5} {cells} {(f'{sp:.2f}x' if sp else '-'):>14}")


if __name__ == "__main__":
    main()
