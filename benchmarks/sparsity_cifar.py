"""Accuracy against weight sparsity, per scheme x algorithm, at a fixed fine-tune budget, on real CIFAR-10.

    # one cell (resumable: rerun the same command after a kill)
    python benchmarks/sparsity_cifar.py run --model resnet20 --scheme pattern --connectivity 3.6 --algorithm admm
    # a preset list of cells, one after the other (finished cells are skipped)
    python benchmarks/sparsity_cifar.py grid --preset resnet20
    # a block-pruned 2-layer GRU on CIFAR-10 rows (32 steps x 96 features): trains the dense GRU first
    python benchmarks/sparsity_cifar.py grid --preset gru
    # the same on a wider dense GRU (hidden 256, trained first as gru-h256-dense): more redundancy to remove
    python benchmarks/sparsity_cifar.py run --model gru --hidden 256 --scheme block --block 4x16 --sparsity 0.9 \
        --algorithm agp --epochs 16
    # VGG-16-BN trained here first (15 epochs, bf16 autocast), then pattern + connectivity / unstructured
    python benchmarks/sparsity_cifar.py grid --preset vgg16 --precision bf16
    # collect every finished cell into benchmarks/results/sparsity_cifar.json and print the table
    python benchmarks/sparsity_cifar.py report

Every cell runs the same code path as ``netcarve sparsify`` (``netcarve.flows.sparsify.run_recipe``): the
pretrained model (``--weights pretrained``; the GRU: the dense model trained by the ``gru`` preset), the scheme
on every weight it applies to except the first conv and the last linear layer, the algorithm, then the
budget: ``--epochs`` (default 4) epochs of SGD (lr 0.01, cosine, momentum 0.9, wd 5e-4, batch 128, crop + flip)
with logit KD (T=4, alpha=0.9) from the dense model on the full 50k training set, BN recalibration after the
hard prune (20 batches); the GRU fine-tunes with AdamW (lr 1e-3, wd 1e-4, gradient clip 1) instead. Cells run with
``--precision bf16`` (name suffix ``-bf16``) train under bf16 autocast in channels-last (about 2x faster here);
their evaluation is fp32 like every other cell's. For ``admm`` / ``reweighted`` / ``ssauto`` the first half of the budget regularises and
the second half retrains with the masks fixed. Accuracy is top-1 on the full 10k test set. "compression" is
dense weights / non-zero weights *of the sparsified layers*; "model compression" counts every parameter.

The work directory (``--work``, default ``~/.cache/netcarve/bench/sparsity_cifar``) keeps one run directory
per cell (``netcarve eval`` / ``netcarve bench`` work on them). Needs the shared data (``--data-dir`` or
``NETCARVE_DATA``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).resolve().parent / "results" / "sparsity_cifar.json"

# preset cells: (model, scheme flags, algorithm, sparsity-or-None)
PRESETS = {
    "resnet20": [
        ("resnet20", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "oneshot"),
        ("resnet20", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "admm"),
        *[("resnet20", {"scheme": "unstructured", "sparsity": s}, a) for s in (0.75, 0.875, 0.9375)
          for a in ("oneshot", "admm")],
        ("resnet20", {"scheme": "pattern", "patterns": 8}, "oneshot"),
        ("resnet20", {"scheme": "nm", "n": 2, "m": 4}, "oneshot"),
        ("resnet20", {"scheme": "block", "block": "4x16", "sparsity": 0.75}, "oneshot"),
        ("resnet20", {"scheme": "block", "block": "4x16", "sparsity": 0.75}, "reweighted"),
        ("resnet20", {"scheme": "pcnn", "length": 9, "keep": 2}, "admm"),
        ("resnet20", {"scheme": "column", "sparsity": 0.5}, "ssauto"),
        ("resnet20", {"scheme": "unstructured", "sparsity": 0.875}, "agp"),
    ],
    # the two halves of the committed run, one process each (1 thread each on 2 cores)
    "issue4-a": [
        ("resnet20", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "oneshot"),
        *[("resnet20", {"scheme": "unstructured", "sparsity": s}, "oneshot") for s in (0.875, 0.9375, 0.75)],
        ("resnet20", {"scheme": "nm", "n": 2, "m": 4}, "oneshot"),
        ("resnet20", {"scheme": "block", "block": "4x16", "sparsity": 0.75}, "oneshot"),
        ("resnet20", {"scheme": "pattern", "patterns": 8}, "oneshot"),
    ],
    "issue4-b": [
        ("resnet20", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "admm"),
        ("resnet20", {"scheme": "unstructured", "sparsity": 0.875}, "admm"),
        ("gru", {"scheme": "block", "block": "16x16", "sparsity": 0.9}, "oneshot"),
        ("gru", {"scheme": "block", "block": "16x16", "sparsity": 0.9}, "admm"),
        *[("resnet20", {"scheme": "unstructured", "sparsity": s}, "admm") for s in (0.9375, 0.75)],
    ],
    "resnet56": [
        ("resnet56", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "oneshot"),
        ("resnet56", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "admm"),
        ("resnet56", {"scheme": "unstructured", "sparsity": 0.9}, "oneshot"),
    ],
    "vgg16": [
        ("vgg16", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "oneshot"),
        ("vgg16", {"scheme": "unstructured", "sparsity": 0.9}, "oneshot"),
        ("resnet56", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "oneshot"),
        ("vgg16", {"scheme": "pattern", "patterns": 8, "connectivity": 3.6}, "admm"),
    ],
    "gru": [
        ("gru", {"scheme": "block", "block": "16x16", "sparsity": 0.9}, "oneshot"),
        ("gru", {"scheme": "block", "block": "16x16", "sparsity": 0.9}, "admm"),
        ("gru", {"scheme": "block", "block": "4x16", "sparsity": 0.9}, "oneshot"),
        ("gru", {"scheme": "block", "block": "4x16", "sparsity": 0.9}, "reweighted"),
        ("gru", {"scheme": "block", "block": "4x16", "sparsity": 0.75}, "oneshot"),
        ("gru", {"scheme": "block", "block": "4x16", "sparsity": 0.9, "balanced": True}, "oneshot"),
        ("gru", {"scheme": "block", "block": "4x16", "sparsity": 0.75, "balanced": True}, "oneshot"),
        ("gru", {"scheme": "unstructured", "sparsity": 0.9}, "oneshot"),
    ],
}


def _log(msg: str) -> None:
    print(f"[sparsity_cifar {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cell_name(model: str, flags: dict, algorithm: str, epochs: int, options: dict | None = None) -> str:
    parts = [model, flags["scheme"]]
    for k in ("n", "m", "block", "patterns", "connectivity", "length", "keep", "sparsity"):
        if flags.get(k) is not None:
            parts.append(f"{k[0]}{flags[k]}")
    if flags.get("balanced"):
        parts.append("balanced")
    if flags.get("allocation") not in (None, "uniform"):
        parts.append(flags["allocation"] + (f"{flags['min_density']}" if flags.get("min_density") else ""))
    parts.append(algorithm)
    parts += [f"{k}{v}" for k, v in sorted((options or {}).items())]  # non-default algorithm options
    return "-".join(str(p) for p in parts + [f"e{epochs}"])


def gru_dense(work: Path, data_dir, epochs: int = 10, hidden: int = 128) -> Path:
    """Train the dense 2-layer GRU (hidden 128, or ``hidden``) on CIFAR-10 rows once (resumable); its checkpoint
    dir (``gru-dense``, or ``gru-h<hidden>-dense``)."""
    import netcarve
    from netcarve.data import make_loaders
    from netcarve.models import create_model, get_model_info
    from netcarve.train import TrainConfig, evaluate, fit

    tag = "gru" if hidden == 128 else f"gru-h{hidden}"
    out = work / f"{tag}-dense"
    if (out / "manifest.json").exists():
        return out
    model = create_model("gru", hidden_size=hidden)
    info = get_model_info("gru")
    train, test = make_loaders("cifar10-rows", info.preprocess, 128, data_dir=data_dir, augment=False, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=128, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                      schedule="cosine", grad_clip=1.0)
    _log(f"training the dense GRU (hidden {hidden}) for {epochs} epochs")
    fit(model, train, test, cfg, out_dir=work / f"{tag}-dense-train", resume=True, progress=False)
    acc = evaluate(model, test)
    netcarve.save(model, out, metadata={"accuracy": acc, "epochs": epochs, "hidden_size": hidden})
    _log(f"dense GRU (hidden {hidden}): top-1 {acc['top1']:.2f}%")
    return out


VGG_EPOCHS = 15


def vgg16_dense(work: Path, data_dir, epochs: int = VGG_EPOCHS) -> Path:
    """Train VGG-16-BN on CIFAR-10 from scratch once (resumable; 15 epochs, or ``epochs``: the dirs are then
    named ``vgg16-e<epochs>-...``); its checkpoint dir.

    SGD (lr 0.05, momentum 0.9, wd 5e-4, cosine), batch 128, crop + flip, bf16 autocast + channels-last
    (about 175 s per epoch on 2 threads here instead of ~390 s in fp32); evaluated in fp32."""
    import netcarve
    from netcarve.data import make_loaders
    from netcarve.models import create_model, get_model_info
    from netcarve.train import TrainConfig, evaluate, fit
    from netcarve.utils import seed_everything

    tag = "vgg16" if epochs == VGG_EPOCHS else f"vgg16-e{epochs}"
    out = work / f"{tag}-dense"
    if (out / "manifest.json").exists():
        return out
    seed_everything(0)
    model = create_model("vgg16_bn")
    info = get_model_info("vgg16_bn")
    train, test = make_loaders("cifar10", info.preprocess, 128, data_dir=data_dir, augment=True, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                      schedule="cosine", precision="bf16", channels_last=True)
    _log(f"training VGG-16 for {epochs} epochs")
    fit(model, train, test, cfg, out_dir=work / f"{tag}-dense-train", resume=True, progress=False)
    acc = evaluate(model, test)
    netcarve.save(model, out, metadata={"accuracy": acc, "epochs": epochs, "train": cfg.to_dict()})
    _log(f"dense VGG-16: top-1 {acc['top1']:.2f}%")
    return out


def run_cell(work: Path, model: str, flags: dict, algorithm: str, epochs: int, data_dir, lr: float = 0.01,
             options: dict | None = None, precision: str = "fp32", feature_kd: float = 0.0,
             kd_mse: bool = False, hidden: int = 128, cutmix: float = 0.0, vgg_epochs: int = VGG_EPOCHS) -> dict:
    from netcarve.flows.sparsify import SparsifyRecipe, plan_from_args, run_recipe

    if hidden != 128 and model != "gru":
        raise SystemExit("--hidden: GRU cells only (--model gru)")
    if vgg_epochs != VGG_EPOCHS and model != "vgg16":
        raise SystemExit("--vgg-epochs: VGG-16 cells only (--model vgg16)")
    tag = model if hidden == 128 else f"{model}-h{hidden}"
    if vgg_epochs != VGG_EPOCHS:
        tag = f"{model}-e{vgg_epochs}"
    name = cell_name(tag, flags, algorithm, epochs, options) + ("-mse" if kd_mse else "") \
        + (f"-fkd{feature_kd:g}" if feature_kd else "") + (f"-cm{cutmix:g}" if cutmix else "") \
        + ("-bf16" if precision == "bf16" else "")
    out = work / name
    if (out / "report.json").exists():
        _log(f"{name}: done already")
        return json.loads((out / "report.json").read_text())
    ns = argparse.Namespace(plan=None, layers=None, types=None, exclude=None, include_first_last=False,
                            balanced=bool(flags.get("balanced")),
                            **{k: flags.get(k) for k in ("scheme", "sparsity", "n", "m", "block", "patterns",
                                                         "connectivity", "length", "keep", "groups", "allocation",
                                                         "min_density")})
    source, weights = model, "pretrained"
    finetune = {"epochs": epochs, "lr": lr, "batch_size": 128, "cutmix": cutmix}
    if precision == "bf16":
        finetune.update(precision="bf16", channels_last=model not in ("gru", "lstm"))
    if model == "vgg16":
        source, weights = str(vgg16_dense(work, data_dir, vgg_epochs)), None
    if model in ("gru", "lstm"):
        source, weights = str(gru_dense(work, data_dir, hidden=hidden)), None
        finetune.update(optimizer="adamw", lr=1e-3, weight_decay=1e-4, grad_clip=1.0)
    recipe = SparsifyRecipe.from_dict({
        "model": source, "weights": weights, "out": str(out), "plan": plan_from_args(ns), "data_dir": data_dir,
        "algorithm": algorithm, "algorithm_options": options or {},
        "finetune": finetune, "bn_batches": 20,
        # logit KD from the dense model (kd_mse: squared error on the logits, no label term); feature_kd > 0: also
        # every block's output (least-squares adapters)
        "distill": _kd(feature_kd, kd_mse) if epochs and (feature_kd or kd_mse) else epochs > 0,
    })
    _log(f"{name}: start")
    rep = run_recipe(recipe, resume=True, progress=False, threads=torch.get_num_threads(),
                     command=_command(model, flags, algorithm, epochs, options, precision, feature_kd, kd_mse,
                                      hidden, cutmix, vgg_epochs))
    return rep


def _kd(feature_kd: float, kd_mse: bool) -> dict:
    """The cell's distillation: what ``netcarve sparsify --distill KIND`` means (``KDConfig.recovery``)."""
    from netcarve.train import KDConfig

    kind = ("logit_mse" if kd_mse else "logit") + ("+feature" if feature_kd else "")
    return KDConfig.recovery(kind, feature_kd or 1.0).to_dict()


