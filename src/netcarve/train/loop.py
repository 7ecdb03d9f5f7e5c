"""The training loop: :func:`fit` (supervised or distillation, crash-safe resume) and :func:`evaluate`.

Epoch numbering: ``history[i]["epoch"]`` is 1-based (the number of epochs completed); the index passed to
``train_loader.set_epoch(e)`` and to ``callback.on_epoch_end(model, e)`` is 0-based, like
``DistributedSampler.set_epoch``.

Exact resume: after every epoch the model, optimizer, scheduler, task state (KD adapters), callback
states and the python/numpy/torch global RNG states are committed to ``out_dir/train_state`` (see
:mod:`netcarve.train.checkpoint`). Resuming replays nothing: epoch ``k+1`` starts from exactly the
state that epoch ``k`` ended with, so a killed-and-resumed run ends with the same weights as an
uninterrupted one -- provided the loaders' order and augmentation depend only on their seed and
``set_epoch(e)`` (as ``netcarve.data`` loaders do), not on how many epochs the process has run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .._version import __version__
from ..errors import CheckpointError, ConfigError, NetcarveError
from ..utils import atomic_write, seed_everything
from .checkpoint import (
    clear_train_state,
    get_rng_state,
    load_train_state,
    read_train_state,
    save_train_state,
    set_rng_state,
)
from .config import KDConfig, TrainConfig
from .distill import DistillationTask, SupervisedTask, _logits
from .ema import ModelEma
from .mix import BatchMix
from .small_conv import small_map_convs

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# TrainConfig fields that may differ between the saved and the given config when resuming
RESUME_MUTABLE_FIELDS = ("epochs", "log_every", "small_conv_gemm")


@dataclass
class TrainResult:
    """What :func:`fit` returns. ``history`` holds one dict per completed epoch (including epochs run by
    an earlier, resumed-from process); ``best`` is the epoch record with the highest ``val_top1`` (the
    earliest on ties; the last record when there is no validation loader); ``final`` the last record."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    out_dir: str | None = None
    resumed_from: int = 0  # epochs already complete when this call started (0 = fresh run)

    def to_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "best": self.best,
            "final": self.final,
            "out_dir": self.out_dir,
            "resumed_from": self.resumed_from,
        }


# -------------------------------------------------------------------------------------------- evaluate


