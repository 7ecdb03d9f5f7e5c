"""``netcarve prune``: structural channel pruning of a model or checkpoint, with BN recalibration, optional
distillation fine-tune, measured latency and a report, into a run directory."""

from __future__ import annotations

import time

from ..errors import ConfigError
from ..train import evaluate
from .common import default_engine, loaders_for, model_info, resolve_model
from .compress import CompressSpec, compress_and_report


def prune_cli(a, command: str | None = None) -> dict:
    t0 = time.perf_counter()
    if a.scheme != "channel":
        raise ConfigError(f"--scheme {a.scheme!r} is not available yet; only 'channel' (structural) is")
    base = resolve_model(a.model, a.weights, a.data_dir)
    info = model_info(base)
    ds = a.dataset or info.dataset
    train, test = loaders_for(base, ds, a.batch_size, data_dir=a.data_dir, augment=True, seed=a.seed,
                              subset=(None, a.test_subset) if a.test_subset else None)
    ft_train = None
    if a.train_subset:
        ft_train, _ = loaders_for(base, ds, a.batch_size, data_dir=a.data_dir, augment=True, seed=a.seed,
                                  subset=(a.train_subset, a.test_subset))
    spec = CompressSpec(
        criterion=a.criterion, macs_reduction=a.macs_reduction, ratio=a.ratio, round_to=a.round_to,
        protected=list(a.protect), global_ranking=a.global_ranking,
        bn_recalibration_batches=0 if a.no_bn_recalibration else a.bn_batches,
        finetune_epochs=a.finetune_epochs, distill=a.distill, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
        engine=a.engine or default_engine(), threads=a.threads, latency_batch=a.batch,
        latency_processes=a.latency_processes, progress=not a.no_progress and not a.json, resume=a.resume,
    )
    if a.distill and not a.finetune_epochs:
        raise ConfigError("--distill needs --finetune-epochs N (N > 0)")
    spec.validate()
    base_acc = evaluate(base, test)
    return compress_and_report(base, base_acc, spec, train_loader=train, test_loader=test, ft_train_loader=ft_train,
                               out=a.out, task={"model": info.name, "source": a.model, "dataset": ds},
                               command=command, tag="netcarve prune", t0=t0)
