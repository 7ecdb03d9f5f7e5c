"""``netcarve demo``: the main job end to end on real data.

train (or load from cache) -> measure -> compress (best method available: structural channel pruning to a
MACs target, BN recalibration) -> fine-tune with knowledge distillation from the unpruned model -> measure
-> report (table, report.json/md, accuracy-vs-latency plot) in a run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._version import __version__
from ..errors import ConfigError
from ..serialize import is_checkpoint, load, save
from ..utils import seed_everything
from .common import default_engine
from .compress import CompressSpec, compress_and_report, log


@dataclass
class DemoConfig:
    dataset: str = "digits"  # "digits" (built in) or "cifar10" (needs the data dir)
    model: str | None = None  # default: lenet for digits, resnet20 (pretrained) for cifar10
    data_dir: str | None = None
    out: str = "runs/demo"
    engine: str | None = None  # default: onnxruntime when installed, else torch
    threads: int = 2
    batch: int | None = None  # latency batch; default 64 for digits (batch 1 of an 8x8 CNN times only
    # per-call overhead, ~30-60 us, and the ratio of two such numbers is noise), 1 for cifar10
    macs_reduction: float = 2.0
    criterion: str = "l1"
    round_to: int = 8
    train_epochs: int = 30  # baseline training when no pretrained weights exist (digits)
    finetune_epochs: int | None = None  # default: 20 for digits, 2 for cifar10
    train_subset: int | None = None  # fine-tune on this many training images (default: all)
    test_subset: int | None = None  # evaluate on a class-balanced subset of the test split (default: all)
    seed: int = 0
    latency_processes: int = 3  # fresh processes per model for latency (best one kept)
    resume: bool = False  # continue an interrupted fine-tune in OUT/finetune (the baseline comes from its cache)
    progress: bool = True
    cache_dir: str | None = None


def _log(msg: str) -> None:
    log(msg, "netcarve demo")


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("NETCARVE_CACHE") or Path.home() / ".cache" / "netcarve")


def _baseline(cfg: DemoConfig, model_name: str, train_loader, test_loader):
    """Pretrained weights when the model has them and data is real CIFAR-10; else train (cached)."""
    from ..models import create_model, get_model_info
    from ..train import TrainConfig, evaluate, fit

    info = get_model_info(model_name)
    if cfg.dataset == "cifar10" and info.pretrained:
        _log(f"baseline: {model_name} with pretrained weights ({next(iter(info.pretrained.values()))})")
        model = create_model(model_name, pretrained=True, data_dir=cfg.data_dir)
        return model, evaluate(model, test_loader), "pretrained"
    tcfg = TrainConfig(epochs=cfg.train_epochs, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9,
                       weight_decay=5e-4, schedule="cosine", seed=cfg.seed)
    key = hashlib.sha256(
        json.dumps([__version__, model_name, cfg.dataset, tcfg.to_dict()], sort_keys=True).encode()
    ).hexdigest()[:12]
    cdir = cache_root(cfg.cache_dir) / "demo" / f"{model_name}-{cfg.dataset}-{key}"
    if is_checkpoint(cdir):
        _log(f"baseline: loaded from cache {cdir}")
        model = load(cdir)
        return model, evaluate(model, test_loader), "cache"
    _log(f"baseline: training {model_name} on {cfg.dataset} for {tcfg.epochs} epochs (cached afterwards in {cdir})")
    seed_everything(cfg.seed)
    model = create_model(model_name)
    fit(model, train_loader, test_loader, tcfg, out_dir=cdir / "train", progress=cfg.progress)
    acc = evaluate(model, test_loader)
    save(model, cdir, metadata={"accuracy": acc, "train": tcfg.to_dict()})
    return model, acc, "trained"


def run_demo(cfg: DemoConfig, command: str | None = None) -> dict:
    from ..data import make_loaders

    t0 = time.perf_counter()
    if cfg.dataset not in ("digits", "cifar10"):
        raise ConfigError(f"demo --dataset must be 'digits' or 'cifar10', not {cfg.dataset!r}")
    model_name = cfg.model or ("lenet" if cfg.dataset == "digits" else "resnet20")
    engine = cfg.engine or default_engine()
    batch = cfg.batch or (64 if cfg.dataset == "digits" else 1)
    ft_epochs = cfg.finetune_epochs if cfg.finetune_epochs is not None else (20 if cfg.dataset == "digits" else 2)
    subset = cfg.train_subset
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    from ..models import get_model_info

    info = get_model_info(model_name)
    bs = 64 if cfg.dataset == "digits" else 128
    train_loader, test_loader = make_loaders(
        cfg.dataset, info.preprocess, bs, data_dir=cfg.data_dir, augment=True, seed=cfg.seed,
        subset=(None, cfg.test_subset),
    )
    if tuple(test_loader.dataset.input_shape) != tuple(info.input_shape):
        raise ConfigError(
            f"demo --model {model_name} takes samples of shape {tuple(info.input_shape)}, but --dataset "
            f"{cfg.dataset} has {tuple(test_loader.dataset.input_shape)}; pick a model made for {cfg.dataset}"
        )
    ft_train_loader = train_loader
    if subset:
        ft_train_loader, _ = make_loaders(
            cfg.dataset, info.preprocess, bs, data_dir=cfg.data_dir, augment=True, seed=cfg.seed,
            subset=(subset, cfg.test_subset),
        )

    base, base_acc, source = _baseline(cfg, model_name, train_loader, test_loader)
    _log(f"baseline top-1 {base_acc['top1']:.2f}% ({source})")
    spec = CompressSpec(
        criterion=cfg.criterion, macs_reduction=cfg.macs_reduction, round_to=cfg.round_to,
        finetune_epochs=ft_epochs, distill=True, lr=0.01 if cfg.dataset == "digits" else 0.005, batch_size=bs,
        seed=cfg.seed, engine=engine, threads=cfg.threads, latency_batch=batch,
        latency_processes=cfg.latency_processes, progress=cfg.progress, resume=cfg.resume,
    )
    return compress_and_report(
        base, base_acc, spec, train_loader=train_loader, test_loader=test_loader, ft_train_loader=ft_train_loader,
        out=cfg.out, task={"model": model_name, "dataset": cfg.dataset, "baseline_source": source},
        command=command, tag="netcarve demo", t0=t0,
    )

