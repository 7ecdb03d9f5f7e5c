"""Structural pruning of the pretrained CIFAR-10 ResNet-56: netcarve against Torch-Pruning, side by side.

    # 1. prune + recover (each in its own process; resumable: rerun the same command after a kill)
    python benchmarks/structural_resnet56.py train --tool netcarve --round-to 8
    python benchmarks/structural_resnet56.py train --tool torch-pruning
    # 2. latency of dense / netcarve / Torch-Pruning models, interleaved fresh processes per engine
    python benchmarks/structural_resnet56.py latency
    # 3. optional: per-layer latency summed per stage (where the MACs reduction becomes speed)
    python benchmarks/structural_resnet56.py profile
    # 4. collect everything into benchmarks/results/structural_resnet56.json and print the table
    python benchmarks/structural_resnet56.py report

Both tools get the same criterion (L1 norm of the filters), the same MACs target (``--macs-reduction``,
default 2.15x; each tool's uniform per-layer ratio found by bisection), the same channels (the inner
channel of every residual block: Torch-Pruning 1.6.1 mis-handles the option-A zero-padded shortcuts, so the
residual channels are left whole for both; netcarve can prune them, see ``--groups all``) and the same
recovery: BatchNorm recalibration on 20 training batches, then ``--epochs`` (default 6) epochs of SGD
(lr 0.01, cosine, momentum 0.9, wd 5e-4, batch 128, standard crop + flip augmentation) with logit
distillation (T=4, alpha=0.9) from the unpruned model, on the full 50k training set. Accuracy is top-1 on
the full 10k test set. The work directory (``--work``, default ``~/.cache/netcarve/bench/structural_resnet56``)
keeps the pruned models, the fine-tune checkpoints and per-phase JSON, one folder per variant (``--name``,
default the tool, ``-rN`` appended with ``--round-to N``); ``latency`` and ``report`` take every finished one.

``--round-to 8`` keeps widths at multiples of 8 (8/16/24 here instead of 7/15/30), which the engines' vectorised
conv kernels want. Torch-Pruning's ``round_to=8`` cannot reach the target here: it rounds each layer's kept
width down and leaves a layer whole once that would be 0 (16-channel stage 1 at ratio > 0.5); scanning ratios 0-0.95 its best is
1.97x; its entry therefore uses ``round_to=1`` (7/15/30, the same widths as netcarve without rounding).

``--groups depth`` removes whole residual blocks instead (``netcarve.compact.prune_blocks``, least loss rise on 8
training batches first; every remaining layer keeps its width); ``--groups depth+all`` removes blocks for the
first sqrt(target) of the reduction and channels of every group for the rest. ``--seed`` changes the data order
and fine-tuning seed. ``--steps K`` (netcarve, ``--groups all``) spends the same epoch budget on iterative pruning:
K prune + BN recalibration + KD fine-tune steps on a geometric MACs schedule (``netcarve.algorithms`` ``iterative``).
``--algorithm sfp|srfp|asrfp|increg`` (``--algo-option KEY=VALUE``) spends it on soft pruning / incremental
regularisation of the full model instead, ending in the same physical removal. ``--reconstruct B`` (netcarve
channel pruning, any ``--algorithm``) replaces BN recalibration by a least-squares refit of every conv / linear against the
dense model on B training batches (``netcarve.compact.reconstruct``).
``--layer-ratio PATTERN=R`` (netcarve, ``--groups all``, one-shot; repeatable) sets the widths per group instead of
a MACs target, as ``netcarve prune --layer-ratio`` does (e.g. the stage-2 residual channels ``layer2.0.conv2``, the
stage-3 inner ones ``layer3.*.conv1``; groups no pattern names stay whole).
``--batch-size`` / ``--precision bf16`` / ``--channels-last`` change the fine-tuning batch and arithmetic. ``train --prune-only`` stops after pruning: its ``pruned`` model is timed by ``latency`` /
``profile`` like a finished one (latency does not depend on the weights), and ``report`` takes the accuracy of
such a variant from the committed results (a variant trained on another machine; its row says so).

Needs the shared data (``--data-dir`` or ``NETCARVE_DATA``) and ``pip install torch-pruning``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import netcarve
from netcarve.compact import prune_blocks, prune_channels, recalibrate_bn, reconstruct
from netcarve.criteria import list_criteria
from netcarve.data import make_loaders
from netcarve.flows.prune import parse_layer_ratios
from netcarve.graph import build_channel_groups
from netcarve.graph.groups import GroupSet
from netcarve.measure import compare_latency, count_model, engine_available, environment
from netcarve.models import create_model, example_input, get_model_info
from netcarve.train import KDConfig, TeacherEnsemble, TrainConfig, block_hints, evaluate, fit

RESULTS = Path(__file__).resolve().parent / "results" / "structural_resnet56.json"
WEIGHTS = "pretrained/akamaster_resnet56-4bfd9763.th"
TOOLS = ("netcarve", "torch-pruning")


def _log(msg: str) -> None:
    print(f"[structural_resnet56 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _baseline(data_dir):
    m = create_model("resnet56", pretrained=True, data_dir=data_dir)
    return m.eval()


def _teacher(names: str, base, data_dir):
    """The distillation teacher: the unpruned ResNet-56, or a TeacherEnsemble of pretrained zoo models."""
    ns = [n.strip() for n in names.split(",") if n.strip()]
    if ns == ["resnet56"]:
        return base
    if len(set(ns)) != len(ns) or not ns:
        raise SystemExit(f"--teachers: a comma-separated list of distinct zoo models, got {names!r}")
    ms = [base if n == "resnet56" else create_model(n, pretrained=True, data_dir=data_dir).eval() for n in ns]
    return TeacherEnsemble(ms)


def _macs(model) -> tuple[int, int]:
    model.eval()
    with torch.no_grad():
        c = count_model(model, example_input(model, batch=1))
    return int(c.total_macs), int(c.total_params)


def _widths(model) -> dict[str, int]:
    return {n: int(m.out_channels) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def prune_netcarve(base, target: float, groups: str, round_to: int = 1, loader=None, global_ranking: bool = False,
                   criterion: str = "l1", layer_ratios: dict[str, float] | None = None):
    x = example_input(base, batch=1)
    if groups.startswith("depth"):  # whole residual blocks, least loss rise first (8 training batches)
        # depth+all: blocks for the first sqrt(target) of the MACs reduction, then all channels for the rest
        first = target if groups == "depth" else math.sqrt(target)
        res = prune_blocks(base, x, macs_reduction=first, criterion="loss", loader=loader)
        info = {"removed_blocks": res.removed, "candidate_blocks": len(res.blocks),
                "block_scores": {k: round(v, 5) for k, v in res.scores.items()}}  # fmt: skip
        if groups == "depth":
            return res.model, info
        macs0, _ = _macs(base)
        macs1, _ = _macs(res.model)
        pr = prune_channels(res.model, x, criterion=_criterion(res.model, criterion, loader),
                            macs_reduction=macs1 / (macs0 / target), round_to=round_to)
        info.update({"ratio": pr.ratio, "round_to": round_to})
        return pr.model, info
    gs = build_channel_groups(base, x)
    if groups == "inner":
        gs = GroupSet(gs.model_name, groups=[g for g in gs.groups if not g.coupled])
    # with layer_ratios the widths are the user's (the groups they leave out stay whole): no MACs target
    pr = prune_channels(base, x, criterion=_criterion(base, criterion, loader), groups=gs, round_to=round_to,
                        macs_reduction=None if layer_ratios else target, global_ranking=global_ranking,
                        layer_ratios=layer_ratios or None)  # fmt: skip
    return pr.model, {"ratio": pr.ratio, "groups": len(gs.groups), "round_to": round_to, "_groups": gs, "_keep": pr.keep,
                      **({"global_ranking": True} if global_ranking else {}),
                      **({"layer_ratios": layer_ratios} if layer_ratios else {}),
                      **({"criterion": criterion} if criterion != "l1" else {})}


def _criterion(model, name: str, loader) -> str:
    """``name``, after leaving on ``model`` the gradients of 8 training batches when the criterion needs them."""
    from netcarve.criteria import accumulate_gradients, get_criterion

    if getattr(get_criterion(name), "needs_gradients", False):
        accumulate_gradients(model, loader, num_batches=8)
    return name


def prune_torch_pruning(base, target: float, groups: str, round_to: int = 1):
    """Torch-Pruning's MetaPruner with L1 magnitude importance; every conv except the block-inner conv1
    is an ignored root (its output channels are kept), the ratio is bisected to the MACs target."""
    import torch_pruning as tp

    if groups != "inner":
        raise SystemExit("torch-pruning: only --groups inner (it mis-handles the option-A shortcuts)")
    x = example_input(base, batch=1)
    macs0, _ = _macs(base)

    def run(ratio: float):
        m = copy.deepcopy(base)
        ignored = [mod for name, mod in m.named_modules()
                   if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and not name.endswith(".conv1")
                   or name == "conv1"]  # fmt: skip
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=ignored,
                                      round_to=round_to if round_to > 1 else None)  # fmt: skip
        pruner.step()
        return m

    # smallest ratio on a fine grid that meets the target: a scan, not a bisection, because with round_to
    # Torch-Pruning leaves a group whole once its rounded kept width would reach 0 (MACs not monotonic)
    hi = next((r / 400 for r in range(0, 381) if _macs(run(r / 400))[0] <= macs0 / target), None)
    if hi is None:
        raise SystemExit(f"torch-pruning: no ratio reaches {target}x fewer MACs")
    m = run(hi)
    m.netcarve_spec = copy.deepcopy(base.netcarve_spec)
    return m, {"ratio": hi, "round_to": round_to, "torch_pruning": _tp_version()}


def _tp_version() -> str | None:
    """The installed distribution's version (``torch_pruning.__version__`` of 1.6.1 still says 1.6.0)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return None


