import json

import pytest

import netcarve
from netcarve.cli.main import main


@pytest.fixture(scope="module")
def trained_lenet(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    assert main(["train", "lenet", "--epochs", "4", "--batch-size", "64", "--out", str(d), "--no-progress",
                 "--json"]) == 0
    return d


def test_prune_cli_compacts_a_checkpoint_and_reports(trained_lenet, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "pruned"
    rc = main(["prune", str(trained_lenet), "--ratio", "0.5", "--round-to", "8", "--finetune-epochs", "2",
               "--distill", "--engine", "torch", "--latency-processes", "1", "--batch", "8", "--out", str(out),
               "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["task"]["source"] == str(trained_lenet) and rep["task"]["prune_ratio"] == 0.5
    assert rep["summary"]["macs_reduction"] > 1.5 and rep["compressed"]["top1"] > 80
    assert [p["label"] for p in rep["points"]] == ["baseline", "pruned (before fine-tune)", "compressed"]
    widths = rep["task"]["kept_widths"]
    assert widths and all(kept % 8 == 0 and kept < orig for kept, orig in widths.values())
    model = netcarve.load(out)
    assert sum(p.numel() for p in model.parameters()) == rep["compressed"]["params"]
    assert (out / "baseline" / "manifest.json").is_file() and (out / "finetune" / "metrics.jsonl").is_file()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(rep["compressed"]["top1"])


def test_prune_without_finetune_measures_two_points(trained_lenet, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["prune", str(trained_lenet), "--macs-reduction", "2", "--engine", "torch", "--latency-processes",
               "1", "--out", str(tmp_path / "p"), "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in rep["points"]] == ["baseline", "compressed"]
    assert rep["summary"]["macs_reduction"] >= 2.0


@pytest.mark.parametrize("args,msg", [
    (["--scheme", "nm", "--ratio", "0.5"], "only 'channel'"),
    (["--ratio", "1.5"], "--ratio must be in (0, 1)"),
    (["--macs-reduction", "0.5"], "--macs-reduction must be > 1"),
    ([], "exactly one of --macs-reduction and --ratio"),
    (["--ratio", "0.5", "--distill"], "--distill needs --finetune-epochs"),
    (["--ratio", "0.5", "--criterion", "nope"], "nope"),
])
def test_prune_bad_options_are_clear(args, msg, tmp_path, capsys):
    rc = main(["prune", "lenet", "--out", str(tmp_path / "x"), "--engine", "torch", *args])
    assert rc == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("criterion", ["taylor", "fpgm"])
def test_prune_with_other_criteria(criterion, trained_lenet, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["prune", str(trained_lenet), "--ratio", "0.25", "--criterion", criterion, "--engine", "torch",
               "--latency-processes", "1", "--out", str(tmp_path / "p"), "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert criterion in rep["task"]["method"] and rep["compressed"]["top1"] > 30
