"""TrainConfig / KDConfig: round trips and validation errors that name the field."""

from __future__ import annotations

import json

import pytest
import yaml

from netcarve.errors import ConfigError
from netcarve.train import DistillLoss, KDConfig, TrainConfig, list_distill_losses, register_distill_loss


def test_train_config_round_trip_json_yaml():
    cfg = TrainConfig(
        epochs=3,
        batch_size=32,
        optimizer="adamw",
        lr=1e-3,
        momentum=0.0,
        weight_decay=0.01,
        schedule="step",
        step_size=2,
        gamma=0.5,
        warmup_epochs=1,
        label_smoothing=0.1,
        seed=7,
        grad_clip=5.0,
        log_every=10,
    )
    d = cfg.to_dict()
    assert d["optimizer"] == "adamw" and d["grad_clip"] == 5.0
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    assert TrainConfig.from_dict({}) == TrainConfig()


def test_train_config_accepts_yaml_style_numbers():
    # PyYAML reads "1e-3" (no dot) as a string
    cfg = TrainConfig.from_dict(yaml.safe_load("lr: 1e-3\nepochs: 4.0\nweight_decay: 0\n"))
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)
    assert cfg.epochs == 4 and isinstance(cfg.epochs, int)
    assert cfg.weight_decay == 0.0


def test_train_config_unknown_key_names_it():
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.from_dict([("lr", 0.1)])


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("epochs", True),
        ("epochs", 2.5),
        ("batch_size", -1),
        ("optimizer", "adam"),
        ("lr", 0.0),
        ("lr", -0.1),
        ("lr", "fast"),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("nesterov", "yes"),
        ("weight_decay", -1e-4),
        ("schedule", "linear"),
        ("step_size", 0),
        ("gamma", 0.0),
        ("gamma", 1.5),
        ("warmup_epochs", -1),
        ("label_smoothing", 1.0),
        ("seed", "0"),
        ("grad_clip", 0.0),
        ("log_every", 0),
    ],
)
def test_train_config_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field}"):
        TrainConfig.from_dict({field: value})
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field}"):
        TrainConfig(**{field: value})


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="nesterov"):
        TrainConfig(nesterov=True, momentum=0.0)
    assert TrainConfig(nesterov=True, momentum=0.9).nesterov
    assert TrainConfig(optimizer="adamw", nesterov=True, momentum=0.0).optimizer == "adamw"


def test_kd_config_round_trip():
    kd = KDConfig(
        kind="logit+feature",
        temperature=2.0,
        alpha=0.5,
        feature_weight=0.1,
        hints=[("conv2", "conv2"), ["fc", "fc"]],
    )
    d = kd.to_dict()
    assert d["hints"] == [["conv2", "conv2"], ["fc", "fc"]]
    assert KDConfig.from_dict(d) == kd
    assert KDConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == kd
    assert KDConfig().to_dict() == {
        "kind": "logit",
        "temperature": 4.0,
        "alpha": 0.9,
        "feature_weight": 1.0,
        "hints": [],
        "adapter_init": "identity",
    }
    assert KDConfig(kind=" logit + feature ", hints=[["a", "b"]]).kind == "logit+feature"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kind": "bogus"}, "kind"),
        ({"kind": "logit+logit"}, "kind"),
        ({"kind": "logit+logit_mse"}, "kind"),  # two losses that each include the label cross-entropy
        ({"kind": ""}, "kind"),
        ({"temperature": 0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"feature_weight": -1}, "feature_weight"),
        ({"kind": "feature"}, "hints"),  # feature KD without hints
        ({"kind": "logit", "hints": [["a", "b"]]}, "hints"),  # hints that nothing uses
        ({"kind": "feature", "hints": [["a"]]}, r"hints\[0\]"),
        ({"kind": "feature", "hints": "conv1"}, "hints"),
        ({"kind": "feature", "hints": [["a", ""]]}, r"hints\[0\]"),
    ],
)
def test_kd_config_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"KDConfig\.{field}"):
        KDConfig.from_dict(kwargs)


def test_kd_config_unknown_key():
    with pytest.raises(ConfigError, match="temp"):
        KDConfig.from_dict({"temp": 3})


def test_registered_loss_is_a_valid_kind():
    class Zero(DistillLoss):
        def forward(self, b):
            return {"loss": b.student_logits.sum() * 0.0}

    register_distill_loss("zero-test", Zero, overwrite=True)
    assert "zero-test" in list_distill_losses()
    assert KDConfig(kind="logit+zero-test").components == ["logit", "zero-test"]
    with pytest.raises(ConfigError, match="already registered"):
        register_distill_loss("zero-test", Zero)
    with pytest.raises(ConfigError, match="DistillLoss"):
        register_distill_loss("not-a-loss", object)
    with pytest.raises(ConfigError, match=r"\+"):
        register_distill_loss("a+b", Zero)


def test_kd_config_recovery_kinds():
    """What ``--distill KIND`` of prune / sparsify means; the CLI's list (kept torch-free) is the same."""
    from netcarve.cli.main import DISTILL_KINDS

    assert DISTILL_KINDS == list(KDConfig.RECOVERY_KINDS)
    assert KDConfig.recovery("logit") == KDConfig(kind="logit", temperature=4.0, alpha=0.9)
    assert KDConfig.recovery("logit+feature", 4.0) == KDConfig.block_features(4.0)
    mse = KDConfig.recovery("logit_mse")
    assert (mse.kind, mse.alpha, mse.hints) == ("logit_mse", 1.0, [])
    both = KDConfig.recovery("logit_mse+feature", 2.0)
    assert (both.kind, both.alpha, both.hints, both.adapter_init, both.feature_weight) == (
        "logit_mse+feature", 1.0, "blocks", "lstsq", 2.0)
    with pytest.raises(ConfigError, match="--distill must be one of"):
        KDConfig.recovery("feature")
