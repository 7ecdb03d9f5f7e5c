import json

import pytest

import netcarve
from netcarve.cli.main import main
from netcarve.train import read_train_state


def test_train_cli_writes_checkpoint_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "lenet", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
            "--out", str(out), "--no-progress", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["epochs"] == 2 and res["top1"] > 50  # well above chance (10%)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    m = netcarve.load(out)
    assert m.netcarve_metadata["accuracy"]["top1"] == res["top1"]
    # extending a finished run with --resume trains only the new epoch
    assert main(args[:5] + ["3"] + args[6:] + ["--resume"]) == 0
    capsys.readouterr()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A lenet trained 2 epochs on digits (a checkpoint directory), shared by the distillation tests."""
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train", "lenet", "--dataset", "digits", "--epochs", "2", "--out", str(out), "--no-progress",
                 "--json"]) == 0
    return out


def test_train_cli_distills_from_a_checkpoint(tmp_path, capsys, teacher):
    assert main(["train", "lenet", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "student"),
                 "--teacher", str(teacher), "--distill", "logit", "--no-progress", "--json",
                 "--precision", "bf16", "--channels-last", "--ema", "0.99", "--mixup", "0.2", "--cutmix", "1"]) == 0
    rec = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[0])
    assert "train_kd" in rec  # the distillation term was part of the loss
    assert "val_top1_live" in rec  # --ema: the average validated beside the live weights
    cfg = read_train_state(tmp_path / "student")["config"]
    assert (cfg["precision"], cfg["channels_last"], cfg["ema_decay"]) == ("bf16", True, 0.99)
    assert (cfg["mixup"], cfg["cutmix"]) == (0.2, 1.0)


def test_train_cli_feature_kd_with_fitted_adapters(tmp_path, capsys, teacher):
    assert main(["train", "lenet", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "student"),
                 "--teacher", str(teacher), "--distill", "logit+feature", "--hint", "relu2:relu2",
                 "--adapter-init", "lstsq", "--feature-weight", "0.5", "--no-progress", "--json"]) == 0
    rec = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["train_feature"] > 0.0
    kd = read_train_state(tmp_path / "student")["kd"]
    assert (kd["kind"], kd["adapter_init"], kd["feature_weight"], kd["hints"]) == (
        "logit+feature", "lstsq", 0.5, [["relu2", "relu2"]])


def test_train_cli_logit_mse_distillation(tmp_path, capsys, teacher):
    assert main(["train", "lenet", "--dataset", "digits", "--epochs", "2", "--out", str(tmp_path / "student"),
                 "--teacher", str(teacher), "--distill", "logit_mse", "--alpha", "1.0", "--no-progress",
                 "--json"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 < recs[1]["train_kd"] < recs[0]["train_kd"]  # the student moves towards the teacher's logits
    kd = read_train_state(tmp_path / "student")["kd"]
    assert (kd["kind"], kd["alpha"]) == ("logit_mse", 1.0)


def test_train_cli_bad_hint_is_clear(tmp_path, capsys):
    rc = main(["train", "lenet", "--out", str(tmp_path / "r"), "--teacher", "lenet", "--hint", "nocolon"])
    assert rc == 2 and "STUDENT_LAYER:TEACHER_LAYER" in capsys.readouterr().err


def test_train_cli_repeated_teacher_distills_from_their_ensemble(tmp_path, capsys, monkeypatch):
    import netcarve.train as nt

    teacher = tmp_path / "teacher"
    assert main(["train", "lenet", "--dataset", "digits", "--epochs", "1", "--out", str(teacher), "--no-progress",
                 "--json"]) == 0
    capsys.readouterr()
    seen, real_fit = [], nt.fit

    def spy(*args, **kw):
        seen.append(kw["teacher"])
        return real_fit(*args, **kw)

    monkeypatch.setattr(nt, "fit", spy)
    assert main(["train", "lenet", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "student"),
                 "--teacher", str(teacher), "--teacher", str(teacher), "--no-progress", "--json"]) == 0
    (ens,) = seen
    assert isinstance(ens, nt.TeacherEnsemble) and len(ens.members) == 2
    assert ens.members[0] is not ens.members[1]
    assert "train_kd" in json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[0])
    rc = main(["train", "lenet", "--dataset", "digits", "--out", str(tmp_path / "s2"), "--teacher", str(teacher),
               "--teacher", str(teacher), "--teacher", "lenet", "--teacher-weights", "a", "--teacher-weights", "b"])
    assert rc == 2 and "--teacher-weights given 2 times for 3 --teacher" in capsys.readouterr().err
