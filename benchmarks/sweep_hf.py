"""A wider smoke sweep of Hugging Face transformers architectures (beyond the 12 of ``coverage.py --hf``): each built
from a small config (random init, eval mode, batch 1, no weights downloaded), then ``build_channel_groups`` (default and
``hidden_size=True``), ``prune_channels(ratio=0.3)`` and the compact model's logits against the masked model's.
netcarve only (Torch-Pruning is compared on the 12 of the coverage benchmark). Needs ``transformers`` (a virtualenv
with ``--system-site-packages`` beside torch).

    python benchmarks/sweep_hf.py --out benchmarks/results/sweep_hf.json
    python benchmarks/sweep_hf.py --models falcon mobilenet_v2      # a few (the JSON then holds only those)

Status per architecture and mode: ``ok`` (groups found, compact == masked within 1e-4 of the output scale),
``not equivalent``, ``no groups``, ``error`` (netcarve raised: the message is recorded) or ``build failed`` (the small
config itself does not build here). Runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=200)
TEXT = {  # name -> (auto class, config overrides beyond SMALL)
    "mistral": ("AutoModelForCausalLM", dict(num_key_value_heads=2)),
    "phi": ("AutoModelForCausalLM", {}),
    "phi3": ("AutoModelForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "gemma": ("AutoModelForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("AutoModelForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "qwen3": ("AutoModelForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "olmo": ("AutoModelForCausalLM", {}),
    "granite": ("AutoModelForCausalLM", {}),
    "stablelm": ("AutoModelForCausalLM", {}),
    "opt": ("AutoModelForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "bloom": ("AutoModelForCausalLM", dict(n_layer=2, n_head=4)),
    "gpt_neox": ("AutoModelForCausalLM", {}),
    "gptj": ("AutoModelForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
    "falcon": ("AutoModelForCausalLM", {}),
    "xlm-roberta": ("AutoModelForSequenceClassification", {}),
    "deberta-v2": ("AutoModelForSequenceClassification", {}),
    "mpnet": ("AutoModelForSequenceClassification", {}),
    "camembert": ("AutoModelForSequenceClassification", {}),
    "ernie": ("AutoModelForSequenceClassification", {}),
}
VISION = {
    "beit": ("AutoModelForImageClassification", dict(image_size=32, patch_size=8)),
    "dinov2": ("AutoModelForImageClassification", dict(image_size=32, patch_size=8)),
    "swin": ("AutoModelForImageClassification", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                      num_heads=[2, 4], window_size=4)),
    "mobilevit": ("AutoModelForImageClassification", dict(image_size=32)),
    "segformer": ("AutoModelForImageClassification", dict(image_size=32)),
    "efficientnet": ("AutoModelForImageClassification", dict(image_size=32)),
    "regnet": ("AutoModelForImageClassification", {}),
    "mobilenet_v2": ("AutoModelForImageClassification", dict(image_size=32)),
    "poolformer": ("AutoModelForImageClassification", {}),
    "convnextv2": ("AutoModelForImageClassification", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
}
RTOL = 1e-4


def build(tf, name: str):
    text = name in TEXT
    auto, kw = (TEXT if text else VISION)[name]
    cfg = tf.AutoConfig.for_model(name, **({**SMALL, **kw} if text else kw))
    cfg.num_labels = 3
    if text and getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = 0
    model = getattr(tf, auto).from_config(cfg).eval()
    if text:
        return model, {"input_ids": torch.randint(1, 200, (1, 12)), "attention_mask": torch.ones(1, 12, dtype=torch.long)}
    size = getattr(cfg, "image_size", 32)
    size = size if isinstance(size, int) else size[0]
    return model, {"pixel_values": torch.randn(1, getattr(cfg, "num_channels", 3), size, size)}


def one(model, x, hidden_size: bool) -> dict:
    from netcarve.compact import mask_channels, prune_channels
    from netcarve.graph import build_channel_groups

    t0 = time.perf_counter()
    rec: dict = {}
    try:
        gs = build_channel_groups(model, x, hidden_size=hidden_size)
        reasons: dict[str, int] = {}
        for s in gs.skipped:
            for r in s.reasons:
                reasons[r[:120]] = reasons.get(r[:120], 0) + 1
        rec.update(groups=len(gs.groups), skipped=len(gs.skipped),
                   top_skip_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:3]))
        if not gs.groups:
            rec["status"] = "no groups"
        else:
            res = prune_channels(model, x, ratio=0.3, groups=gs)
            with torch.no_grad():
                a, b = res.model(**x).logits, mask_channels(model, gs, res.keep)(**x).logits
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            rec.update(status="ok" if err <= RTOL else "not equivalent", rel_err=err,
                       macs_reduction=round(res.macs_reduction, 4))
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        where = traceback.extract_tb(e.__traceback__)[-1]
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:400],
                   where=f"{Path(where.filename).name}:{where.lineno}")
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, choices=sorted([*TEXT, *VISION]))
    p.add_argument("--out", default=str(HERE / "results" / "sweep_hf.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != HERE]  # (benchmarks/kernels.py vs transformers)
    import transformers as tf

    from netcarve.measure import environment

    rows = []
    for name in a.models or [*TEXT, *VISION]:
        torch.manual_seed(0)
        try:
            model, x = build(tf, name)
        except Exception as e:  # noqa: BLE001
            rows.append({"model": name, "status": "build failed", "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{name:14s} build failed: {rows[-1]['error'][:100]}", flush=True)
            continue
        row = {"model": name, "class": type(model).__name__}
        for hs in (False, True):
            row["hidden_size" if hs else "default"] = r = one(model, x, hs)
            print(f"{name:14s} hidden_size={hs!s:5} {r['status']:<15} {r.get('macs_reduction', '-')!s:>7} "
                  f"groups {r.get('groups', '-')} skipped {r.get('skipped', '-')} {r['seconds']}s "
                  f"{r.get('error', '')[:120]}", flush=True)
        rows.append(row)
    doc = {"benchmark": "sweep_hf", "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "transformers": tf.__version__, "ratio": 0.3, "rtol": RTOL, "env": environment(threads=1), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    n = sum(1 for r in rows if r.get("default", {}).get("status") == "ok" or r.get("hidden_size", {}).get("status") == "ok")
    print(f"{n}/{len(rows)} architectures pruned with compact == masked in at least one mode; wrote {a.out}")


if __name__ == "__main__":
    main()
