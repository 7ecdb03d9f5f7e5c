import json

import pytest

from netcarve.cli.main import main


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("name,file,expected", [
    ("resnet20", "akamaster_resnet20-12fca82f.th", 91.73),
    ("resnet56", "akamaster_resnet56-4bfd9763.th", 93.39),
])
def test_eval_reproduces_pretrained_accuracy(name, file, expected, data_root, capsys):
    rc = main(["eval", name, "--weights", str(data_root / "pretrained" / file), "--dataset", "cifar10",
               "--data-dir", str(data_root), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 10000
    assert abs(res["top1"] - expected) <= 0.05
    assert res["top5"] > 99.0 and 0 < res["loss"] < 1.0


@pytest.mark.data
def test_eval_limit_and_model_default_dataset(data_root, capsys):
    rc = main(["eval", "resnet8", "--weights", "pretrained", "--data-dir", str(data_root), "--limit", "200",
               "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 200
    assert res["dataset"] == "cifar10" and res["top1"] > 75


def test_eval_missing_data_dir_is_clear(tmp_path, capsys):
    rc = main(["eval", "resnet20", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--json"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_data_that_does_not_fit_the_model_is_clear(capsys):
    assert main(["eval", "resnet20", "--dataset", "digits", "--json"]) == 2
    err = capsys.readouterr().err
    assert "takes samples of shape (3, 32, 32)" in err and "'digits' has (1, 8, 8)" in err


def test_eval_unreadable_weights_file_is_clear(tmp_path, capsys):
    bad = tmp_path / "w.pth"
    bad.write_text("not a checkpoint")
    assert main(["eval", "lenet", "--weights", str(bad), "--json"]) == 2
    err = capsys.readouterr().err
    assert "cannot read weights file" in err and str(bad) in err and len(err.splitlines()) == 1


def test_demo_model_that_does_not_fit_the_dataset_is_clear(capsys, tmp_path):
    assert main(["demo", "--model", "resnet20", "--out", str(tmp_path / "r"), "--json"]) == 2
    assert "pick a model made for digits" in capsys.readouterr().err
