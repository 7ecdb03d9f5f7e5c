"""Pieces of the sparsify flow: non-zero MAC counting, pattern library materialisation, recipe round trip."""

import pytest
import torch
import yaml
from torch import nn

from netcarve.errors import ConfigError
from netcarve.flows.sparsify import SparsifyRecipe, load_recipe, materialize_plan, nonzero_macs, save_recipe
from netcarve.measure import count_model
from netcarve.sparsity import extract_pattern_library


def test_nonzero_macs_scale_with_density_per_layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 4))
    cost = count_model(m, torch.randn(1, 3, 6, 6))
    macs = {r.name: int(r.macs) for r in cost.layers}
    masks = {"1.weight": torch.rand(8, 8, 3, 3) < 0.25, "3.weight": torch.zeros(4, 288, dtype=torch.bool)}
    got = nonzero_macs(m, masks, macs)
    d1 = float(masks["1.weight"].float().mean())
    assert abs(got - (macs["0"] + macs["1"] * d1)) <= 1


def test_rnn_weights_share_the_layer_macs_by_size():
    rnn = nn.GRU(4, 8, num_layers=1, batch_first=True)
    wrapper = nn.Module()
    wrapper.add_module("r", rnn)
    masks = {"r.weight_hh_l0": torch.zeros(24, 8, dtype=torch.bool)}  # hh is 192 of the 288 weights
    assert nonzero_macs(wrapper, masks, {"r": 1000}) == round(1000 - 1000 * 192 / 288)


def test_materialize_plan_extracts_the_library_from_the_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1))
    plan = {"rules": [{"scheme": "pattern", "options": {"library_size": 6}, "sparsity": 0.5}]}
    out = materialize_plan(plan, m)
    assert out["rules"][0]["options"]["library"] == extract_pattern_library(m, size=6)
    assert plan["rules"][0]["options"] == {"library_size": 6}  # the input is not modified


def test_recipe_yaml_round_trip(tmp_path):
    r = SparsifyRecipe.from_dict({"model": "lenet", "out": str(tmp_path / "o"), "algorithm": "admm",
                                  "algorithm_options": {"rho": 0.02},
                                  "plan": {"rules": [{"scheme": "block", "options": {"block": [4, 4]}, "sparsity": 0.5}]},
                                  "finetune": {"epochs": 3, "precision": "bf16", "channels_last": True,
                                               "ema_decay": 0.995, "cutmix": 1.0},
                                  "distill": True})
    assert r.finetune.train_config(seed=4).to_dict() == {
        **r.finetune.train_config().to_dict(), "seed": 4}
    tc = r.finetune.train_config()
    assert (tc.precision, tc.channels_last, tc.ema_decay, tc.cutmix, tc.mixup) == ("bf16", True, 0.995, 1.0, 0.0)
    save_recipe(r, tmp_path / "r.yaml")
    back = load_recipe(tmp_path / "r.yaml")
    assert back.to_dict() == r.to_dict()
    # a recipe may nest the pipeline under a "sparsify:" key
    d = yaml.safe_load((tmp_path / "r.yaml").read_text())
    (tmp_path / "n.yaml").write_text(yaml.safe_dump({"model": d.pop("model"), "out": d.pop("out"), "sparsify": d}))
    assert load_recipe(tmp_path / "n.yaml").to_dict() == r.to_dict()


def test_recipe_rejects_a_bad_precision(tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        SparsifyRecipe.from_dict({"model": "lenet", "out": str(tmp_path / "o"),
                                  "plan": {"rules": [{"scheme": "unstructured", "sparsity": 0.5}]},
                                  "finetune": {"epochs": 1, "precision": "fp16"}})