def _kd(kind: str, hints: str = "stages", adapter_init: str = "identity", weight: float = 1.0,
        temperature: float = 4.0, alpha: float = 0.9) -> KDConfig:
    """Logit KD (T=4, alpha=0.9 unless given; ``logit_mse``: squared error on the logits); ``+feature`` adds
    FitNets hints (1x1 adapters from the pruned widths to the teacher's) on the three stage outputs
    (``hints="stages"``) or on all 27 block outputs (``"blocks"``)."""
    if "feature" not in kind:
        return KDConfig(kind=kind, temperature=temperature, alpha=alpha)
    pairs = ([[p, p] for p in ("layer1", "layer2", "layer3")] if hints == "stages"
             else block_hints(create_model("resnet56")))  # the 27 residual blocks  # fmt: skip
    return KDConfig(kind=kind, temperature=temperature, alpha=alpha, feature_weight=weight, hints=pairs,
                    adapter_init=adapter_init)  # fmt: skip


def _algo_options(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"--algo-option expects KEY=VALUE, got {it!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_train(a) -> None:
    name = a.name or (a.tool if a.round_to == 1 else f"{a.tool}-r{a.round_to}")
    work = Path(a.work) / name
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    base = _baseline(a.data_dir)
    teacher = _teacher(a.teachers, base, a.data_dir)
    info = get_model_info("resnet56")
    train, test = make_loaders("cifar10", info.preprocess, a.batch_size, data_dir=a.data_dir, augment=True,
                               seed=a.seed)  # fmt: skip
    state = work / "state.json"
    rec = json.loads(state.read_text()) if state.exists() else {}
    if "base_top1" not in rec:
        rec["base_top1"] = evaluate(base, test)["top1"]
    t0 = time.perf_counter()
    pruned_dir = work / "pruned"
    if a.steps > 1:
        if a.algorithm not in ("oneshot", "iterative"):
            raise SystemExit(f"--steps is iterative pruning; it does not combine with --algorithm {a.algorithm}")
        a.algorithm = "iterative"
    algo_opts = _algo_options(a.algo_option)
    if a.criterion != "l1" and (a.tool != "netcarve" or a.algorithm != "oneshot"):
        raise SystemExit("--criterion other than l1: netcarve one-shot pruning only")
    if a.algorithm != "oneshot" and (a.tool != "netcarve" or a.groups != "all"):
        raise SystemExit(f"--algorithm {a.algorithm} / --steps needs --tool netcarve --groups all")
    layer_ratios = parse_layer_ratios(a.layer_ratio)
    if layer_ratios and (a.tool != "netcarve" or a.groups != "all" or a.algorithm != "oneshot"):
        raise SystemExit("--layer-ratio: netcarve one-shot pruning with --groups all only")
    if a.reconstruct and (a.tool != "netcarve" or a.groups.startswith("depth")):
        raise SystemExit("--reconstruct: netcarve channel pruning only")
    rec["tool"] = a.tool
    if a.algorithm == "oneshot" and not (pruned_dir / "manifest.json").exists():
        torch.manual_seed(0)
        if a.tool == "netcarve":
            model, extra = prune_netcarve(base, a.macs_reduction, a.groups, a.round_to, loader=train,
                                          global_ranking=a.global_ranking, criterion=a.criterion,
                                          layer_ratios=layer_ratios)  # fmt: skip
        else:
            model, extra = prune_torch_pruning(base, a.macs_reduction, a.groups, a.round_to)
        rec["tool"] = a.tool
        rec["prune"] = extra
        rec["prune_seconds"] = round(time.perf_counter() - t0, 1)
        rec["top1_pruned"] = evaluate(model, test)["top1"]
        if a.reconstruct:  # least-squares refit of every conv / linear against the dense model, instead of BN recal
            model, rrep = reconstruct(base, extra.pop("_groups"), extra.pop("_keep"), train,
                                      num_batches=a.reconstruct)
            rec["reconstruct"] = rrep.to_dict()
            rec["top1_reconstructed"] = evaluate(model, test)["top1"]
            after = f"{rec['top1_reconstructed']:.2f} after reconstruction ({rrep.seconds:.0f} s)"
        else:
            recalibrate_bn(model, train, num_batches=20)
            rec["top1_bn_recalibrated"] = evaluate(model, test)["top1"]
            after = f"{rec['top1_bn_recalibrated']:.2f} after BN recalibration"
        extra.pop("_groups", None)
        extra.pop("_keep", None)
        rec["prune"] = extra
        netcarve.save(model, pruned_dir)
        state.write_text(json.dumps(rec, indent=1))
        _log(f"{a.tool}: pruned ({rec['prune']}), top-1 {rec['top1_pruned']:.2f} -> {after}")
    if a.prune_only:
        _log(f"{a.tool}: --prune-only: {pruned_dir} holds the pruned architecture (for latency / profile)")
        return
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, optimizer="sgd", lr=a.lr, momentum=0.9,
                      weight_decay=5e-4, schedule="cosine", seed=a.seed, precision=a.precision,
                      channels_last=a.channels_last, ema_decay=a.ema, mixup=a.mixup, cutmix=a.cutmix)  # fmt: skip
    t1 = time.perf_counter()
    if a.algorithm != "oneshot":  # the same epoch budget spent by a netcarve.algorithms algorithm
        from netcarve.algorithms import run_algorithm

        if a.algorithm == "iterative":
            algo_opts.setdefault("steps", max(a.steps, 2))
        res = run_algorithm(a.algorithm, base, example_input(base, batch=1), options=algo_opts,
                            macs_reduction=a.macs_reduction, round_to=a.round_to, criterion="l1", train=cfg,
                            teacher=teacher, kd=_kd(a.kd, a.hints, a.adapter_init, a.feature_weight, a.kd_temperature, a.kd_alpha), bn_batches=20, reconstruct_batches=a.reconstruct, train_loader=train, test_loader=test,
                            out_dir=work / a.algorithm, resume=True, progress=a.progress)  # fmt: skip
        model = res.model
        rec["prune"] = {"algorithm": a.algorithm, "options": algo_opts, "round_to": a.round_to,
                        "groups": len(res.groups.groups), "ratio": res.ratio}
        if a.algorithm == "iterative":
            steps = [h for h in res.history if "step" in h and "macs" in h]
            rec["prune"].update({
                "steps": algo_opts["steps"],
                "step_macs_reduction": [round(res.macs_before / h["macs"], 3) for h in steps],
                "step_target_macs_reduction": [round(res.macs_before / h["target_macs"], 3)
                                               for h in steps if "target_macs" in h]})  # fmt: skip
        alphas = [h.get("alpha") for h in res.history if isinstance(h, dict)]
        if any(x is not None for x in alphas):
            rec["prune"]["alpha_by_epoch"] = alphas
    else:
        model = netcarve.load(pruned_dir)
        res = fit(model, train, test, cfg, out_dir=work / "finetune", teacher=teacher,
                  kd=_kd(a.kd, a.hints, a.adapter_init, a.feature_weight, a.kd_temperature, a.kd_alpha), resume=True, progress=a.progress)  # fmt: skip
    model.eval()
    rec["finetune_seconds_this_process"] = round(time.perf_counter() - t1, 1)
    rec["history"] = [h if isinstance(h, dict) else h.to_dict() for h in getattr(res, "history", [])
                      if not isinstance(h, dict) or "val_top1" in h]  # fmt: skip
    rec["top1_final"] = evaluate(model, test)["top1"]
    rec["macs"], rec["params"] = _macs(model)
    rec["base_macs"], rec["base_params"] = _macs(base)
    rec["widths"] = _widths(model)
    rec["epochs"], rec["lr"], rec["groups"], rec["target_macs_reduction"] = a.epochs, a.lr, a.groups, a.macs_reduction
    rec["seed"] = a.seed
    rec["kd"] = a.kd
    if (a.kd_temperature, a.kd_alpha) != (4.0, 0.9):
        rec["kd_options"] = {"temperature": a.kd_temperature, "alpha": a.kd_alpha}
    if "feature" in a.kd:
        rec["kd_feature"] = {"hints": a.hints, "adapter_init": a.adapter_init, "weight": a.feature_weight}
    if a.teachers != "resnet56":
        rec["teachers"] = a.teachers
    if a.ema:
        rec["ema_decay"] = a.ema
    if a.mixup or a.cutmix:
        rec["mixing"] = {"mixup": a.mixup, "cutmix": a.cutmix}
    rec["batch_size"], rec["precision"] = a.batch_size, a.precision
    netcarve.save(model, work / "final", metadata={"top1": rec["top1_final"]})
    state.write_text(json.dumps(rec, indent=1))
    _log(f"{a.tool}: final top-1 {rec['top1_final']:.2f} (dense {rec['base_top1']:.2f}), "
         f"MACs {rec['base_macs'] / rec['macs']:.2f}x fewer")  # fmt: skip


