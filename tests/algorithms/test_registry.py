"""Every registered algorithm: same inputs, same result type, target met, physically smaller, equal to its
masked twin, accuracy above chance."""

from __future__ import annotations

import pytest
import torch

from netcarve.algorithms import (
    AlgorithmResult,
    PruneJob,
    PruningAlgorithm,
    get_algorithm,
    list_algorithms,
    make_algorithm,
    register_algorithm,
    run_algorithm,
)
from netcarve.compact import mask_channels, recalibrate_bn
from netcarve.errors import ConfigError
from netcarve.train import TrainConfig, evaluate

TRAINS_WHILE_PRUNING = {"sfp", "srfp", "asrfp", "increg"}


def test_registry_lists_the_algorithms():
    assert {"oneshot", "iterative", "sfp", "srfp", "asrfp", "increg"} <= set(list_algorithms())
    assert list_algorithms("*rfp") == ["asrfp", "srfp"]
    with pytest.raises(ConfigError, match="unknown pruning algorithm 'nope'; known: .*oneshot"):
        get_algorithm("nope")


def test_register_algorithm_rejects_non_algorithms_and_duplicates():
    with pytest.raises(ConfigError, match="PruningAlgorithm subclass"):
        register_algorithm("bad", object)
    with pytest.raises(ConfigError, match="already registered"):
        register_algorithm("sfp", type("X", (PruningAlgorithm,), {}))


def _conv_widths(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


@pytest.mark.parametrize("name", list_algorithms())
def test_algorithm_conformance(name, lenet_job):
    job = dict(lenet_job)
    base_top1 = job.pop("baseline_top1")
    original = job["model"]
    before = {k: v.clone() for k, v in original.state_dict().items()}
    x = job["example_input"]
    # MACs target for half of them, ratio for the other half: both target kinds go through every path
    target = {"macs_reduction": 2.0} if list_algorithms().index(name) % 2 == 0 else {"ratio": 0.5}
    res = run_algorithm(name, criterion="l2", train=TrainConfig(epochs=2, batch_size=64, lr=0.02), distill=True,
                        bn_batches=4, progress=False, **target, **job)
    assert isinstance(res, AlgorithmResult) and res.algorithm == name and res.criterion == "l2"
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in before.items()), "input model modified"
    if "macs_reduction" in target:
        assert res.macs_reduction >= 2.0
    else:
        assert res.widths == {"conv1": (8, 16), "conv2": (16, 32), "conv3": (16, 32)}
    # physically smaller: the layer shapes are the kept widths, the counts are the real ones
    widths = _conv_widths(res.model)
    assert all(widths[g] == kept < total for g, (kept, total) in res.widths.items())
    assert {g: len(k) for g, k in res.keep.items()} == {g: w[0] for g, w in res.widths.items()}
    assert res.params_after == sum(p.numel() for p in res.model.parameters()) < res.params_before
    # the compact model computes what the masked dense model it came from computes (BN statistics
    # re-estimated on the same batches)
    if name in TRAINS_WHILE_PRUNING:
        twin = mask_channels(res.dense, res.groups, res.keep)
        job["train_loader"].set_epoch(0)
        recalibrate_bn(twin, job["train_loader"], num_batches=4).eval()
        with torch.no_grad():
            torch.testing.assert_close(res.model(x), twin(x), rtol=1e-4, atol=1e-5)
    assert evaluate(res.model, job["test_loader"])["top1"] > 40.0 and base_top1 > 80.0
    assert res.history and "describe" not in res.describe() and name in res.describe()


@pytest.mark.parametrize("name", ["oneshot", "iterative"])
def test_without_training_the_result_equals_the_masked_original(name, lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    res = run_algorithm(name, macs_reduction=2.5, bn_batches=0, progress=False, **job)
    twin = mask_channels(job["model"], res.groups, res.keep).eval()
    x = job["example_input"]
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), twin(x), rtol=1e-4, atol=1e-5)
    assert res.macs_reduction >= 2.5


@pytest.mark.parametrize("name,options,msg", [
    ("sfp", {}, "needs at least 1 training epoch"),
    ("increg", {}, "needs at least 1 training epoch"),
    ("iterative", {"steps": 0}, "steps must be an integer >= 1"),
    ("asrfp", {"schedule": "exp"}, "schedule must be one of linear, cosine"),
    ("oneshot", {"steps": 2}, "unknown option(s) steps"),
])
def test_bad_combinations_are_one_line_config_errors(name, options, msg, lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    train = None if msg.startswith("needs") else TrainConfig(epochs=1)
    with pytest.raises(ConfigError) as e:
        run_algorithm(name, ratio=0.5, train=train, options=options, **job)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_job_validation_errors(lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    with pytest.raises(ConfigError, match="exactly one pruning target"):
        run_algorithm("oneshot", **job)
    with pytest.raises(ConfigError, match="resume needs out_dir"):
        run_algorithm("oneshot", ratio=0.5, resume=True, **job)
    with pytest.raises(ConfigError, match="train_loader is needed"):
        run_algorithm("oneshot", ratio=0.5, **{**job, "train_loader": None})
    assert make_algorithm("iterative", steps=4).opts["steps"] == 4


@pytest.mark.parametrize("name", ["oneshot", "iterative", "sfp", "increg"])  # (srfp/asrfp share sfp's code)
def test_gradient_based_criterion(name, lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    train = TrainConfig(epochs=1, batch_size=64, lr=0.02)
    res = run_algorithm(name, criterion="taylor", ratio=0.25, train=train, gradient_batches=2, bn_batches=2,
                        progress=False, **job)
    assert res.criterion == "taylor"
    assert res.widths == {"conv1": (12, 16), "conv2": (24, 32), "conv3": (24, 32)}
    assert all(p.grad is None for p in res.model.parameters())  # scoring gradients are not left behind
    assert evaluate(res.model, job["test_loader"])["top1"] > 25.0


@pytest.mark.parametrize("name", list_algorithms())
def test_reconstruct_replaces_bn_recalibration_in_every_algorithm(name, lenet_job):
    from netcarve.compact import reconstruct

    job = dict(lenet_job)
    job.pop("baseline_top1")
    train = TrainConfig(epochs=1, batch_size=64, lr=0.02) if name in TRAINS_WHILE_PRUNING else None
    pj = PruneJob(macs_reduction=2.0, train=train, bn_batches=4, reconstruct_batches=2, progress=False,
                  **job).validate()
    algo = make_algorithm(name, pj)
    said = algo.describe(pj)
    assert "least-squares reconstruction (2 batches)" in said and "BN recalibration" not in said
    res = algo.run(pj)
    if name == "iterative":  # several removals, each refit against the model before it: compare the end only
        assert res.macs_reduction >= 2.0
        return
    # without training after the removal, the result is the reconstruction of the model it was removed from
    reference = res.dense if name in TRAINS_WHILE_PRUNING else job["model"]
    job["train_loader"].set_epoch(0)
    twin, rep = reconstruct(reference, res.groups, res.keep, job["train_loader"], num_batches=2)
    assert rep.layers and rep.mean_error_after < rep.mean_error_before
    x = job["example_input"]
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), twin(x), rtol=1e-4, atol=1e-5)
