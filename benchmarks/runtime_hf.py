"""A Hugging Face transformers BERT classifier in netcarve's runtime against eager PyTorch, onnxruntime and OpenVINO.

    python benchmarks/runtime_hf.py --threads 2 --batches 1 16 --out benchmarks/results/runtime_hf-zen4.json

Needs ``transformers`` (not a netcarve dependency; a virtualenv with ``--system-site-packages`` beside torch).
transformers 5 models cannot be traced by torch.fx: netcarve captures the model with torch.export
(``netcarve.graph.exported``) and compiles that graph, for the example's batch (``compile(..., dynamic=True)``
would add others). The model: ``BertForSequenceClassification`` with hidden size 256, 4 heads, feed-forward 1024,
2 layers, vocabulary 5000 (random init; latency does not depend on the values), 32 tokens of which the last 8 are
padding (``attention_mask``). Variants:

* ``dense``;
* ``pruned``: netcarve's structural pruning at ratio 0.5 (L1): 2 of 4 heads per layer (the graph's attention-heads
  groups) and half of every feed-forward layer; the model width (LayerNorm'd) stays;
* ``pruned-hidden``: the same with ``hidden_size=True``: the hidden size (embeddings, LayerNorm, every block's
  input and output projections) halved too (256 -> 128);
* ``block90``: every Linear of the encoder (q, k, v, attention output, both feed-forward layers) with 90% of its
  weights zero in 4x16 blocks (netcarve's block scheme); the other engines run it as the dense model it is.

Every engine runs in its own process (``netcarve.measure.measure_latency``: warm-up, the median of ``--repeats``
calls per round, the minimum over ``--rounds`` rounds), one variant and batch after another; netcarve's compiled
output is checked against the model's logits in this process first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from coverage_hf import without_benchmarks_on_path  # noqa: E402

ENGINES = ("torch", "onnxruntime", "openvino", "netcarve")
CONFIG = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024, vocab_size=5000)


def build(variant: str) -> nn.Module:
    with without_benchmarks_on_path():  # (not benchmarks/kernels.py for transformers' `kernels`)
        from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG)).eval()
    if variant in ("pruned", "pruned-hidden"):
        from netcarve.compact import prune_channels

        return prune_channels(model, inputs(2), ratio=0.5, hidden_size=variant == "pruned-hidden").model.eval()
    if variant == "block90":
        from netcarve.sparsity import make_scheme

        blk = make_scheme("block", block=[4, 16])
        with torch.no_grad():
            for m in model.bert.encoder.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(blk.project(m.weight, 0.9))
    return model


def inputs(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 32, dtype=torch.long)
    mask[:, 24:] = 0
    return {"input_ids": torch.randint(1, 5000, (batch, 32), generator=g), "attention_mask": mask}


def check(model: nn.Module, x: dict) -> dict:
    """netcarve's compiled output against the model's logits; its python steps and whether it ran natively."""
    from netcarve.runtime import compile as ncompile

    c = ncompile(model, x, sparse="auto")
    with torch.no_grad():
        ref = model(**x).logits
        got = c(**x)
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err <= 1e-4, err
    return {"max_rel_error": err, "native": c.native, "python_steps": c.fallback,
            "kernels": {lc.name: lc.choice for lc in c.layers}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--variants", nargs="+", default=["dense", "pruned", "block90"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=str(HERE / "results" / "runtime_hf.json"))
    a = p.parse_args()

    from netcarve.measure import count_model, environment
    from netcarve.measure.latency import engine_available, measure_latency

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    results: dict = {}
    for variant in a.variants:
        model = build(variant)
        cost = count_model(model, inputs(1))
        rec = results.setdefault(variant, {"macs_batch1": int(cost.total_macs), "params": int(cost.total_params),
                                           "ms": {}})
        for b in a.batches:
            x = inputs(b)
            rec.setdefault("check", {})[f"batch{b}"] = check(model, x)
            for engine in a.engines:
                if not engine_available(engine):
                    rec["ms"].setdefault(engine, "not installed")
                    continue
                r = measure_latency(model, x, engine=engine, threads=a.threads, repeats=a.repeats, rounds=a.rounds)
                rec["ms"].setdefault(engine, {})[f"batch{b}"] = round(r.p50_ms, 4)
                print(f"[{time.perf_counter() - t0:5.0f}s] {variant} batch {b} {engine}: {r.p50_ms:.3f} ms",
                      file=sys.stderr, flush=True)
    summary = {}
    for variant, rec in results.items():
        for b in a.batches:
            ms = {e: v[f"batch{b}"] for e, v in rec["ms"].items() if isinstance(v, dict)}
            others = {e: v for e, v in ms.items() if e not in ("netcarve", "torch")}
            if "netcarve" in ms and others:
                best = min(others, key=others.get)
                summary[f"{variant}, batch {b}"] = {"netcarve_ms": ms["netcarve"], "fastest_other": best,
                                                    "fastest_other_ms": others[best],
                                                    "speedup": round(others[best] / ms["netcarve"], 3)}
            dense = results.get("dense", {}).get("ms", {})
            if variant != "dense" and isinstance(dense.get("netcarve"), dict) and "netcarve" in ms:
                summary[f"{variant}, batch {b}"]["vs netcarve dense"] = round(
                    dense["netcarve"][f"batch{b}"] / ms["netcarve"], 3)
    from importlib.metadata import version

    data = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 1), "model": f"BertForSequenceClassification {CONFIG}, "
            "32 tokens (last 8 padding)", "transformers": version("transformers"), "threads": a.threads,
            "rounds": a.rounds, "repeats": a.repeats, "environment": environment(), "summary": summary,
            "results": results}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(data, indent=1) + "\n")
    for k, v in summary.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