def _command(model: str, flags: dict, algorithm: str, epochs: int, options: dict | None,
             precision: str = "fp32", feature_kd: float = 0.0, kd_mse: bool = False, hidden: int = 128,
             cutmix: float = 0.0, vgg_epochs: int = VGG_EPOCHS) -> str:
    """The ``run`` command line that reproduces a cell."""
    args = []
    extra = {"precision": precision} if precision != "fp32" else {}
    if vgg_epochs != VGG_EPOCHS:
        extra["vgg-epochs"] = vgg_epochs
    if hidden != 128:
        extra["hidden"] = hidden
    if kd_mse:
        extra["kd-mse"] = True
    if feature_kd:
        extra["feature-kd"] = f"{feature_kd:g}"
    if cutmix:
        extra["cutmix"] = f"{cutmix:g}"
    for k, v in {"model": model, **flags, "algorithm": algorithm, "epochs": epochs, **extra}.items():
        k = k.replace("_", "-")
        if v is True:
            args.append(f"--{k}")
        elif v is not None and v is not False:
            args.append(f"--{k} {v}")
    args += [f"--option {k}={v}" for k, v in (options or {}).items()]
    return "python benchmarks/sparsity_cifar.py run " + " ".join(args)


def cmd_run(a) -> None:
    flags = {k: getattr(a, k) for k in ("scheme", "sparsity", "n", "m", "block", "patterns", "connectivity",
                                        "length", "keep", "groups", "balanced", "allocation", "min_density")}
    run_cell(Path(a.work), a.model, flags, a.algorithm, a.epochs, a.data_dir, a.lr,
             {k: json.loads(v) if v[:1] in "0123456789-[{" else v for k, v in (o.split("=", 1) for o in a.option)},
             a.precision, a.feature_kd, a.kd_mse, a.hidden, a.cutmix, a.vgg_epochs)


