"""``iterative``: geometric schedule of prune + BN recalibration + KD fine-tune steps."""

from __future__ import annotations

from netcarve.algorithms import run_algorithm
from netcarve.train import TrainConfig


def _steps(res):
    return [r for r in res.history if "widths" in r]


def test_iterative_widths_shrink_monotonically_and_meet_the_macs_target(lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    res = run_algorithm("iterative", macs_reduction=3.0, train=TrainConfig(epochs=3, batch_size=64, lr=0.02),
                        distill=True, progress=False, options={"steps": 3}, **job)
    steps = _steps(res)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert len(res.history) == 3 + 3  # one fine-tune epoch after each step
    widths = [s["widths"] for s in steps]
    for a, b in zip(widths, widths[1:]):
        assert all(b[g] <= a[g] for g in a) and any(b[g] < a[g] for g in a)
    assert widths[-1] == {g: w[0] for g, w in res.widths.items()}
    macs = [s["macs"] for s in steps]
    assert macs[0] > macs[1] > macs[2] == res.macs_after
    # geometric: each step reaches baseline / 3**(i/3)
    for i, m in enumerate(macs, 1):
        assert m <= res.macs_before / 3.0 ** (i / 3) + 1
    assert res.macs_reduction >= 3.0


def test_iterative_ratio_ends_at_the_oneshot_widths(lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    one = run_algorithm("oneshot", ratio=0.6, round_to=2, progress=False, **job)
    it = run_algorithm("iterative", ratio=0.6, round_to=2, progress=False, options={"steps": 2}, **job)
    assert it.widths == one.widths and it.macs_after == one.macs_after
    first = _steps(it)[0]["widths"]
    assert all(one.widths[g][0] < first[g] < one.widths[g][1] and first[g] % 2 == 0 for g in first)


def test_iterative_with_layer_ratios_does_not_compound_them(lenet_job):
    """A fixed per-layer ratio is where the schedule ends, not applied again at every step."""
    job = dict(lenet_job)
    job.pop("baseline_top1")
    one = run_algorithm("oneshot", macs_reduction=2.0, layer_ratios={"conv1": 0.5}, progress=False, **job)
    # the model itself as the teacher: it is copied before being frozen, so the student still trains
    it = run_algorithm("iterative", macs_reduction=2.0, layer_ratios={"conv1": 0.5}, progress=False,
                       options={"steps": 3}, teacher=job["model"],
                       train=TrainConfig(epochs=3, batch_size=64, lr=0.02), **job)
    assert all(p.requires_grad for p in job["model"].parameters())
    assert len([r for r in it.history if "val_top1" in r]) == 3
    assert it.widths == one.widths
    assert it.widths["conv1"] == (8, 16)
    assert it.macs_reduction >= 2.0


def test_iterative_warns_when_a_step_overshoots_its_target(lenet_job, caplog):
    """With coarse rounding a step may have no width between the previous and the final one: it is logged."""
    import logging

    job = dict(lenet_job)
    job.pop("baseline_top1")
    with caplog.at_level(logging.WARNING, logger="netcarve.algorithms.oneshot"):
        res = run_algorithm("iterative", macs_reduction=1.5, round_to=16, progress=False, options={"steps": 3}, **job)
    steps = _steps(res)
    assert all("target_macs" in s for s in steps)
    overshot = [s for s in steps[:-1] if s["macs"] < 0.9 * s["target_macs"]]
    assert overshot and "beyond its" in caplog.text
