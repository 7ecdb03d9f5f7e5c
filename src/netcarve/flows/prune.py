"""``netcarve prune``: structural channel pruning of a model or checkpoint, with BN recalibration, optional
distillation fine-tune, measured latency and a report, into a run directory."""

from __future__ import annotations

import time

from ..errors import ConfigError
from ..train import evaluate
from .common import default_engine, loaders_for, model_info, resolve_model
from .compress import CompressSpec, compress_and_report

# CLI option -> (algorithm option, algorithms that take it)
_ALGORITHM_FLAGS = {
    "steps": ("--steps", "steps", ("iterative",)),
    "prune_interval": ("--prune-interval", "interval", ("sfp", "srfp", "asrfp", "increg")),
    "increg_mode": ("--increg-mode", "mode", ("increg",)),
    "increg_target_reg": ("--increg-target-reg", "target_reg", ("increg",)),
    "increg_increment": ("--increg-increment", "increment", ("increg",)),
}


def algorithm_options(a) -> tuple[str, dict]:
    """``(--algorithm, its options)`` from the parsed arguments; ConfigError for an option the chosen
    algorithm does not take."""
    from ..algorithms import list_algorithms

    name = getattr(a, "algorithm", None) or "oneshot"
    if name not in list_algorithms():
        raise ConfigError(f"--algorithm {name!r} is unknown; known: {', '.join(list_algorithms())}")
    opts: dict = {}
    flags = dict(_ALGORITHM_FLAGS)
    flags["alpha"] = ("--alpha", "alpha0" if name == "asrfp" else "alpha", ("srfp", "asrfp"))
    for attr, (flag, key, users) in flags.items():
        value = getattr(a, attr, None)
        if value is None:
            continue
        if name not in users:
            raise ConfigError(f"{flag} applies to --algorithm {' / '.join(users)}, not {name}")
        opts[key] = value
    return name, opts


def parse_layer_ratios(items) -> dict[str, float]:
    """``["layer1=0", "layer3=0.5"]`` -> ``{"layer1": 0.0, "layer3": 0.5}``; ConfigError naming a bad item."""
    out: dict[str, float] = {}
    for item in items or ():
        pattern, sep, value = str(item).rpartition("=")
        try:
            r = float(value)
        except ValueError:
            r = None
        if not sep or not pattern or r is None or not 0.0 <= r < 1.0:
            raise ConfigError(f"--layer-ratio {item!r}: expected PATTERN=RATIO with RATIO in [0, 1), "
                              "e.g. --layer-ratio layer1=0.25")
        out[pattern] = r
    return out


def prune_cli(a, command: str | None = None) -> dict:
    t0 = time.perf_counter()
    if a.scheme not in ("channel", "depth"):
        from ..sparsity import list_schemes

        hint = (f"; fine-grained sparsity (the model keeps its shapes, with zeros) is `netcarve sparsify --scheme "
                f"{a.scheme}`" if a.scheme in list_schemes() else "")
        raise ConfigError(f"--scheme {a.scheme!r}: netcarve prune removes structure, 'channel' and 'depth' are "
                          f"its schemes{hint}")
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
        criterion=a.criterion, macs_reduction=a.macs_reduction, ratio=a.ratio,
        latency_ms=getattr(a, "latency_ms", None), round_to=a.round_to,
        protected=list(a.protect), global_ranking=a.global_ranking, hidden_size=getattr(a, "hidden_size", False),
        layer_ratios=parse_layer_ratios(getattr(a, "layer_ratio", None)),
        bn_recalibration_batches=0 if a.no_bn_recalibration or getattr(a, "reconstruct", 0) else a.bn_batches,
        reconstruct_batches=getattr(a, "reconstruct", 0),
        finetune_epochs=a.finetune_epochs, distill=bool(a.distill),
        distill_kind=a.distill or "logit", feature_weight=a.feature_weight, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
        ema_decay=getattr(a, "ema", 0.0), mixup=getattr(a, "mixup", 0.0), cutmix=getattr(a, "cutmix", 0.0),
        engine=a.engine or default_engine(), threads=a.threads, latency_batch=a.batch,
        latency_processes=a.latency_processes, progress=not a.no_progress and not a.json, resume=a.resume,
        scheme=a.scheme, block_criterion=getattr(a, "block_criterion", "loss"),
    )
    spec.algorithm, spec.algorithm_options = algorithm_options(a)
    if a.distill and not a.finetune_epochs:
        raise ConfigError("--distill needs --finetune-epochs N (N > 0)")
    spec.validate()
    base_acc = evaluate(base, test)
    return compress_and_report(base, base_acc, spec, train_loader=train, test_loader=test, ft_train_loader=ft_train,
                               out=a.out, task={"model": info.name, "source": a.model, "dataset": ds},
                               command=command, tag="netcarve prune", t0=t0)
