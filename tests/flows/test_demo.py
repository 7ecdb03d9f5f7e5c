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


def test_profile_accepts_the_run_directory(demo_run, capsys):
    rep, d = demo_run
    assert main(["profile", str(d / "run"), "--batch", "2", "--threads", "1", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["total"]["macs"] == 2 * rep["compressed"]["macs"] and prof["total"]["params"] == rep["compressed"]["params"]
    assert {"name", "type", "macs", "params", "latency_ms"} <= set(prof["layers"][0])
    assert prof["total"]["latency_ms"] > 0 and prof["env"]["threads"] == 1


def test_demo_cli_prints_table_or_json(monkeypatch, capsys):
    from netcarve.flows import demo as demo_flow
    from netcarve.report import ModelStats, build_report

    seen = {}

    def fake_run(cfg, command=None):
        seen["cfg"] = cfg
        b = ModelStats("baseline", top1=90.0, macs=100, latency_ms={"p50": 2.0, "p90": 2.0})
        c = ModelStats("compressed", top1=89.0, macs=50, latency_ms={"p50": 1.0, "p90": 1.0})
        return build_report(baseline=b, compressed=c, points=[b, c], env={},
                            measurement={"engine": "torch", "threads": 2, "batch": 64}, task={}, command=command)

    monkeypatch.setattr(demo_flow, "run_demo", fake_run)
    assert main(["demo", "--macs-reduction", "3", "--batch", "8"]) == 0
    assert "2.00x speedup" in capsys.readouterr().out
    assert seen["cfg"].macs_reduction == 3.0 and seen["cfg"].batch == 8 and seen["cfg"].dataset == "digits"
    assert main(["demo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["macs_reduction"] == 2.0
    assert seen["cfg"].progress is False


@pytest.mark.data
@pytest.mark.slow
def test_demo_cifar10_starts_from_the_pretrained_resnet(data_root, tmp_path):
    cfg = DemoConfig(dataset="cifar10", data_dir=str(data_root), out=str(tmp_path / "run"), engine="torch",
                     finetune_epochs=1, train_subset=512, test_subset=1000, latency_processes=1,
                     progress=False, cache_dir=str(tmp_path / "cache"))
    rep = run_demo(cfg)
    assert rep["task"]["model"] == "resnet20" and rep["task"]["baseline_source"] == "pretrained"
    assert rep["baseline"]["top1"] > 88  # pretrained ResNet-20 on a balanced 1000-image test subset
    assert rep["summary"]["macs_reduction"] >= 2.0
    assert rep["compressed"]["top1"] > rep["points"][1]["top1"]  # distillation recovered accuracy
    assert rep["measurement"]["batch"] == 1


def test_demo_resume_continues_the_fine_tune(demo_run, tmp_path):
    rep, d = demo_run
    out = tmp_path / "run"
    base = dict(out=str(out), engine="torch", train_epochs=6, progress=False, cache_dir=str(d / "cache"),
                latency_processes=1)
    run_demo(DemoConfig(finetune_epochs=1, **base))
    first = (out / "finetune" / "metrics.jsonl").read_text().splitlines()
    rep2 = run_demo(DemoConfig(finetune_epochs=2, resume=True, **base))
    lines = (out / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert json.loads(lines[0]) == json.loads(first[0])  # epoch 1 was not trained again
    assert rep2["compressed"]["top1"] > 50
