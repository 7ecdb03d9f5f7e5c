"""End-to-end demo on the built-in digits with a small budget (the real `netcarve demo` uses more epochs)."""

import json

import pytest

import netcarve
from netcarve.cli.main import main
from netcarve.flows.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=str(d / "run"), engine="torch", train_epochs=6, finetune_epochs=3, progress=False,
                     cache_dir=str(d / "cache"))
    return run_demo(cfg, command="test"), d


def test_demo_report_and_run_dir(demo_run):
    rep, d = demo_run
    run = d / "run"
    for f in ("report.json", "report.md", "pareto.png", "model.safetensors", "manifest.json",
              "baseline/manifest.json", "finetune/metrics.jsonl"):
        assert (run / f).is_file(), f
    assert json.loads((run / "report.json").read_text())["schema"] == "netcarve.report/1"
    b, c, s = rep["baseline"], rep["compressed"], rep["summary"]
    assert b["top1"] > 85 and c["top1"] > 80  # real training on real digits
    assert s["macs_reduction"] >= 2.0 and c["params"] < b["params"] and c["size_bytes"] < b["size_bytes"]
    assert b["latency_ms"]["p50"] > 0 and c["latency_ms"]["p50"] > 0
    assert [p["label"] for p in rep["points"]] == ["baseline", "pruned (before fine-tune)", "compressed"]
    assert rep["measurement"] == {**rep["measurement"], "engine": "torch", "threads": 2, "batch": 64}


def test_demo_output_is_a_loadable_checkpoint(demo_run, capsys):
    rep, d = demo_run
    model = netcarve.load(d / "run")
    assert sum(p.numel() for p in model.parameters()) == rep["compressed"]["params"]
    # a run directory is accepted wherever a CHECKPOINT is
    assert main(["eval", str(d / "run"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 450 and abs(res["top1"] - rep["compressed"]["top1"]) < 1e-6


def test_demo_baseline_comes_from_cache_second_time(demo_run, tmp_path):
    rep, d = demo_run
    cfg = DemoConfig(out=str(tmp_path / "run2"), engine="torch", train_epochs=6, finetune_epochs=1,
                     progress=False, cache_dir=str(d / "cache"))
    rep2 = run_demo(cfg)
    assert rep2["task"]["baseline_source"] == "cache"
    assert rep2["baseline"]["top1"] == rep["baseline"]["top1"]
