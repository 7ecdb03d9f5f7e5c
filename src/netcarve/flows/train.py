"""``netcarve train``: train or fine-tune a model or checkpoint, with optional distillation, resumable."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..serialize import save
from ..utils import seed_everything
from .common import loaders_for, model_info, resolve_model


def train_cli(a) -> dict:
    from ..train import KDConfig, TeacherEnsemble, TrainConfig, evaluate, fit

    seed_everything(a.seed)
    model = resolve_model(a.model, a.weights, a.data_dir)
    info = model_info(model)
    ds = a.dataset or info.dataset
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr,
                      weight_decay=a.weight_decay, schedule=a.schedule, label_smoothing=a.label_smoothing, precision=a.precision,
                      channels_last=a.channels_last, ema_decay=a.ema, mixup=a.mixup, cutmix=a.cutmix,
                      seed=a.seed)
    teacher, kd = None, None
    if a.teacher:
        tw = a.teacher_weights
        if len(tw) not in (0, 1, len(a.teacher)):
            raise ConfigError(f"--teacher-weights given {len(tw)} times for {len(a.teacher)} --teacher: give it "
                              f"once (for every teacher) or once per teacher")
        tw = tw * len(a.teacher) if len(tw) == 1 else tw or [None] * len(a.teacher)
        teachers = [resolve_model(t, w, a.data_dir) for t, w in zip(a.teacher, tw)]
        teacher = teachers[0] if len(teachers) == 1 else TeacherEnsemble(teachers)
        hints = []
        for h in a.hint:
            if ":" not in h:
                raise ConfigError(f"--hint {h!r} must be STUDENT_LAYER:TEACHER_LAYER")
            hints.append(h.split(":", 1))
        kd = KDConfig(kind=a.distill or "logit", temperature=a.temperature, alpha=a.alpha, hints=hints,
                      feature_weight=a.feature_weight, adapter_init=a.adapter_init)
    elif a.distill:
        raise ConfigError("--distill needs --teacher MODEL|CHECKPOINT")
    train_loader, test_loader = loaders_for(model, ds, a.batch_size, data_dir=a.data_dir,
                                            augment=not a.no_augment, seed=a.seed,
                                            subset=(a.subset, None) if a.subset else None)
    out = Path(a.out)
    res = fit(model, train_loader, test_loader, cfg, out_dir=out, teacher=teacher, kd=kd, resume=a.resume,
              progress=not a.no_progress and not a.json)
    acc = evaluate(model, test_loader)
    save(model, out, metadata={"accuracy": acc, "train": cfg.to_dict(), "dataset": ds})
    best = max((h.get("val_top1") or 0.0) for h in res.history) if res.history else acc["top1"]
    return {"model": info.name, "dataset": ds, "epochs": cfg.epochs, "out": str(out), **acc,
            "best_top1": best}
