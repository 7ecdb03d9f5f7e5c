"""``netcarve sparsify`` and ``netcarve run RECIPE.yaml``: fine-grained sparsity of a model or checkpoint
(scheme per layer or layer type, algorithm, schedule, distillation, fine-tune budget) into a run directory.

A :class:`SparsifyRecipe` declares the whole pipeline and round-trips through YAML/JSON; the CLI flags of
``netcarve sparsify`` build one, ``netcarve run`` reads one. The run directory holds ``model.safetensors``
(dense weights with zeros under the model's own state_dict keys) + ``manifest.json`` (its metadata carry
the per-layer sparsity, the resolved plan and the algorithm), ``report.json`` / ``report.md`` and
``recipe.yaml`` (the recipe as run, with a data-derived pattern library written out, so it reproduces).
Training checkpoints go to ``<out>/<algorithm>/<phase>/`` and ``--resume`` continues them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..errors import ConfigError
from ..report import build_report, write_report
from ..serialize import save
from ..utils import atomic_write
from .common import example_batch, loaders_for, measure_stats, model_info, resolve_model
from .compress import log as _log

RECIPE_FILE = "recipe.yaml"


@dataclass
class FinetuneSpec:
    epochs: int = 0
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    optimizer: str = "sgd"  # or "adamw" (recurrent models)
    grad_clip: float | None = None
    precision: str = "fp32"  # or "bf16" (autocast; ~2x faster on CPUs with native bf16)
    channels_last: bool = False
    ema_decay: float = 0.0  # TrainConfig.ema_decay: 0 = off
    mixup: float = 0.0  # TrainConfig.mixup / cutmix: 0 = off
    cutmix: float = 0.0

    def train_config(self, seed: int = 0):
        """The :class:`~netcarve.train.TrainConfig` of this budget (its validation names a bad value)."""
        from ..train import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
                           momentum=self.momentum, weight_decay=self.weight_decay, schedule=self.schedule,
                           grad_clip=self.grad_clip, precision=self.precision,
                           channels_last=self.channels_last, ema_decay=self.ema_decay, mixup=self.mixup,
                           cutmix=self.cutmix, seed=seed)


@dataclass
class SparsifyRecipe:
    """A whole sparsification pipeline (the YAML recipe of ``netcarve run``)."""

    model: str
    out: str
    plan: dict
    weights: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    algorithm: str = "oneshot"
    algorithm_options: dict = field(default_factory=dict)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    distill: bool | dict = False
    bn_batches: int = 0
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    latency: dict | None = None  # {"engine": "onnxruntime", "threads": 2, "batch": 1}: time dense vs sparse

    FIELDS = ("model", "out", "plan", "weights", "dataset", "data_dir", "algorithm", "algorithm_options",
              "finetune", "distill", "bn_batches", "seed", "train_subset", "test_subset", "latency")

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> SparsifyRecipe:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a recipe must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(cls.FIELDS)}")
        for k in ("model", "out", "plan"):
            if d.get(k) in (None, ""):
                raise ConfigError(f"{where}: missing required field {k!r}")
        kw = dict(d)
        ft = kw.get("finetune") or {}
        if not isinstance(ft, dict):
            raise ConfigError(f"{where}: 'finetune' must be a mapping (epochs, lr, batch_size, ...)")
        bad = sorted(set(ft) - set(FinetuneSpec.__dataclass_fields__))
        if bad:
            raise ConfigError(f"{where}: unknown finetune field(s) {', '.join(bad)}; known: "
                              + ", ".join(FinetuneSpec.__dataclass_fields__))
        kw["finetune"] = FinetuneSpec(**ft)
        r = cls(**kw)
        r.validate(where)
        return r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["finetune"] = asdict(self.finetune)
        return d

    def validate(self, where: str = "recipe") -> SparsifyRecipe:
        from ..sparsity import SparsityPlan, get_sparsifier

        try:
            SparsityPlan.from_dict(_placeholder_libraries(self.plan))
        except ConfigError as e:
            raise ConfigError(f"{where}: plan: {e}") from None
        get_sparsifier(self.algorithm)(**(self.algorithm_options or {}))
        ft = self.finetune
        if int(ft.epochs) < 0 or not (isinstance(ft.lr, (int, float)) and ft.lr > 0) or int(ft.batch_size) < 1:
            raise ConfigError(f"{where}: finetune needs epochs >= 0, lr > 0, batch_size >= 1")
        if ft.epochs:
            ft.train_config()
        if self.distill and not ft.epochs:
            raise ConfigError(f"{where}: distill needs finetune.epochs > 0")
        if int(self.bn_batches) < 0:
            raise ConfigError(f"{where}: bn_batches must be >= 0")
        if self.latency is not None and not isinstance(self.latency, dict):
            raise ConfigError(f"{where}: latency must be a mapping like {{engine: onnxruntime, threads: 2, batch: 1}}")
        return self


def _placeholder_libraries(plan: Any) -> Any:
    """``plan`` with every ``library_size`` (a library extracted from the model at run time) replaced by a
    fixed library of that size, so the rest of the plan can be validated before the model is loaded."""
    from ..sparsity.schemes import default_library

    if not isinstance(plan, dict):
        return plan
    plan = copy.deepcopy(plan)
    for r in plan.get("rules") or []:
        opts = r.get("options") if isinstance(r, dict) else None
        if isinstance(opts, dict) and "library_size" in opts and "library" not in opts:
            size = opts.pop("library_size")
            if not isinstance(size, int) or not 1 <= size <= 56:
                raise ConfigError(f"pattern library_size must be an integer in [1, 56], got {size!r}")
            opts["library"] = default_library(size)
    return plan


def _read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML (or JSON) file ``path``; ConfigError naming ``what`` when missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None


def load_recipe(path: str | Path) -> SparsifyRecipe:
    p = Path(path)
    d = _read_yaml(p, "recipe")
    if isinstance(d, dict) and "sparsify" in d and isinstance(d["sparsify"], dict):
        d = {**{k: v for k, v in d.items() if k != "sparsify"}, **d["sparsify"]}
    return SparsifyRecipe.from_dict(d, where=f"recipe {p}")


def save_recipe(recipe: SparsifyRecipe, path: str | Path) -> None:
    with atomic_write(Path(path), "w") as f:
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)


# ---------------------------------------------------------------------------------------------- plan
def materialize_plan(plan: dict, model: nn.Module) -> dict:
    """The plan with data-derived options written out: a ``pattern`` rule with ``library_size`` (and no
    ``library``) gets the library extracted from ``model``'s 3x3 convs (card A1)."""
    from ..sparsity.schemes import extract_pattern_library

    plan = copy.deepcopy(plan)
    for r in plan.get("rules", []):
        opts = r.get("options") or {}
        if r.get("scheme") == "pattern" and "library" not in opts and "library_size" in opts:
            size = int(opts.pop("library_size"))
            opts["library"] = extract_pattern_library(model, size=size)
            r["options"] = opts
    return plan