def cmd_grid(a) -> None:
    for model, flags, algorithm in PRESETS[a.preset]:
        run_cell(Path(a.work), model, flags, algorithm, a.epochs, a.data_dir, a.lr, precision=a.precision)


def cmd_report(a) -> None:
    from netcarve.measure import environment

    rows = []
    for d in sorted(Path(a.work).iterdir()):
        rp = d / "report.json"
        if not rp.is_file():
            continue
        rep = json.loads(rp.read_text())
        s = rep["task"]["sparsity"]
        layers = s["layers"]
        numel = sum(v["numel"] for v in layers.values())
        nz = sum(v["nonzero"] for v in layers.values())
        rows.append({
            "cell": d.name, "model": rep["task"]["model"], "command": rep.get("command"),
            "scheme": ",".join(sorted({v["scheme"] for v in layers.values()})), "algorithm": s["algorithm"],
            "options": s["options"], "sparsified_weights": len(layers), "left_dense": len(s["skipped"]),
            "layer_sparsity": 1 - nz / numel, "compression": numel / max(1, nz),
            "model_compression": s["compression"], "macs_reduction": s["dense_macs"] / max(1, s["nonzero_macs"]),
            "top1_dense": rep["baseline"]["top1"], "top1": rep["compressed"]["top1"],
            "delta_pp": rep["compressed"]["top1"] - rep["baseline"]["top1"], "seconds": rep["task"]["seconds"],
            "threads": rep["env"].get("threads"), "cpu": rep["env"].get("cpu_model"),
            "precision": "bf16" if d.name.endswith("-bf16") else "fp32",
        })
        saved = (yaml.safe_load((d / "recipe.yaml").read_text()) or {}) if (d / "recipe.yaml").is_file() else {}
        plan = saved.get("plan", {})
        if isinstance(saved.get("distill"), dict):
            rows[-1]["distill"] = saved["distill"]
        if plan.get("allocation", "uniform") != "uniform":
            rows[-1]["allocation"] = plan["allocation"]
            rows[-1]["min_density"] = plan.get("min_density", 0.0)
            rows[-1]["kernel_density_by_layer"] = {k: round(1 - v["level"], 4) for k, v in layers.items()
                                                   if v.get("level") is not None}
    # cells committed earlier (another machine or work directory) and not re-run here are kept as they were
    prev = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    here = {r["cell"] for r in rows}
    notes = {r["cell"]: r["note"] for r in prev.get("rows", []) if "note" in r}
    for r in rows:  # (a note written beside a committed cell, e.g. the machine it ran on, stays with it)
        if r["cell"] in notes:
            r.setdefault("note", notes[r["cell"]])
    rows = [r for r in prev.get("rows", []) if r["cell"] not in here] + rows
    doc = {"benchmark": "sparsity_cifar", "budget": "see module docstring", "rows": rows,
           "env": environment(threads=torch.get_num_threads())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1))
    head = f"{'cell':<58} {'dense':>6} {'top-1':>6} {'delta':>6} {'compr.':>7} {'MACs':>6}"
    print(head)
    for r in rows:
        print(f"{r['cell']:<58} {r['top1_dense']:6.2f} {r['top1']:6.2f} {r['delta_pp']:+6.2f} "
              f"{r['compression']:6.2f}x {r['macs_reduction']:5.2f}x")
    print(f"wrote {RESULTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "grid", "report"):
        s = sub.add_parser(name)
        s.add_argument("--work", default=os.path.expanduser("~/.cache/netcarve/bench/sparsity_cifar"))
        s.add_argument("--data-dir", default=None)
        s.add_argument("--threads", type=int, default=2)
        if name in ("run", "grid"):
            s.add_argument("--epochs", type=int, default=4)
            s.add_argument("--lr", type=float, default=0.01)
            s.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                           help="bf16: fine-tune under bf16 autocast + channels-last (~2x faster here)")
        if name == "run":
            s.add_argument("--model", default="resnet20")
            s.add_argument("--scheme", required=True)
            s.add_argument("--algorithm", default="oneshot")
            for k in ("sparsity", "connectivity"):
                s.add_argument(f"--{k}", type=float)
            for k in ("n", "m", "patterns", "length", "keep", "groups"):
                s.add_argument(f"--{k}", type=int)
            s.add_argument("--block")
            s.add_argument("--balanced", action="store_true")
            s.add_argument("--allocation", help="uniform (default), global, lamp, erk (netcarve.sparsity.allocation)")
            s.add_argument("--min-density", type=float, help="non-uniform allocation: least kept share per weight")
            s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
            s.add_argument("--feature-kd", type=float, default=0.0, metavar="WEIGHT",
                           help="also distil every block's output (least-squares adapters) with this weight; 0: "
                                "logit KD only (the cell's name gets -fkdWEIGHT)")
            s.add_argument("--hidden", type=int, default=128,
                           help="--model gru: the hidden size of the dense GRU trained first (default 128; other "
                                "sizes train gru-h<hidden>-dense and name the cells gru-h<hidden>-...)")
            s.add_argument("--vgg-epochs", type=int, default=VGG_EPOCHS,
                           help=f"--model vgg16: epochs of the dense VGG-16 trained first (default {VGG_EPOCHS}; "
                                "others train vgg16-e<N>-dense and name the cells vgg16-e<N>-...)")
            s.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                           help="CutMix on every fine-tuning batch (TrainConfig.cutmix; the teacher sees the mixed "
                                "images; the cell's name gets -cmALPHA)")
            s.add_argument("--kd-mse", action="store_true",
                           help="distil by squared error on the logits (KDConfig kind logit_mse, alpha 1: no label "
                                "term) instead of softened KL (the cell's name gets -mse)")
        if name == "grid":
            s.add_argument("--preset", choices=sorted(PRESETS), required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    {"run": cmd_run, "grid": cmd_grid, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
