"""Shared pieces of the netcarve.train tests (also imported by the kill-test child script)."""

from __future__ import annotations

import torch
from torch import nn

import netcarve
from netcarve.data import make_loaders
from netcarve.models import get_model_info
from netcarve.utils import seed_everything


def digits_loaders(batch_size: int = 64, seed: int = 0, augment: bool = False, subset=None):
    """(train, test) BatchLoaders over the built-in 8x8 digits, preprocessed as lenet expects."""
    return make_loaders(
        "digits", get_model_info("lenet").preprocess, batch_size, augment=augment, seed=seed, subset=subset
    )


def lenet(width: int = 8, seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return netcarve.create_model("lenet", width=width)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def strip_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


class Crash(Exception):
    """Raised by :class:`CrashAfter` (a simulated kill in the middle of training)."""


class CrashAfter:
    """A ``fit`` callback raising :class:`Crash` after ``steps`` optimizer steps."""

    def __init__(self, steps: int):
        self.steps, self.n = steps, 0

    def on_step_end(self, model):
        self.n += 1
        if self.n == self.steps:
            raise Crash


def crash_and_resume(cfg, out_dir, loaders):
    """Train ``cfg`` uninterrupted, then again killed 3 steps into epoch 2 and resumed from ``out_dir`` with a
    differently initialised model; ``loaders()`` makes fresh (train, test) loaders for each run.
    Returns ``(reference result, reference model, epoch saved at the kill, resumed result, resumed model)``."""
    from netcarve.train import fit, read_train_state

    train, test = loaders()
    ref_model = lenet(8, seed=0)
    ref = fit(ref_model, train, test, cfg, progress=False)
    train, test = loaders()
    try:
        fit(lenet(8, seed=0), train, test, cfg, out_dir=out_dir, progress=False, callbacks=[CrashAfter(len(train) + 3)])
    except Crash:
        pass
    else:  # pragma: no cover - the callback always raises
        raise AssertionError("the simulated kill did not happen")
    saved_epoch = read_train_state(out_dir)["epoch"]
    train, test = loaders()
    model = lenet(8, seed=99)  # a different init: everything must come from the checkpoint
    res = fit(model, train, test, cfg, out_dir=out_dir, resume=True, progress=False)
    return ref, ref_model, saved_epoch, res, model