def nonzero_macs(model: nn.Module, masks: dict[str, torch.Tensor], dense_macs: dict[str, int]) -> int:
    """MACs that multiply a non-zero weight: each masked weight's share of its layer's MACs scales with its
    density (exact for conv/linear; by weight-count share for recurrent and attention layers)."""
    total = sum(dense_macs.values())
    by_module: dict[str, list[str]] = {}
    for name in masks:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    saved = 0.0
    for path, names in by_module.items():
        mod = model.get_submodule(path) if path else model
        weights = {n: p for n, p in mod.named_parameters(recurse=False) if n.startswith("weight") or n.endswith("_weight")}
        wsum = sum(p.numel() for p in weights.values()) or 1
        macs = dense_macs.get(path, 0)
        for full in names:
            m = masks[full]
            share = m.numel() / wsum
            saved += macs * share * (1.0 - float(m.float().mean()))
    return int(round(total - saved))


# ----------------------------------------------------------------------------------------------- run
def run_recipe(recipe: SparsifyRecipe, *, command: str | None = None, resume: bool = False, progress: bool = True,
               threads: int | None = None, tag: str = "netcarve sparsify") -> dict:
    """Run ``recipe`` and write its run directory; returns the report dict."""
    from ..measure import count_model, environment
    from ..sparsity import SparsifyJob, SparsityPlan, get_sparsifier
    from ..train import KDConfig, evaluate

    t0 = time.perf_counter()
    recipe.validate()
    base = resolve_model(recipe.model, recipe.weights, recipe.data_dir)
    info = model_info(base)
    ds = recipe.dataset or info.dataset
    ft = recipe.finetune
    subset = None
    if recipe.train_subset or recipe.test_subset:
        subset = (recipe.train_subset, recipe.test_subset)
    train, test = loaders_for(base, ds, ft.batch_size, data_dir=recipe.data_dir, augment=True, seed=recipe.seed,
                              subset=subset)
    plan_dict = materialize_plan(recipe.plan, base)
    plan = SparsityPlan.from_dict(plan_dict)
    ran = copy.deepcopy(recipe)
    ran.plan = plan_dict
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(ran, out / RECIPE_FILE)

    base_acc = evaluate(base, test)
    cost = count_model(base, example_batch(base, 1))
    layer_macs = {r.name: int(r.macs) for r in cost.layers}
    b_stats = measure_stats(base, "baseline", accuracy=base_acc)
    kd = None
    if isinstance(recipe.distill, dict):
        kd = KDConfig.from_dict(recipe.distill)
    train_cfg = ft.train_config(recipe.seed) if ft.epochs else None
    algo = get_sparsifier(recipe.algorithm)(**recipe.algorithm_options)
    job = SparsifyJob(model=base, plan=plan, train_loader=train, test_loader=test, train=train_cfg,
                      distill=bool(recipe.distill), kd=kd, bn_batches=recipe.bn_batches,
                      out_dir=out / recipe.algorithm, resume=resume, progress=progress)
    resolved = plan.resolve(base)
    schemes = sorted({f"{t.scheme.name}" for t in resolved.targets})
    _log(f"{recipe.algorithm} to {', '.join(schemes)} on {len(resolved.targets)} weights "
         f"({len(resolved.skipped)} left dense"
         + (f"; levels by {plan.allocation} allocation" if plan.allocation != "uniform" else "")
         + f"); budget {ft.epochs} epoch(s)"
         + (f" with {kd.kind if kd is not None else 'logit'} KD" if recipe.distill else ""), tag)
    res = algo.run(job)
    acc = evaluate(res.model, test)
    _log(f"{res.describe().splitlines()[0]}; top-1 {base_acc['top1']:.2f}% -> {acc['top1']:.2f}%", tag)
    c_stats = measure_stats(res.model, "sparse", accuracy=acc)
    nz_macs = nonzero_macs(res.model, res.masks, layer_macs)
    tot = res.stats["total"]
    dense_params = sum(p.numel() for p in base.parameters())
    nz_params = dense_params - (tot["numel"] - tot["nonzero"])
    c_stats.notes.append(f"{nz_params:,} non-zero parameters ({dense_params / max(1, nz_params):.2f}x fewer); "
                         f"{nz_macs / 1e6:.2f}M non-zero MACs ({cost.total_macs / max(1, nz_macs):.2f}x fewer)")
    points = [b_stats, c_stats]
    measurement: dict[str, Any] = {"engine": None, "threads": threads, "batch": None,
                                   "method": "not timed (dense engines do not skip zeros; see netcarve bench)"}
    if recipe.latency:
        from ..measure import compare_latency

        lat_cfg = {"engine": "onnxruntime", "threads": 2, "batch": 1, "processes": 3, **recipe.latency}
        variants = {"baseline": base, "sparse": res.model}
        lat = compare_latency(variants, {k: example_batch(m, lat_cfg["batch"]) for k, m in variants.items()},
                              engine=lat_cfg["engine"], threads=lat_cfg["threads"], processes=lat_cfg["processes"])
        for s, k in zip(points, variants):
            s.latency_ms = {"p50": lat[k].p50_ms, "p90": lat[k].p90_ms}
        measurement = {"engine": lat_cfg["engine"], "threads": lat_cfg["threads"], "batch": lat_cfg["batch"],
                       "method": f"dense engine on the dense-with-zeros model, {lat_cfg['processes']} fresh processes"}
    layers = {t.name: {"scheme": t.scheme.name, "options": t.scheme.options(), "level": t.level,
                       **res.stats[t.name]} for t in res.targets}
    sparsity = {"algorithm": res.algorithm, "options": res.options, "total": tot, "layers": layers,
                "skipped": res.skipped, "dense_params": dense_params, "nonzero_params": nz_params,
                "dense_macs": int(cost.total_macs), "nonzero_macs": nz_macs,
                "compression": dense_params / max(1, nz_params), "events": _jsonable(res.events)}
    rep = build_report(baseline=b_stats, compressed=c_stats, points=points, measurement=measurement,
                       env=environment(threads=threads or torch.get_num_threads()),
                       task={"model": info.name, "source": recipe.model, "dataset": ds,
                             "method": f"{res.algorithm} sparsity ({', '.join(schemes)}), {ft.epochs} epoch(s)"
                                       + (" with KD" if recipe.distill else ""),
                             "sparsity": sparsity, "seconds": None},
                       command=command)
    save(res.model, out, metadata={"accuracy": acc, "report": "report.json", "recipe": RECIPE_FILE,
                                   "sparsity": {k: v for k, v in sparsity.items() if k != "events"},
                                   "plan": plan_dict})
    rep["task"]["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(rep, out)
    _log(f"done in {rep['task']['seconds']:.0f} s; run directory {out}", tag)
    return rep


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() < 64 else f"tensor{tuple(x.shape)}"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def format_sparsify(rep: dict) -> str:
    s = rep["task"]["sparsity"]
    b, c = rep["baseline"], rep["compressed"]
    lines = [f"{rep['task']['model']} on {rep['task']['dataset']}: {rep['task']['method']}",
             f"  top-1      {b['top1']:.2f}% -> {c['top1']:.2f}% ({c['top1'] - b['top1']:+.2f} pp)",
             f"  weights    {s['dense_params']:,} -> {s['nonzero_params']:,} non-zero ({s['compression']:.2f}x fewer; "
             f"sparsity {s['total']['sparsity']:.3f} over {len(s['layers'])} sparsified weights)",
             f"  MACs       {s['dense_macs'] / 1e6:.2f}M -> {s['nonzero_macs'] / 1e6:.2f}M multiply a non-zero weight"]
    if (b.get("latency_ms") or {}).get("p50"):
        m = rep["measurement"]
        lines.append(f"  latency    {b['latency_ms']['p50']:.3f} -> {c['latency_ms']['p50']:.3f} ms p50 "
                     f"({m['engine']}, dense kernels, batch {m['batch']}, {m['threads']} threads)")
    if s["skipped"]:
        lines.append(f"  dense      {len(s['skipped'])} weight(s) left dense: "
                     + "; ".join(f"{k} ({v})" for k, v in list(s["skipped"].items())[:4])
                     + (" ..." if len(s["skipped"]) > 4 else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def _parse_block(s: str) -> list[int]:
    from ..sparsity.schemes import _parse_block as parse

    try:
        return list(parse(s))
    except ConfigError:
        raise ConfigError(f"--block must look like 4x16 (rows x columns), got {s!r}") from None


def plan_from_args(a) -> dict:
    """The one-rule plan of ``netcarve sparsify``'s scheme flags (or ``--plan FILE``)."""
    if getattr(a, "plan", None):
        d = _read_yaml(a.plan, "--plan")
        d = d.get("plan", d) if isinstance(d, dict) else d
        return _with_allocation(d, a)
    s = a.scheme
    opts: dict[str, Any] = {}
    sparsity = a.sparsity
    used = {"--sparsity": a.sparsity is not None, "--n": a.n is not None, "--m": a.m is not None,
            "--block": a.block is not None, "--patterns": a.patterns is not None,
            "--connectivity": a.connectivity is not None, "--length": a.length is not None,
            "--keep": a.keep is not None, "--groups": a.groups is not None,
            "--balanced": bool(getattr(a, "balanced", False)),
            "--block-rows": getattr(a, "block_rows", None) is not None,
            "--row-sparsity": getattr(a, "row_sparsity", None) is not None}
    takes = {"unstructured": {"--sparsity"}, "row": {"--sparsity"}, "column": {"--sparsity"},
             "rowcol": {"--sparsity"}, "connectivity": {"--sparsity"}, "nm": {"--n", "--m"},
             "block": {"--sparsity", "--block", "--balanced"}, "pattern": {"--patterns", "--connectivity"},
             "pcnn": {"--length", "--keep", "--patterns"}, "channel_groups": {"--sparsity", "--groups"},
             "bsp": {"--sparsity", "--block-rows", "--row-sparsity"}}
    allowed = takes.get(s)
    if allowed is not None:
        extra = sorted(f for f, on in used.items() if on and f not in allowed)
        if extra:
            raise ConfigError(f"--scheme {s} does not take {', '.join(extra)} (it takes {', '.join(sorted(allowed))})")
    if s == "nm":
        if a.n is None or a.m is None:
            raise ConfigError("--scheme nm needs --n and --m (e.g. --n 2 --m 4)")
        opts = {"n": a.n, "m": a.m}
    elif s == "block":
        opts = {"block": _parse_block(a.block or "4x16"), **({"balanced": True} if a.balanced else {})}
    elif s == "pattern":
        opts = {"library_size": a.patterns or 8}
        if a.connectivity is not None:
            if not a.connectivity >= 1.0:
                raise ConfigError(f"--connectivity is the kernel reduction factor (>= 1, e.g. 3.6 keeps 1/3.6 of "
                                  f"the kernels), got {a.connectivity}")
            sparsity = 1.0 - 1.0 / a.connectivity
    elif s == "pcnn":
        if a.keep is None:
            raise ConfigError("--scheme pcnn needs --keep N (non-zeros per length-L vector)")
        opts = {"length": a.length or 9, "keep": a.keep, **({"patterns": a.patterns} if a.patterns else {})}
    elif s == "bsp":
        opts = {k: v for k, v in (("block_rows", getattr(a, "block_rows", None)),
                                  ("row_sparsity", getattr(a, "row_sparsity", None))) if v is not None}
    elif s == "channel_groups":
        if a.groups is None:
            raise ConfigError("--scheme channel_groups needs --groups G")
        opts = {"groups": a.groups}
    rule: dict[str, Any] = {"scheme": s, "options": opts}
    if sparsity is not None:
        rule["sparsity"] = sparsity
    if a.layers:
        rule["layers"] = list(a.layers)
    if a.types:
        rule["types"] = list(a.types)
    return _with_allocation({"rules": [rule], "exclude": list(a.exclude or []),
                             "skip_first_last": not a.include_first_last}, a)


def _with_allocation(plan: Any, a) -> Any:
    """``plan`` with ``--allocation`` / ``--min-density`` (when given) written into it."""
    if not isinstance(plan, dict):
        return plan
    plan = dict(plan)
    if getattr(a, "allocation", None) is not None:
        plan["allocation"] = a.allocation
    if getattr(a, "min_density", None) is not None:
        plan["min_density"] = a.min_density
    return plan


def _distill_arg(a) -> bool | dict:
    """``--distill [KIND]`` as the recipe's ``distill``: a flag (logit KD), or a KDConfig dict
    (:meth:`KDConfig.recovery <netcarve.train.KDConfig.recovery>`)."""
    if a.distill and a.distill != "logit":
        from ..train import KDConfig

        return KDConfig.recovery(a.distill, a.feature_weight).to_dict()
    return bool(a.distill)


def recipe_from_args(a) -> SparsifyRecipe:
    opts = {}
    for kv in a.option or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError(f"--option takes KEY=VALUE, got {kv!r}")
        opts[k.strip()] = yaml.safe_load(v)
    latency = {"engine": a.engine, "threads": a.threads, "batch": a.batch} if a.latency else None
    return SparsifyRecipe.from_dict({
        "model": a.model, "out": a.out, "plan": plan_from_args(a), "weights": a.weights, "dataset": a.dataset,
        "data_dir": a.data_dir, "algorithm": a.algorithm, "algorithm_options": opts,
        "finetune": {"epochs": a.finetune_epochs, "lr": a.lr, "batch_size": a.batch_size, "optimizer": a.optimizer,
                     "grad_clip": a.grad_clip, "precision": a.precision, "channels_last": a.channels_last,
                     "ema_decay": a.ema, "mixup": a.mixup, "cutmix": a.cutmix},
        "distill": _distill_arg(a), "bn_batches": a.bn_batches, "seed": a.seed,
        "train_subset": a.train_subset, "test_subset": a.test_subset, "latency": latency,
    }, where="netcarve sparsify")


def sparsify_cli(a, command: str | None = None) -> dict:
    return run_recipe(recipe_from_args(a), command=command, resume=a.resume, progress=not a.no_progress and not a.json,
                      threads=a.threads)


def run_cli(a, command: str | None = None) -> dict:
    recipe = load_recipe(a.recipe)
    if a.out:
        recipe.out = a.out
    return run_recipe(recipe, command=command, resume=a.resume, progress=not a.no_progress and not a.json,
                      threads=a.threads, tag="netcarve run")


__all__ = ["SparsifyRecipe", "load_recipe", "run_recipe", "save_recipe", "format_sparsify"]