def _variants(work, base) -> dict:
    """``dense`` and every variant of ``work``: its ``final`` model, else its ``pruned`` one (a variant pruned
    with --prune-only: the architecture, same shapes)."""
    variants = {"dense": base}
    for d in sorted(Path(work).iterdir()):
        for sub in ("final", "pruned"):
            if (d / sub / "manifest.json").exists():
                variants[d.name] = netcarve.load(d / sub).eval()
                break
    return variants


def cmd_latency(a) -> None:
    base = _baseline(a.data_dir)
    variants = _variants(a.work, base)
    if len(variants) == 1:
        _log(f"no final models in {a.work} (run `train` first)")
    out = {}
    for engine in a.engines:
        if not engine_available(engine):
            _log(f"{engine} not installed; skipped")
            continue
        for batch in a.batches:
            _log(f"latency: {engine}, batch {batch}, {a.threads} threads, {a.processes} processes per model")
            xs = {k: example_input(m, batch=batch) for k, m in variants.items()}
            res = compare_latency(variants, xs, engine=engine, threads=a.threads, processes=a.processes)
            out[f"{engine}/b{batch}"] = {k: {"p50_ms": r.p50_ms, "p90_ms": r.p90_ms} for k, r in res.items()}
            _log("  " + ", ".join(f"{k} {r.p50_ms:.3f} ms" for k, r in res.items()))
    doc = {"threads": a.threads, "processes": a.processes, "results": out, "env": environment(threads=a.threads)}
    path = Path(a.work) / "latency.json"
    path.write_text(json.dumps(doc, indent=1))
    _log(f"wrote {path}")
    if a.out:  # a standalone result: the architectures, their MACs and every speedup against dense
        macs0, params0 = _macs(base)
        arch = {}
        for k, m in variants.items():
            macs, params = _macs(m)
            arch[k] = {"macs": macs, "params": params, "macs_reduction": round(macs0 / macs, 3),
                       "params_reduction": round(params0 / params, 3), "widths": _stage_widths(m)}
        speedup = {key: {k: round(res["dense"]["p50_ms"] / r["p50_ms"], 3) for k, r in res.items()}
                   for key, res in out.items()}  # fmt: skip
        ratio = {key: {k: round(sp[k] / arch[k]["macs_reduction"], 3) for k in sp} for key, sp in speedup.items()}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "benchmark": "structural_resnet56 latency",
            "command": f"python benchmarks/structural_resnet56.py latency --work {a.work} --engines {' '.join(a.engines)} "
                       f"--batches {' '.join(map(str, a.batches))} --threads {a.threads} --processes {a.processes} "
                       f"--out {a.out}",
            "models": arch, "speedup": speedup, "speedup_over_macs_reduction": ratio, **doc}, indent=1))  # fmt: skip
        _log(f"wrote {a.out}")


