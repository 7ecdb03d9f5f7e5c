"""Child process of the kill test: one lenet/digits training run, optionally slowed down or resumed.

    python _train_child.py OUT_DIR EPOCHS [--resume] [--sleep SECONDS_PER_STEP]

Writes OUT_DIR/final.safetensors and OUT_DIR/result.json when training finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _helpers import digits_loaders, lenet  # noqa: E402

from netcarve.train import KDConfig, TrainConfig, fit  # noqa: E402


class Sleep:
    """Slows every step down so the parent can kill the run mid-epoch."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, model):
        time.sleep(self.seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("epochs", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--kd", action="store_true", help="distil from a (fixed random) wider teacher with hints")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = digits_loaders(batch_size=64, seed=3, augment=True)
    model = lenet(8, seed=0)
    teacher = kd = None
    if args.kd:
        teacher = lenet(16, seed=1)
        kd = KDConfig(kind="logit+feature", alpha=0.5, hints=[["relu2", "relu2"]])
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=64,
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1,
        seed=11,
    )
    callbacks = [Sleep(args.sleep)] if args.sleep else []
    res = fit(
        model,
        train,
        test,
        cfg,
        out_dir=args.out,
        teacher=teacher,
        kd=kd,
        resume=args.resume,
        progress=False,
        callbacks=callbacks,
    )
    out = Path(args.out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))
    (out / "result.json").write_text(json.dumps(res.to_dict()))


if __name__ == "__main__":
    main()