def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` over ``loader`` (in eval mode, under no_grad).

    Returns ``{"top1": %, "top5": %, "loss": mean CE, "n": samples}``. With fewer than 5 classes
    ``top5`` is top-``num_classes`` accuracy (i.e. 100 %). The model's train/eval mode is restored.
    Raises ConfigError when the loader yields no samples.
    """
    was_training = model.training
    device = _device(model)
    model.eval()
    n = 0
    c1 = c5 = 0
    loss_sum = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = _logits(model(x))
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            k = min(5, logits.shape[-1])
            topk = logits.topk(k, dim=-1).indices
            hit = topk == y.unsqueeze(-1)
            c1 += int(hit[:, 0].sum())
            c5 += int(hit.any(dim=-1).sum())
            n += int(y.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("evaluate: the loader yielded no samples")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "n": n}


# ------------------------------------------------------------------------------------------- helpers


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` for optimizer step ``step`` (0-based, counted over the whole run).

    Linear warm-up over ``warmup_epochs`` (from ``1/warmup_steps`` to 1), then ``schedule``: cosine from
    1 towards 0 over the remaining steps (per step), ``step`` = ``gamma ** (epoch // step_size)``, or 1.
    """
    warm = config.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "cosine":
        span = config.epochs * steps_per_epoch - warm
        if span <= 0:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))
    if config.schedule == "step":
        return config.gamma ** ((step // steps_per_epoch) // config.step_size)
    return 1.0


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _progress_enabled(progress: bool) -> bool:
    return bool(progress) and os.environ.get("NETCARVE_NO_PROGRESS", "").strip().lower() not in (
        "1",
        "true",
        "yes",
    )


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    with atomic_write(out / METRICS_FILE, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")


def _append_metrics(out: Path, rec: dict[str, Any]) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_resumable(saved: dict, config: TrainConfig, kd: KDConfig | None, steps: int, where: Path) -> None:
    # fields a run saved by an older netcarve lacks count as their defaults
    old = {**TrainConfig().to_dict(), **(saved.get("config") or {})}
    new = config.to_dict()
    diffs = [
        f"{k} (saved {old.get(k)!r}, given {new.get(k)!r})"
        for k in sorted(set(old) | set(new))
        if k not in RESUME_MUTABLE_FIELDS and old.get(k) != new.get(k)
    ]
    old_kd = saved.get("kd")
    if old_kd is not None:
        old_kd = {**KDConfig().to_dict(), **old_kd}  # fields an older netcarve did not save: their defaults
    new_kd = kd.to_dict() if kd is not None else None
    if (old_kd is None) != (new_kd is None):
        diffs.append(f"distillation (saved {'on' if old_kd else 'off'}, given {'on' if new_kd else 'off'})")
    elif old_kd is not None:
        diffs += [
            f"kd.{k} (saved {old_kd.get(k)!r}, given {new_kd.get(k)!r})"
            for k in sorted(set(old_kd) | set(new_kd))
            if old_kd.get(k) != new_kd.get(k)
        ]
    if saved.get("steps_per_epoch") not in (None, steps):
        diffs.append(f"steps per epoch (saved {saved.get('steps_per_epoch')}, given loader has {steps})")
    if diffs:
        raise ConfigError(
            f"cannot resume from {where}: the saved run differs in "
            + "; ".join(diffs)
            + " (only epochs may change; start a fresh run with resume=False or another out_dir)"
        )
    done = int(saved["epoch"])
    if config.epochs < done:
        raise ConfigError(
            f"cannot resume from {where}: TrainConfig.epochs={config.epochs} but {done} epochs are already done"
        )


def _zoo_example(model: nn.Module) -> torch.Tensor | None:
    from ..models import example_input

    try:
        return example_input(model, batch=2)
    except (ConfigError, AttributeError, KeyError):
        return None


def _num_outputs(model: nn.Module, example: torch.Tensor) -> int:
    """The number of classes a classifier predicts, from one eval-mode forward pass (no state changes)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = _logits(model(example[:2].to(_device(model))))
    finally:
        model.train(was)
    if logits.dim() != 2:
        raise ConfigError(
            f"batch mixing (TrainConfig.mixup / cutmix) needs a classifier with (N, classes) outputs; the model "
            f"returns shape {tuple(logits.shape)}"
        )
    return int(logits.shape[1])


def _first_batch(loader) -> torch.Tensor:
    for x, _ in loader:
        return x[:2]
    raise ConfigError("fit: the loader yielded no batches")


# ------------------------------------------------------------------------------------------------ fit


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    config: TrainConfig | dict,
    out_dir: str | os.PathLike | None = None,
    teacher: nn.Module | None = None,
    kd: KDConfig | dict | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
    *,
    example_input: torch.Tensor | None = None,
) -> TrainResult:
    """Train ``model`` in place; with ``teacher``, by knowledge distillation (``kd``, default logit KD).

    Args:
        model: trained in place (the caller's train/eval mode is restored at the end).
        train_loader: yields ``(x, y)`` batches; must have ``len()``; ``set_epoch(e)`` is called when present.
        val_loader: evaluated after every epoch with :func:`evaluate`, or None.
        config: a :class:`TrainConfig` (or a dict for :meth:`TrainConfig.from_dict`).
        out_dir: where ``metrics.jsonl`` (one JSON record per epoch) and ``train_state/`` (committed after
            every epoch) go; None keeps nothing on disk.
        teacher, kd: distillation (see :class:`~netcarve.train.distill.DistillationTask`). ``kd`` without
            a teacher is a ConfigError.
        resume: continue from the last committed epoch in ``out_dir`` (a fresh start when there is
            none). Refuses with ConfigError when the saved config, KD config or steps per epoch differ;
            only ``epochs`` (may be extended; the schedule is then recomputed for the new length) and
            ``log_every`` may change. Without ``resume``, an existing state in ``out_dir`` is discarded.
        progress: a tqdm bar per epoch (also off when the environment has ``NETCARVE_NO_PROGRESS=1``).
        callbacks: objects with optional ``on_step_end(model)`` (after every optimizer step, e.g. to
            re-apply pruning masks) and ``on_epoch_end(model, epoch)`` (0-based; after the epoch's last
            step, before validation and the checkpoint, so changes it makes are validated and saved).
            Callbacks with ``state_dict()`` / ``load_state_dict(d)`` have that state checkpointed
            (tensors and plain containers only).
        example_input: a batch for finding hint-layer shapes (feature KD); default: the zoo example input,
            else the first batch of ``val_loader`` (or ``train_loader``).

    Returns a :class:`TrainResult`. A non-finite loss raises NetcarveError naming epoch and step; the
    last committed epoch stays on disk.
    """
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config.validate()
    if kd is not None and teacher is None:
        raise ConfigError("fit: kd is given but teacher is None; pass the teacher model to distil from")
    if teacher is not None:
        kd = KDConfig() if kd is None else KDConfig.from_dict(kd) if isinstance(kd, dict) else kd.validate()
    if resume and out_dir is None:
        raise ConfigError("fit: resume=True needs out_dir (where the training state was written)")
    callbacks = list(callbacks or [])
    for cb in callbacks:
        if not (hasattr(cb, "on_step_end") or hasattr(cb, "on_epoch_end")):
            raise ConfigError(
                f"fit: callback {cb!r} has neither on_step_end(model) nor on_epoch_end(model, epoch)"
            )
    try:
        steps = len(train_loader)
    except TypeError:
        raise ConfigError(
            "fit: train_loader must have a length (len(train_loader) batches per epoch)"
        ) from None
    if steps <= 0:
        raise ConfigError("fit: train_loader is empty")
    lb = getattr(train_loader, "batch_size", None)
    if isinstance(lb, int) and lb != config.batch_size:
        logger.warning(
            "train_loader.batch_size=%d differs from TrainConfig.batch_size=%d", lb, config.batch_size
        )

    out = Path(out_dir) if out_dir is not None else None
    saved = read_train_state(out) if (out is not None and resume) else None
    if saved is not None:
        _check_resumable(saved, config, kd, steps, out / "train_state")
    elif out is not None and resume:
        logger.info("no training state in %s; starting a fresh run", out)

    was_training = model.training
    seed_everything(config.seed)
    if config.precision == "bf16" and not _native_bf16():
        logger.warning(
            "TrainConfig.precision='bf16' on a CPU without native bf16 (AVX512-BF16 / AMX): autocast will "
            "emulate it and train slower than fp32"
        )
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    if teacher is not None:
        if kd.hints and example_input is None:
            example_input = _zoo_example(model)
            if example_input is None:
                example_input = _first_batch(val_loader if val_loader is not None else train_loader)
        task: SupervisedTask | DistillationTask = DistillationTask(
            model, teacher, kd, label_smoothing=config.label_smoothing, example_input=example_input
        )
    else:
        task = SupervisedTask(model, config.label_smoothing)
    mixer = None
    if config.mixup > 0 or config.cutmix > 0:
        ex = example_input if example_input is not None else _zoo_example(model)
        if ex is None:
            ex = _first_batch(val_loader if val_loader is not None else train_loader)
        mixer = BatchMix(_num_outputs(model, ex), mixup=config.mixup, cutmix=config.cutmix)
    if out is not None and saved is None:  # a fresh run: only now that the task is valid, drop old state
        out.mkdir(parents=True, exist_ok=True)
        clear_train_state(out)
        _write_metrics(out, [])

    stack = ExitStack()
    try:
        params = task.trainable_parameters()
        optimizer = make_optimizer(params, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s, steps))
        ema = ModelEma(model, config.ema_decay) if config.ema_decay > 0 else None
        routed = stack.enter_context(small_map_convs(model, config.small_conv_gemm))
        if routed:
            logger.debug("small-map convs as one matrix product while training: %s", ", ".join(routed))
        history: list[dict[str, Any]] = []
        start = 0
        if saved is not None:
            meta, extra = load_train_state(out, model)
            if ema is not None:
                if "ema" not in extra:
                    raise CheckpointError(
                        f"{out / 'train_state'}: ema_decay is set but the saved state has no weight average"
                    )
                ema.load_state_dict(extra["ema"])
            try:
                task.load_aux_state_dict(extra.get("aux", {}))
                optimizer.load_state_dict(extra["optimizer"])
                scheduler.load_state_dict(extra["scheduler"])
                for i, cb in enumerate(callbacks):
                    cb_state = extra.get("callbacks", {}).get(str(i))
                    if cb_state is not None and hasattr(cb, "load_state_dict"):
                        cb.load_state_dict(cb_state)
                set_rng_state(extra["rng"])
            except (KeyError, ValueError, RuntimeError) as e:
                raise CheckpointError(
                    f"{out / 'train_state'}: cannot restore the training state: {e}"
                ) from None
            # the schedule may have a new length (extended epochs): recompute the lr of the next step
            for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
                g["lr"] = base * lr_factor(config, scheduler.last_epoch, steps)
            history = list(meta.get("history", []))
            start = int(meta["epoch"])
            _write_metrics(out, history)
            logger.info("resuming %s from epoch %d/%d", out, start, config.epochs)

        show = _progress_enabled(progress)
        for epoch in range(start, config.epochs):
            t0 = time.perf_counter()
            bar = tqdm(
                total=steps,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                unit="batch",
                disable=not show,
                dynamic_ncols=True,
            )
            try:
                rec = _run_epoch(
                    task,
                    model,
                    train_loader,
                    optimizer,
                    scheduler,
                    params,
                    config,
                    epoch,
                    steps,
                    callbacks,
                    bar,
                    ema,
                    mixer,
                )
                for cb in callbacks:
                    if hasattr(cb, "on_epoch_end"):
                        cb.on_epoch_end(model, epoch)
                if val_loader is not None:
                    if ema is not None:
                        v = evaluate(model, val_loader)
                        rec.update(val_top1_live=v["top1"], val_loss_live=v["loss"])
                        with ema.swapped_in(model):
                            v = evaluate(model, val_loader)
                    else:
                        v = evaluate(model, val_loader)
                    rec.update(val_top1=v["top1"], val_top5=v["top5"], val_loss=v["loss"])
                    bar.set_postfix(
                        loss=f"{rec['train_loss']:.4f}",
                        top1=f"{rec['train_top1']:.1f}",
                        val_top1=f"{v['top1']:.2f}",
                    )
                else:
                    rec.update(val_top1=None, val_top5=None, val_loss=None)
            finally:
                bar.close()
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(rec)
            logger.info(
                "epoch %d/%d: train loss %.4f top1 %.2f%% | val top1 %s | lr %.3g | %.1f s",
                rec["epoch"],
                config.epochs,
                rec["train_loss"],
                rec["train_top1"],
                "-" if rec["val_top1"] is None else f"{rec['val_top1']:.2f}%",
                rec["lr"],
                rec["seconds"],
            )
            if out is not None:
                extra = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "aux": task.aux_state_dict(),
                    "callbacks": {
                        str(i): cb.state_dict() for i, cb in enumerate(callbacks) if hasattr(cb, "state_dict")
                    },
                    "rng": get_rng_state(),
                }
                if ema is not None:
                    extra["ema"] = ema.state_dict()
                meta = {
                    "epoch": epoch + 1,
                    "config": config.to_dict(),
                    "kd": kd.to_dict() if kd is not None else None,
                    "task": type(task).__name__,
                    "model": type(model).__name__,
                    "steps_per_epoch": steps,
                    "history": history,
                    "netcarve_version": __version__,
                }
                save_train_state(out, model=model, extra=extra, meta=meta)
                _append_metrics(out, rec)
        if ema is not None:
            ema.copy_to(model)
    finally:
        stack.close()
        task.close()
        model.train(was_training)
        if config.channels_last:
            model.to(memory_format=torch.contiguous_format)
            if teacher is not None:
                teacher.to(memory_format=torch.contiguous_format)

    final = history[-1] if history else None
    best = final
    if history and history[0].get("val_top1") is not None:
        best = max(history, key=lambda r: (r["val_top1"], -r["epoch"]))
    return TrainResult(
        history=history, best=best, final=final, out_dir=str(out) if out else None, resumed_from=start
    )


