"""SFP / SRFP / ASRFP (methods card B2)."""

from __future__ import annotations

import pytest
import torch

from netcarve.algorithms import PruneJob, SoftPruneCallback, asrfp_alpha, run_algorithm
from netcarve.algorithms.base import candidate_groups, channel_norms, target_counts
from netcarve.graph import build_channel_groups
from netcarve.train import TrainConfig, fit


def test_asrfp_schedule_values():
    # alpha_e = 1 - e / (0.8 E), clipped at 0, and 0 after the last epoch
    assert [asrfp_alpha(e, 10) for e in range(10)] == pytest.approx(
        [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0])
    assert [asrfp_alpha(e, 5, alpha0=0.5, fraction=1.0) for e in range(5)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.0])
    assert asrfp_alpha(2, 10, schedule="cosine") == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.25))))
    assert all(a >= b for a, b in zip([asrfp_alpha(e, 7) for e in range(7)], [asrfp_alpha(e, 7) for e in range(1, 7)]))


def test_asrfp_run_applies_the_schedule(lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    res = run_algorithm("asrfp", ratio=0.25, train=TrainConfig(epochs=3, batch_size=64, lr=0.02), progress=False,
                        **job)
    assert [e["alpha"] for e in res.events] == pytest.approx([asrfp_alpha(e, 3) for e in range(3)])
    assert [r["alpha"] for r in res.history] == pytest.approx([1.0, 1 - 1 / 2.4, 0.0])


class _Spy:
    """Records, at each epoch end, the l1 scores (before the pruning callback) or the channel norms (after)."""

    def __init__(self, groups, what):
        self.groups, self.what, self.seen = groups, what, []

    def on_epoch_end(self, model, epoch):
        from netcarve.criteria import score_group

        if self.what == "scores":
            self.seen.append({g.name: score_group("l1", g, model) for g in self.groups})
        else:
            self.seen.append({g.name: channel_norms(model, g) for g in self.groups})


def test_sfp_zeroes_the_lowest_scored_channels_every_epoch_and_removes_the_last_set(lenet_job):
    model, train, test, x = lenet_job["model"], lenet_job["train_loader"], lenet_job["test_loader"], \
        lenet_job["example_input"]
    job = PruneJob(model=model, example_input=x, ratio=0.5, criterion="l1", train_loader=train,
                   train=TrainConfig(epochs=3, batch_size=64, lr=0.05)).validate()
    groups = build_channel_groups(model, x)
    cands = candidate_groups(groups, ())
    counts, _ = target_counts(job, model, groups)
    sfp = SoftPruneCallback(job, cands, counts, lambda e: 0.0, epochs=3)
    before, after = _Spy(cands, "scores"), _Spy(cands, "norms")
    fit(model, train, test, job.train, progress=False, callbacks=[before, sfp, after])
    assert len(sfp.log) == 3
    for e, event in enumerate(sfp.log):
        for g in cands:
            removed = torch.tensor(event["removed"][g.name])
            assert len(removed) == g.num_channels - counts[g.name]
            scores = before.seen[e][g.name]
            kept = torch.ones(g.num_channels, dtype=torch.bool)
            kept[removed] = False
            assert scores[removed].max() <= scores[kept].min()  # the lowest-scored ones
            assert torch.all(after.seen[e][g.name][removed] == 0)  # ... are zeroed
            assert torch.all(after.seen[e][g.name][kept] > 0)
            if e:  # zeroed channels keep training: after the next epoch they are no longer zero
                prev = torch.tensor(sfp.log[e - 1]["removed"][g.name])
                assert torch.all(before.seen[e][g.name][prev] > 0)
    last = {g: torch.tensor(sfp.log[-1]["removed"][g]) for g in counts}
    assert {g: sorted(set(range(n.num_channels)) - set(sfp.keep[g].tolist())) for g, n in
            ((c.name, c) for c in cands)} == {g: sorted(v.tolist()) for g, v in last.items()}


def test_sfp_removes_exactly_the_last_zeroed_set(lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    res = run_algorithm("sfp", macs_reduction=2.0, train=TrainConfig(epochs=2, batch_size=64, lr=0.02),
                        progress=False, **job)
    for g, kept in res.keep.items():
        n = res.widths[g][1]
        assert sorted(set(range(n)) - set(kept.tolist())) == sorted(res.events[-1]["removed"][g])
        group = res.groups[g]
        norms = channel_norms(res.dense, group)
        removed = torch.tensor(res.events[-1]["removed"][g])
        assert torch.all(norms[removed] == 0) and torch.all(norms[kept] > 0)
