import json

import pytest

import netcarve
from netcarve.cli.main import main
from netcarve.train import read_train_state


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
               "--distill", "--ema", "0.99", "--cutmix", "1.0", "--engine", "torch", "--latency-processes", "1", "--batch", "8",
               "--out", str(out), "--no-progress", "--json"])
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
    ft = json.loads((out / "finetune" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_top1_live" in ft  # --ema reached the fine-tune: the average was validated beside the live weights
    assert read_train_state(out / "finetune")["config"]["cutmix"] == 1.0  # --cutmix reached it too
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(rep["compressed"]["top1"])


def test_prune_cli_block_feature_distillation(trained_lenet, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "fkd"
    rc = main(["prune", str(trained_lenet), "--ratio", "0.5", "--finetune-epochs", "1", "--distill",
               "logit+feature", "--feature-weight", "4", "--engine", "torch", "--latency-processes", "1",
               "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    ft = json.loads((out / "finetune" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ft["train_feature"] > 0.0 and "train_kd" in ft  # both losses were part of the fine-tune
    from netcarve.train import read_train_state

    kd = read_train_state(out / "finetune")["kd"]
    assert (kd["kind"], kd["hints"], kd["adapter_init"], kd["feature_weight"]) == (
        "logit+feature", "blocks", "lstsq", 4.0)
    assert rep["compressed"]["top1"] > 50
    with pytest.raises(SystemExit):
        main(["prune", str(trained_lenet), "--ratio", "0.5", "--distill", "feature", "--out", str(tmp_path / "x")])


def test_prune_cli_logit_mse_distillation(trained_lenet, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "mse"
    assert main(["prune", str(trained_lenet), "--ratio", "0.5", "--finetune-epochs", "1", "--distill", "logit_mse",
                 "--engine", "torch", "--latency-processes", "1", "--out", str(out), "--no-progress", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    from netcarve.train import read_train_state

    kd = read_train_state(out / "finetune")["kd"]
    assert (kd["kind"], kd["alpha"]) == ("logit_mse", 1.0)
    assert json.loads((out / "finetune" / "metrics.jsonl").read_text().splitlines()[-1])["train_kd"] > 0.0
    assert "logit-MSE KD" in json.dumps(rep)
    assert rep["compressed"]["top1"] > 50


@pytest.mark.parametrize("engine", ["torch", "netcarve"])
def test_prune_without_finetune_measures_two_points(trained_lenet, tmp_path, capsys, engine):
    capsys.readouterr()
    rc = main(["prune", str(trained_lenet), "--macs-reduction", "2", "--engine", engine, "--latency-processes",
               "1", "--out", str(tmp_path / "p"), "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["measurement"]["engine"] == engine
    assert all(p["latency_ms"]["p50"] > 0 for p in rep["points"])
    assert [p["label"] for p in rep["points"]] == ["baseline", "compressed"]
    assert rep["summary"]["macs_reduction"] >= 2.0


def test_prune_layer_ratios_cli(trained_lenet, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["prune", str(trained_lenet), "--macs-reduction", "2", "--layer-ratio", "conv1=0",
               "--layer-ratio", "conv2=0.75", "--engine", "torch", "--latency-processes", "1",
               "--out", str(tmp_path / "p"), "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    widths = rep["task"]["kept_widths"]
    assert widths["conv1"][0] == widths["conv1"][1] and widths["conv2"] == [widths["conv2"][1] // 4, widths["conv2"][1]]
    assert rep["task"]["layer_ratios"] == {"conv1": 0.0, "conv2": 0.75}
    assert rep["summary"]["macs_reduction"] >= 2.0 and "layer ratios conv1=0, conv2=0.75" in rep["task"]["method"]


def test_prune_reconstruct_refits_against_the_baseline(trained_lenet, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "r"
    rc = main(["prune", str(trained_lenet), "--ratio", "0.6", "--reconstruct", "3", "--engine", "torch",
               "--latency-processes", "1", "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    rec = rep["task"]["reconstruct"]
    assert rec["num_batches"] == 3 and len(rec["layers"]) >= 3
    assert rec["mean_error_after"] < rec["mean_error_before"]
    assert "least-squares reconstruction (3 batches)" in rep["task"]["method"]
    assert "BN recalibration" not in rep["task"]["method"]
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(rep["compressed"]["top1"])


@pytest.mark.parametrize("args,msg", [
    (["--scheme", "nm", "--ratio", "0.5"], "`netcarve sparsify --scheme nm`"),
    (["--scheme", "depth", "--ratio", "0.5", "--round-to", "8"], "--scheme depth does not take --round-to"),
    (["--scheme", "depth", "--latency-ms", "1"], "--scheme depth does not take --latency-ms"),
    (["--ratio", "1.5"], "--ratio must be in (0, 1)"),
    (["--macs-reduction", "0.5"], "--macs-reduction must be > 1"),
    ([], "exactly one of --macs-reduction, --ratio and --latency-ms"),
    (["--latency-ms", "0"], "--latency-ms must be a positive number"),
    (["--latency-ms", "nan"], "--latency-ms must be a positive number"),
    (["--ratio", "0.5", "--distill"], "--distill needs --finetune-epochs"),
    (["--ratio", "0.5", "--ema", "0.99"], "--ema averages the fine-tuned weights: it needs --finetune-epochs"),
    (["--ratio", "0.5", "--finetune-epochs", "1", "--ema", "1"], "--ema must be a decay in [0, 1)"),
    (["--ratio", "0.5", "--cutmix", "1"], "--cutmix mixes the fine-tuning batches: it needs --finetune-epochs"),
    (["--ratio", "0.5", "--finetune-epochs", "1", "--mixup", "-1"], "--mixup must be a Beta parameter >= 0"),
    (["--ratio", "0.5", "--criterion", "nope"], "nope"),
    (["--ratio", "0.5", "--layer-ratio", "conv1"], "--layer-ratio 'conv1': expected PATTERN=RATIO"),
    (["--ratio", "0.5", "--layer-ratio", "conv1=1"], "expected PATTERN=RATIO with RATIO in [0, 1)"),
    (["--ratio", "0.5", "--layer-ratio", "nothere=0.5"], "'nothere' matches no prunable channel group"),
    (["--scheme", "depth", "--ratio", "0.5", "--layer-ratio", "conv1=0.5"], "does not take --layer-ratio"),
    (["--scheme", "depth", "--ratio", "0.5", "--reconstruct", "2"], "--reconstruct refits the layers after channel removal"),
    (["--ratio", "0.5", "--reconstruct", "-1"], "--reconstruct must be a number of batches >= 0"),
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


def _fake_measure(engine, threads, options):
    """Latency = 0.01 ms + 1 ms per MMAC: a deterministic stand-in for the engine during the search."""
    from netcarve.measure import count_model

    def run(model, x):
        return 0.01 + count_model(model.eval(), x).total_macs / 1e6

    return run


def test_prune_latency_target_cli_reports_the_search(tmp_path, capsys, monkeypatch):
    import netcarve.compact.latency_target as lt
    from netcarve.measure import count_model

    monkeypatch.setattr(lt, "_default_measure", _fake_measure)
    model = netcarve.create_model("lenet")
    target = 0.5 * (0.01 + count_model(model, netcarve.models.example_input(model)).total_macs / 1e6)
    capsys.readouterr()
    rc = main(["prune", "lenet", "--latency-ms", f"{target:.6f}", "--round-to", "8", "--engine", "torch",
               "--threads", "1", "--latency-processes", "1", "--bn-batches", "2", "--out", str(tmp_path / "p"),
               "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    lt_rep = rep["task"]["latency_target"]
    assert f"latency <= {float(f'{target:.6f}'):g} ms on torch, batch 1, 1 threads" in rep["task"]["method"]
    assert lt_rep["target_ms"] == pytest.approx(target, rel=1e-5) and lt_rep["engine"] == "torch"
    assert lt_rep["met"] and lt_rep["chosen_latency_ms"] <= lt_rep["target_ms"]
    assert [t["role"] for t in lt_rep["trials"][:2]] == ["baseline", "max"] and len(lt_rep["trials"]) >= 4
    assert rep["task"]["prune_ratio"] == lt_rep["chosen_ratio"] > 0
    # the verdict comes from the flow's own final measurement of the compressed model
    assert lt_rep["final_p50_ms"] == rep["compressed"]["latency_ms"]["p50"]
    assert lt_rep["met_in_final"] == (lt_rep["final_p50_ms"] <= lt_rep["target_ms"])
    assert rep["summary"]["macs_reduction"] >= 1.9
    assert "Latency target" in (tmp_path / "p" / "report.md").read_text()


@pytest.mark.slow
def test_prune_latency_target_cli_real_engine_baseline_already_fast(tmp_path, capsys):
    capsys.readouterr()
    rc = main(["prune", "lenet", "--latency-ms", "1000", "--engine", "onnxruntime", "--threads", "1",
               "--latency-processes", "1", "--bn-batches", "1", "--out", str(tmp_path / "p"), "--no-progress",
               "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    rep = json.loads(captured.out)
    lt_rep = rep["task"]["latency_target"]
    assert lt_rep["engine"] == "onnxruntime" and len(lt_rep["trials"]) == 1 and lt_rep["chosen_ratio"] == 0
    assert "already meets the target" in lt_rep["note"] and "already meets the target" in captured.err
    assert lt_rep["met_in_final"] and rep["summary"]["macs_reduction"] == 1.0


def test_prune_latency_target_unreachable_and_exclusive(tmp_path, capsys, monkeypatch):
    import netcarve.compact.latency_target as lt

    monkeypatch.setattr(lt, "_default_measure", _fake_measure)
    rc = main(["prune", "lenet", "--latency-ms", "0.001", "--engine", "torch", "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot reach 0.001 ms on torch" in err and "best reachable is 0.01" in err
    with pytest.raises(SystemExit) as e:
        main(["prune", "lenet", "--latency-ms", "1", "--ratio", "0.5", "--out", str(tmp_path / "y")])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.data
def test_prune_depth_removes_blocks_and_saves_them(data_root, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "depth"
    rc = main(["prune", "resnet20", "--weights", "pretrained", "--data-dir", str(data_root), "--scheme", "depth",
               "--macs-reduction", "1.3", "--bn-batches", "2", "--batch-size", "64", "--test-subset", "200",
               "--engine", "torch", "--latency-processes", "1", "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    removed = rep["task"]["removed_blocks"]
    assert removed and rep["summary"]["macs_reduction"] >= 1.3 and "depth pruning" in rep["task"]["method"]
    model = netcarve.load(out)
    assert model.netcarve_dropped_blocks == removed
    assert sum(p.numel() for p in model.parameters()) == rep["compressed"]["params"]


def test_prune_depth_on_a_model_without_blocks_is_a_clear_error(trained_lenet, tmp_path, capsys):
    rc = main(["prune", str(trained_lenet), "--scheme", "depth", "--ratio", "0.5", "--engine", "torch",
               "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "has no removable residual block" in capsys.readouterr().err


def test_prune_hidden_size_cli(data_root, tmp_path, capsys):
    """--hidden-size reaches the channel groups: a zoo transformer's model width is pruned too, and saved / loaded."""
    capsys.readouterr()
    common = ["prune", "transformer_tiny", "--data-dir", str(data_root), "--ratio", "0.5", "--bn-batches", "0",
              "--batch-size", "64", "--test-subset", "200", "--engine", "torch", "--latency-processes", "1",
              "--no-progress", "--json"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*common, "--hidden-size", "--out", str(tmp_path / "hidden")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["task"]["kept_widths"]["embed"] == [32, 64] and "embed" not in plain["task"]["kept_widths"]
    assert rep["summary"]["macs_reduction"] > plain["summary"]["macs_reduction"]
    model = netcarve.load(tmp_path / "hidden")
    assert model.embed.out_features == 32 and model.blocks[0].attn.qkv.in_features == 32
    assert sum(p.numel() for p in model.parameters()) == rep["compressed"]["params"]
    rc = main(["prune", "transformer_tiny", "--data-dir", str(data_root), "--ratio", "0.5", "--hidden-size",
               "--algorithm", "sfp", "--finetune-epochs", "1", "--engine", "torch", "--out", str(tmp_path / "x")])
    assert rc == 2 and "hidden size" in capsys.readouterr().err
