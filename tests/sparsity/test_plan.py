"""Sparsity plans: rule matching, first/last layers, exclusions, clear errors, dict/YAML round trip."""

import json

import pytest
import torch
import yaml
from torch import nn

from netcarve.errors import ConfigError
from netcarve.sparsity import SparsityPlan, candidate_weights


def _names(res):
    return [t.name for t in res.targets]


def test_single_rule_skips_first_conv_and_last_linear(tiny_cnn):
    res = SparsityPlan.single("unstructured", 0.5).resolve(tiny_cnn)
    assert _names(res) == ["3.weight", "6.weight", "10.weight"]
    assert set(res.skipped) == {"0.weight", "12.weight"}
    assert "first conv" in res.skipped["0.weight"]
    res = SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.5}], skip_first_last=False).resolve(tiny_cnn)
    assert _names(res) == ["0.weight", "3.weight", "6.weight", "10.weight", "12.weight"]


def test_types_layers_exclude_and_later_rules_override(tiny_cnn):
    plan = SparsityPlan(rules=[
        {"scheme": "unstructured", "sparsity": 0.5, "types": ["Conv2d"]},
        {"scheme": "unstructured", "sparsity": 0.9, "layers": ["6"]},
        {"scheme": "unstructured", "sparsity": 0.7, "types": ["linear"]},
    ], exclude=["10.*"])  # fmt: skip
    res = plan.resolve(tiny_cnn).by_name()
    assert res["3.weight"].level == 0.5 and res["6.weight"].level == 0.9
    assert "10.weight" not in res and "12.weight" not in res


def test_exactly_named_weight_is_sparsified_even_if_first(tiny_cnn):
    res = SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.5, "layers": ["0.weight"]}]).resolve(tiny_cnn)
    assert _names(res) == ["0.weight"]


def test_errors_name_the_problem(tiny_cnn):
    with pytest.raises(ConfigError, match="no weight 'nope'"):
        SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.5, "layers": ["nope"]}]).resolve(tiny_cnn)
    with pytest.raises(ConfigError, match="unknown sparsity scheme 'bogus'"):
        SparsityPlan.single("bogus", 0.5).validate()
    with pytest.raises(ConfigError, match="sparsity level"):
        SparsityPlan.single("unstructured", 1.5).validate()
    with pytest.raises(ConfigError, match="needs a sparsity level"):
        SparsityPlan.single("unstructured").validate()
    with pytest.raises(ConfigError, match="unknown field"):
        SparsityPlan.from_dict({"rules": [{"scheme": "unstructured", "sparsity": 0.5, "level": 2}]})
    with pytest.raises(ConfigError, match="unknown field"):
        SparsityPlan.from_dict({"rulez": []})
    with pytest.raises(ConfigError, match="at least one rule"):
        SparsityPlan.from_dict({"rules": []})
    with pytest.raises(ConfigError, match="selects no weight"):
        SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.5, "types": ["LSTM"]}]).resolve(tiny_cnn)
    with pytest.raises(ConfigError, match="type 'conv2d_typo'"):
        SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.5, "types": ["conv2d_typo"]}]).validate()


def test_round_trip_json_and_yaml(tiny_cnn):
    plan = SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.75, "types": ["Conv2d"], "layers": ["3*"]}],
                        exclude=["12"], skip_first_last=False)
    d = plan.to_dict()
    for text in (json.dumps(d), yaml.safe_dump(d)):
        back = SparsityPlan.from_dict(yaml.safe_load(text))
        assert back.to_dict() == d
        assert [t.to_dict() for t in back.resolve(tiny_cnn).targets] == [t.to_dict() for t in plan.resolve(tiny_cnn).targets]


def test_candidates_cover_recurrent_and_attention_weights():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 8, num_layers=2, bidirectional=True)
            self.att = nn.MultiheadAttention(16, 2)
            self.fc = nn.Linear(16, 2)

    names = [n for n, _, _ in candidate_weights(M())]
    assert names == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0_reverse", "rnn.weight_hh_l0_reverse",
                     "rnn.weight_ih_l1", "rnn.weight_hh_l1", "rnn.weight_ih_l1_reverse", "rnn.weight_hh_l1_reverse",
                     "att.in_proj_weight", "att.out_proj.weight", "fc.weight"]
    res = SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.5, "types": ["rnn"]}]).resolve(M())
    assert len(res.targets) == 8 and all(t.name.startswith("rnn.") for t in res.targets)
    assert torch.Size([32, 8]) == dict(M().rnn.named_parameters())["weight_hh_l1"].shape
