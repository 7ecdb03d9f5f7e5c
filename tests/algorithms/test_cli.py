"""``netcarve prune --algorithm ...`` end to end on the built-in digits data."""

from __future__ import annotations

import json

import pytest

import netcarve
from netcarve.cli.main import main


def test_prune_cli_with_sfp_end_to_end(tmp_path, capsys):
    out = tmp_path / "sfp"
    rc = main(["prune", "lenet", "--algorithm", "sfp", "--ratio", "0.5", "--finetune-epochs", "3", "--lr", "0.1",
               "--batch-size", "64", "--train-subset", "480", "--test-subset", "200", "--engine", "torch",
               "--latency-processes", "1", "--batch", "8", "--threads", "1", "--bn-batches", "4", "--out", str(out),
               "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["task"]["method"].startswith("sfp soft filter pruning (l1, ratio 0.5, 3 epoch(s)")
    assert [p["label"] for p in rep["points"]] == ["baseline", "compressed"]
    assert rep["compressed"]["top1"] > 40  # trained from scratch while pruning (10 classes: chance is 10 %)
    assert rep["summary"]["macs_reduction"] > 2.0
    assert all(kept == orig // 2 for kept, orig in rep["task"]["kept_widths"].values())
    model = netcarve.load(out)
    assert sum(p.numel() for p in model.parameters()) == rep["compressed"]["params"]
    assert (out / "sfp" / "train" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("args,msg", [
    (["--algorithm", "sfp"], "algorithm 'sfp' prunes while training: it needs at least 1 training epoch"),
    (["--algorithm", "nope"], "--algorithm 'nope' is unknown; known: asrfp, increg, iterative, oneshot"),
    (["--algorithm", "sfp", "--finetune-epochs", "2", "--steps", "2"], "--steps applies to --algorithm iterative"),
    (["--algorithm", "iterative", "--steps", "0"], "steps must be an integer >= 1"),
    (["--algorithm", "oneshot", "--alpha", "0.5"], "--alpha applies to --algorithm srfp / asrfp, not oneshot"),
    (["--algorithm", "increg", "--finetune-epochs", "1", "--increg-target-reg", "-1"], "target_reg must be > 0"),
])
def test_prune_cli_bad_algorithm_options_are_one_line_errors(args, msg, tmp_path, capsys):
    rc = main(["prune", "lenet", "--ratio", "0.5", "--engine", "torch", "--out", str(tmp_path / "x"), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
