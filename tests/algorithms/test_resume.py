"""An interrupted algorithm run, resumed from its per-epoch checkpoints, ends exactly like an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from netcarve.algorithms import run_algorithm
from netcarve.train import TrainConfig


class Crash(RuntimeError):
    pass


class CrashingLoader:
    """Wraps a BatchLoader; raises when ``fit`` starts its ``n``-th epoch with index > 0."""

    def __init__(self, loader, n: int):
        self.loader, self.n, self.calls = loader, n, 0
        self.batch_size = loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)

    def set_epoch(self, e):
        if e > 0:
            self.calls += 1
            if self.calls == self.n:
                raise Crash(f"simulated crash before epoch {e}")
        self.loader.set_epoch(e)


@pytest.mark.parametrize("name,epochs,crash_at,options", [
    # crash before epoch 2, while channels are still being regularised: penalties, mean ranks and masks must come
    # from the checkpoint
    ("increg", 3, 1, {"reg_fraction": 1.0}),
    ("iterative", 4, 2, {"steps": 2}),  # crash in step 2 after its first epoch: step 1 is rebuilt
])
def test_resume_after_interruption_matches_an_uninterrupted_run(name, epochs, crash_at, options, lenet_job,
                                                                 new_loaders, tmp_path):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    common = dict(ratio=0.5, train=TrainConfig(epochs=epochs, batch_size=64, lr=0.02), distill=True,
                  bn_batches=2, progress=False, options=options, model=job["model"],
                  example_input=job["example_input"])
    train, test = new_loaders()
    ref = run_algorithm(name, train_loader=train, test_loader=test, out_dir=tmp_path / "ref", **common)

    train, test = new_loaders()
    with pytest.raises(Crash):
        run_algorithm(name, train_loader=CrashingLoader(train, crash_at), test_loader=test,
                      out_dir=tmp_path / "run", **common)
    train, test = new_loaders()
    res = run_algorithm(name, train_loader=train, test_loader=test, out_dir=tmp_path / "run", resume=True,
                        **common)
    assert {g: k.tolist() for g, k in res.keep.items()} == {g: k.tolist() for g, k in ref.keep.items()}
    a, b = res.model.state_dict(), ref.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [r.get("train_loss") for r in res.history] == [r.get("train_loss") for r in ref.history]


def test_iterative_refuses_to_resume_a_run_with_another_target(lenet_job, tmp_path):
    from netcarve.errors import ConfigError

    job = dict(lenet_job)
    job.pop("baseline_top1")
    run_algorithm("iterative", ratio=0.5, bn_batches=1, out_dir=tmp_path, options={"steps": 2}, **job)
    with pytest.raises(ConfigError, match="cannot resume from .*iterative.json: it was written for target"):
        run_algorithm("iterative", ratio=0.25, bn_batches=1, out_dir=tmp_path, resume=True, options={"steps": 2},
                      **job)