def _stage_widths(model) -> dict[str, dict]:
    """Per stage, the distinct output widths of its convs and its block count (blocks holding a conv: depth
    pruning leaves removed blocks as identities), e.g. ``{"layer1": {"widths": [8], "blocks": 9}}``."""
    out: dict[str, set[int]] = {}
    for n, w in _widths(model).items():
        if n.startswith("layer"):
            out.setdefault(n.split(".")[0], set()).add(w)
    blocks = {st: sum(any(isinstance(m, torch.nn.Conv2d) for m in b.modules()) for b in getattr(model, st))
              for st in out}  # fmt: skip
    return {st: {"widths": sorted(w), "blocks": blocks[st]} for st, w in out.items()}


def _stage(name: str) -> str:
    """Per-layer rows -> the part of the network they belong to."""
    if "shortcut" in name:
        return "shortcuts"
    for st in ("layer1", "layer2", "layer3"):
        if name == st or name.startswith(st + "."):
            return st
    return "stem" if name in ("conv1", "bn1", "relu") else "head" if name in ("avgpool", "flatten", "linear") else "other"


def cmd_profile(a) -> None:
    """Per-layer latency of dense and every pruned variant (its ``final`` model, else its ``pruned`` one:
    same shapes), per engine and batch, summed per stage: where the MACs reduction turns into speed and
    where it does not."""
    from netcarve.measure import profile_model

    variants = _variants(a.work, _baseline(a.data_dir))
    out = {}
    for engine in a.engines:
        if not engine_available(engine):
            _log(f"{engine} not installed; skipped")
            continue
        for batch in a.batches:
            key = f"{engine}/b{batch}"
            out[key] = {}
            for name, model in variants.items():
                prof = profile_model(model, engine=engine, threads=a.threads, batch=batch)
                stages: dict[str, dict] = {}
                for r in prof["layers"]:
                    st = stages.setdefault(_stage(r["name"]), {"latency_ms": 0.0, "macs": 0})
                    st["latency_ms"] += r["latency_ms"] or 0.0
                    st["macs"] += int(r["macs"] or 0)
                out[key][name] = {"latency_ms": prof["total"]["latency_ms"],
                                  "per_layer_sum_ms": prof["total"]["per_layer_sum_ms"], "stages": stages,
                                  "notes": prof["notes"]}  # fmt: skip
            dense = out[key]["dense"]
            _log(f"profile {key}:")
            for name, rec in out[key].items():
                parts = []
                for st, v in rec["stages"].items():
                    d = dense["stages"].get(st, {})
                    sp = d.get("latency_ms", 0.0) / v["latency_ms"] if v["latency_ms"] else float("nan")
                    mr = d.get("macs", 0) / v["macs"] if v["macs"] else float("nan")
                    parts.append(f"{st} {v['latency_ms']:.3f} ms ({sp:.2f}x speed, {mr:.2f}x MACs)")
                _log(f"  {name}: total {rec['latency_ms']:.3f} ms; " + "; ".join(parts))
    path = Path(a.work) / "profile.json"
    path.write_text(json.dumps({"threads": a.threads, "results": out, "env": environment(threads=a.threads)},
                               indent=1))  # fmt: skip
    _log(f"wrote {path}")