def _run_epoch(
    task, model, loader, optimizer, scheduler, params, config, epoch, steps, callbacks, bar, ema=None, mixer=None
):
    task.train()
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    step_cbs = [cb for cb in callbacks if hasattr(cb, "on_step_end")]
    lr0 = float(optimizer.param_groups[0]["lr"])
    device = _device(model)
    sums: dict[str, float] = {}
    n = correct = 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device), y.to(device)
        target = y
        if mixer is not None:
            x, target = mixer(x, y)
            y = target.argmax(-1)  # the larger share, for train top-1
        if config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = task(x, target)
        loss = out["loss"]
        lv = float(loss.detach())
        if not math.isfinite(lv):
            lr = float(optimizer.param_groups[0]["lr"])
            raise NetcarveError(
                f"training diverged: the loss is {lv} at epoch {epoch + 1}/{config.epochs}, step "
                f"{step + 1}/{steps} (lr {lr:.3g}); try a lower lr (e.g. lr={config.lr / 10:.3g}), "
                "warmup_epochs or grad_clip"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        for cb in step_cbs:
            cb.on_step_end(model)
        if ema is not None:
            ema.update(model)
        b = int(y.shape[0])
        n += b
        correct += int((out["logits"].detach().argmax(-1) == y).sum())
        sums["loss"] = sums.get("loss", 0.0) + lv * b
        for k, v in out.items():
            if k not in ("loss", "logits"):
                sums[k] = sums.get(k, 0.0) + float(v) * b
        bar.update(1)
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", top1=f"{100.0 * correct / n:.1f}")
            logger.debug("epoch %d step %d/%d: loss %.4f", epoch + 1, step + 1, steps, lv)
    if n == 0:
        raise ConfigError(f"fit: train_loader yielded no samples in epoch {epoch + 1}")
    rec: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": sums.pop("loss") / n,
        "train_top1": 100.0 * correct / n,
    }
    rec.update({f"train_{k}": v / n for k, v in sums.items()})
    rec["lr"] = lr0
    return rec