def previous_env_note(row: dict) -> str:
    """Where a carried-over row was trained (the committed results' environment)."""
    prev = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    env = prev.get("env") or {}
    where = ", ".join(str(env[k]) for k in ("cpu_model", "cpu_id") if env.get(k)) or "another machine"
    return f"an earlier run ({where}); latency re-measured in this run on its pruned architecture"


def cmd_report(a) -> None:
    work = Path(a.work)
    lat = json.loads((work / "latency.json").read_text()) if (work / "latency.json").exists() else {}
    rows = {}
    for p in sorted(work.glob("*/state.json")):
        rec = json.loads(p.read_text())
        if "top1_final" in rec:
            rows[p.parent.name] = rec
    # variants trained in an earlier run (another machine) whose work folder here holds only the pruned
    # architecture (--prune-only): accuracy and training fields come from the committed results
    prev_doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous = {r["variant"]: r for r in prev_doc.get("rows", [])}
    carried = {}
    for p in sorted(work.glob("*/state.json")):
        name = p.parent.name
        if name not in rows and name in previous and "top1" in previous[name]:
            carried[name] = previous[name]
    # committed rows with no folder here at all are kept as they were (accuracy and latency of their own run)
    kept = {n: r for n, r in previous.items() if n != "dense" and n not in rows and n not in carried}
    if not rows:
        raise SystemExit(f"nothing to report in {work}")
    any_rec = next(iter(rows.values()))
    dense = {"top1": any_rec["base_top1"], "macs": any_rec["base_macs"], "params": any_rec["base_params"]}
    table = []
    for name in ("dense", *rows, *carried, *kept):
        if name in kept:
            table.append({**kept[name], "from_committed_results": True})
            continue
        if name in carried:
            entry = {k: v for k, v in carried[name].items() if k not in ("latency_ms", "speedup")}
            entry.setdefault("trained_in", previous_env_note(carried[name]))
            entry["latency_ms"], entry["speedup"] = {}, {}
            if not lat:  # no latency run here: the committed measurements
                entry["latency_ms"], entry["speedup"] = carried[name]["latency_ms"], carried[name]["speedup"]
            for key, res in lat.get("results", {}).items():
                if name in res:
                    entry["latency_ms"][key] = res[name]["p50_ms"]
                    entry["speedup"][key] = res["dense"]["p50_ms"] / res[name]["p50_ms"]
            table.append(entry)
            continue
        r = rows.get(name)
        macs = dense["macs"] if r is None else r["macs"]
        params = dense["params"] if r is None else r["params"]
        entry = {"variant": name, "top1": dense["top1"] if r is None else r["top1_final"], "macs": macs,
                 "params": params, "macs_reduction": dense["macs"] / macs, "params_reduction": dense["params"] / params,
                 "latency_ms": {}, "speedup": {}}  # fmt: skip
        if r is not None:
            entry.update({k: r.get(k) for k in ("top1_pruned", "top1_bn_recalibrated", "top1_reconstructed",
                                                "reconstruct", "prune", "widths", "epochs", "history", "finetune_seconds_this_process", "groups", "lr",
                                                "seed", "target_macs_reduction", "batch_size", "precision", "kd", "kd_feature", "kd_options",
                                                "ema_decay", "teachers", "mixing")
                          if k in r})  # fmt: skip
        for key, res in lat.get("results", {}).items():
            if name in res:
                entry["latency_ms"][key] = res[name]["p50_ms"]
                entry["speedup"][key] = res["dense"]["p50_ms"] / res[name]["p50_ms"]
        old = previous.get(name, {})
        if r is not None and old.get("top1") == entry["top1"]:  # the same run: keep its hand-written annotations
            entry.update({k: old[k] for k in ("note", "netcarve_commit") if k in old and k not in entry})
        if name == "dense" and not lat and "dense" in previous:  # no latency run here: the committed one
            entry["latency_ms"], entry["speedup"] = previous["dense"]["latency_ms"], previous["dense"]["speedup"]
        table.append(entry)
    out = {
        "benchmark": "structural_resnet56",
        "command": "python benchmarks/structural_resnet56.py train --tool netcarve --round-to 8 (and every variant's "
                   "own `train` line: its rows' prune / seed / groups fields); ... train --tool torch-pruning; ... "
                   "latency; ... profile; ... report",
        "setup": {"criterion": "l1", "groups": any_rec.get("groups"), "target_macs_reduction":
                  any_rec.get("target_macs_reduction"), "epochs": any_rec.get("epochs"), "lr": any_rec.get("lr"),
                  "recovery": "BN recalibration (20 batches) + logit KD (T=4, alpha=0.9) from the dense model, "
                  "SGD cosine, batch 128, full 50k training set with crop+flip"},
        "latency": {"threads": lat.get("threads"), "processes": lat.get("processes"),
                    "method": "per engine, every model in its own fresh processes (interleaved), min over rounds "
                              "of medians, best process kept"} if lat else prev_doc.get("latency", {}),
        "rows": table,
        "env": lat.get("env") or prev_doc.get("env") or environment(),
    }  # fmt: skip
    prof_path = work / "profile.json"
    if "profile" in prev_doc:
        out["profile"] = prev_doc["profile"]
    if prof_path.exists():  # per-stage latency from `profile` (dense and every variant, one run)
        prof = json.loads(prof_path.read_text())
        out["profile"] = {"threads": prof["threads"], "env": prof["env"], "command": "... profile",
                          "results": {k: {n: {"latency_ms": v["latency_ms"], "stages": v["stages"]}
                                          for n, v in res.items()} for k, res in prof["results"].items()}}  # fmt: skip
    out["torch_pruning_version"] = _tp_version()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    keys = sorted({k for e in table for k in e["latency_ms"]})
    print(f"{'variant':<14} {'top-1':>6} {'MACs':>8} {'xMACs':>6} {'params':>8} "
          + " ".join(f"{k:>17}" for k in keys))  # fmt: skip
    for e in table:
        lat_s = " ".join(f"{e['latency_ms'][k]:>8.3f} ({e['speedup'][k]:.2f}x)" if k in e["latency_ms"] else " " * 17
                         for k in keys)  # fmt: skip
        print(f"{e['variant']:<14} {e['top1']:>6.2f} {e['macs'] / 1e6:>7.1f}M {e['macs_reduction']:>5.2f}x "
              f"{e['params'] / 1e3:>7.1f}k {lat_s}")  # fmt: skip
    _log(f"wrote {RESULTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "latency", "profile", "report"):
        s = sub.add_parser(name)
        s.add_argument("--work", default=os.path.expanduser("~/.cache/netcarve/bench/structural_resnet56"))
        s.add_argument("--data-dir", default=None)
        if name == "train":
            s.add_argument("--tool", choices=TOOLS, required=True)
            s.add_argument("--macs-reduction", type=float, default=2.15)
            s.add_argument("--groups", choices=["inner", "all", "depth", "depth+all"], default="inner",
                           help="inner: block-inner channels; all: also the residual channels; depth: remove "
                                "whole residual blocks (netcarve only); depth+all: blocks for sqrt(target), "
                                "then all channels")
            s.add_argument("--criterion", default="l1", choices=list_criteria(),
                           help="netcarve channel criterion (default l1, the one Torch-Pruning gets; taylor: "
                                "gradients of 8 training batches); one-shot pruning only")
            s.add_argument("--global-ranking", action="store_true",
                           help="netcarve channel groups: rank channels across groups (per-group widths differ)")
            s.add_argument("--layer-ratio", action="append", default=[], metavar="PATTERN=RATIO",
                           help="netcarve, --groups all, one-shot: the fraction of channels removed from the groups "
                                "produced by matching layers (netcarve prune --layer-ratio; the last matching "
                                "pattern wins, unnamed groups stay whole); replaces the MACs target; repeatable")
            s.add_argument("--prune-only", action="store_true",
                           help="prune (+ BN recalibration) and stop: the architecture for latency / profile")
            s.add_argument("--round-to", type=int, default=1)
            s.add_argument("--name", default=None, help="variant name (default: TOOL, or TOOL-rN with --round-to N)")
            s.add_argument("--reconstruct", type=int, default=0, metavar="BATCHES",
                           help="netcarve channel pruning (any --algorithm): refit every conv / linear by least squares against the dense "
                                "model on BATCHES training batches (netcarve.compact.reconstruct) instead of BN "
                                "recalibration")
            s.add_argument("--epochs", type=int, default=6)
            s.add_argument("--lr", type=float, default=0.01)
            s.add_argument("--steps", type=int, default=1,
                           help="> 1: iterative pruning, the --epochs budget split over this many prune + KD "
                                "fine-tune steps on a geometric MACs schedule (netcarve, --groups all)")
            s.add_argument("--algorithm", choices=["oneshot", "iterative", "sfp", "srfp", "asrfp", "increg"],
                           default="oneshot",
                           help="oneshot: prune, BN recalibration, KD fine-tune; the others spend the same --epochs "
                                "budget as netcarve.algorithms does (netcarve, --groups all)")
            s.add_argument("--algo-option", action="append", default=[], metavar="KEY=VALUE",
                           help="an option of --algorithm (e.g. alpha0=0.7, decay_fraction=0.6); repeatable")
            s.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch (and BN recalibration)")
            s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                           help="bf16: autocast forward/backward (fp32 weights, loss and evaluation)")
            s.add_argument("--channels-last", action="store_true")
            s.add_argument("--kd", choices=["logit", "logit_mse", "logit+feature", "logit_mse+feature"],
                           default="logit",
                           help="distillation losses (logit_mse: squared error on the logits; feature: FitNets "
                                "hints, see --hints)")
            s.add_argument("--kd-temperature", type=float, default=4.0, help="logit KD temperature")
            s.add_argument("--kd-alpha", type=float, default=0.9,
                           help="logit KD weight: (1 - alpha) * CE + alpha * KD")
            s.add_argument("--hints", choices=["stages", "blocks"], default="stages",
                           help="feature KD hint layers: the three stage outputs or all 27 residual block outputs")
            s.add_argument("--adapter-init", choices=["identity", "lstsq"], default="identity",
                           help="feature KD adapters: PyTorch init (identity at equal widths) or fitted by least "
                                "squares on the first batch (KDConfig.adapter_init)")
            s.add_argument("--feature-weight", type=float, default=1.0, help="feature KD loss weight")
            s.add_argument("--seed", type=int, default=0, help="data order + fine-tuning seed (pruning is deterministic)")
            s.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                           help="also average the fine-tuned weights (TrainConfig.ema_decay, e.g. 0.998); the "
                                "epochs' val_top1 and the final model are the average's, val_top1_live the "
                                "live weights'")
            s.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                           help="mixup on every fine-tuning batch (TrainConfig.mixup; the teacher sees the mixed images)")
            s.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                           help="CutMix on every fine-tuning batch (TrainConfig.cutmix; with --mixup: one of them per batch)")
            s.add_argument("--teachers", default="resnet56", metavar="NAMES",
                           help="comma-separated pretrained zoo models distilled from (default: the unpruned "
                                "resnet56); several: netcarve.train.TeacherEnsemble, the mean of their logits "
                                "(e.g. resnet56,resnet44,resnet20)")
            s.add_argument("--threads", type=int, default=1)
            s.add_argument("--progress", action="store_true")
        if name in ("latency", "profile"):
            s.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino", "torch"][: 3 if name == "latency" else 2])
            s.add_argument("--batches", nargs="+", type=int, default=[1, 64])
            s.add_argument("--threads", type=int, default=2)
            if name == "latency":
                s.add_argument("--processes", type=int, default=3)
                s.add_argument("--out", default=None,
                               help="also write a standalone result (architectures, MACs, speedups, speedup / MACs "
                                    "reduction) here, e.g. benchmarks/results/structural_resnet56-latency-avx2.json")
    a = p.parse_args()
    {"train": cmd_train, "latency": cmd_latency, "profile": cmd_profile, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
