"""``netcarve sparsify`` and ``netcarve run RECIPE.yaml`` end to end on the built-in digits data."""

import json

import pytest
import torch
import yaml

import netcarve
from netcarve.cli.main import main
from netcarve.sparsity import make_scheme


@pytest.fixture(scope="module")
def trained_lenet(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    assert main(["train", "lenet", "--epochs", "4", "--batch-size", "64", "--out", str(d), "--no-progress",
                 "--json"]) == 0
    return d


def _run(capsys, args):
    capsys.readouterr()
    rc = main(args)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_pattern_connectivity_admm_run_dir_and_recipe_replay(trained_lenet, tmp_path, capsys):
    out = tmp_path / "pat"
    rep = _run(capsys, ["sparsify", str(trained_lenet), "--scheme", "pattern", "--patterns", "4", "--connectivity",
                        "2", "--algorithm", "admm", "--option", "rho=0.05", "--finetune-epochs", "2", "--distill",
                        "--batch-size", "64", "--out", str(out), "--no-progress", "--json"])
    s = rep["task"]["sparsity"]
    assert set(s["layers"]) == {"conv2.weight", "conv3.weight"}  # conv1 first (dense), fc last (dense)
    assert s["algorithm"] == "admm" and s["options"]["rho"] == 0.05
    # the library was extracted from the model and written into the plan that was run
    plan = yaml.safe_load((out / "recipe.yaml").read_text())["plan"]
    lib = plan["rules"][0]["options"]["library"]
    assert len(lib) == 4 and "library_size" not in plan["rules"][0]["options"]
    model = netcarve.load(out)  # dense weights with zeros, the model's own keys
    assert set(model.state_dict()) == set(netcarve.load(trained_lenet).state_dict())
    scheme = make_scheme("pattern", library=lib)
    for name in ("conv2.weight", "conv3.weight"):
        w = model.get_parameter(name)
        scheme.validate(w != 0)  # every kernel is one of the 4 patterns or removed
        kernels_alive = (w != 0).flatten(2).any(-1).float().mean().item()
        assert kernels_alive == pytest.approx(0.5, abs=0.02)  # connectivity 2x
        assert s["layers"][name]["sparsity"] == pytest.approx(1 - 0.5 * 4 / 9, abs=0.02)
    assert rep["compressed"]["top1"] > 70
    assert (out / "admm" / "regularize" / "metrics.jsonl").is_file()
    md = (out / "report.md").read_text()
    assert "## Sparsity" in md and "| conv2.weight | pattern | 0.500 |" in md and "| fc.weight | dense |" in md
    meta = json.loads((out / "manifest.json").read_text())["metadata"]
    assert meta["sparsity"]["layers"]["conv2.weight"]["scheme"] == "pattern"
    # replaying the saved recipe reproduces the same weights
    rep2 = _run(capsys, ["run", str(out / "recipe.yaml"), "--out", str(tmp_path / "replay"), "--no-progress", "--json"])
    again = netcarve.load(tmp_path / "replay")
    for k, v in model.state_dict().items():
        assert torch.allclose(v, again.state_dict()[k], atol=1e-6), k
    assert rep2["compressed"]["top1"] == pytest.approx(rep["compressed"]["top1"])
    assert main(["eval", str(out), "--json"]) == 0


def test_nm_oneshot_without_training(trained_lenet, tmp_path, capsys):
    rep = _run(capsys, ["sparsify", str(trained_lenet), "--scheme", "nm", "--n", "2", "--m", "4",
                        "--include-first-last", "--out", str(tmp_path / "nm"), "--no-progress", "--json"])
    s = rep["task"]["sparsity"]
    assert set(s["layers"]) == {"conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"}
    model = netcarve.load(tmp_path / "nm")
    for name in s["layers"]:
        w = model.get_parameter(name).detach().reshape(model.get_parameter(name).shape[0], -1)
        cols = w.shape[1] - w.shape[1] % 4
        runs = (w[:, :cols] != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(runs.max()) <= 2, name
    assert s["nonzero_macs"] < s["dense_macs"]


def test_block_feature_distillation_in_the_masked_fine_tune(trained_lenet, tmp_path, capsys):
    out = tmp_path / "fkd"
    rep = _run(capsys, ["sparsify", str(trained_lenet), "--scheme", "unstructured", "--sparsity", "0.7",
                        "--finetune-epochs", "1", "--distill", "logit+feature", "--feature-weight", "2",
                        "--batch-size", "64", "--out", str(out), "--no-progress", "--json"])
    distill = yaml.safe_load((out / "recipe.yaml").read_text())["distill"]
    assert (distill["kind"], distill["hints"], distill["adapter_init"], distill["feature_weight"]) == (
        "logit+feature", "blocks", "lstsq", 2.0)
    metrics = [json.loads(x) for p in sorted(out.rglob("metrics.jsonl")) for x in p.read_text().splitlines()]
    assert metrics and all(m["train_feature"] > 0.0 for m in metrics)
    assert rep["compressed"]["top1"] > 70


def test_logit_mse_distillation_in_the_masked_fine_tune(trained_lenet, tmp_path, capsys):
    out = tmp_path / "mse"
    _run(capsys, ["sparsify", str(trained_lenet), "--scheme", "unstructured", "--sparsity", "0.7",
                  "--finetune-epochs", "1", "--distill", "logit_mse", "--batch-size", "64", "--out", str(out),
                  "--no-progress", "--json"])
    distill = yaml.safe_load((out / "recipe.yaml").read_text())["distill"]
    assert (distill["kind"], distill["alpha"]) == ("logit_mse", 1.0)
    metrics = [json.loads(x) for p in sorted(out.rglob("metrics.jsonl")) for x in p.read_text().splitlines()]
    assert metrics and all(m["train_kd"] > 0.0 and "train_feature" not in m for m in metrics)


def test_bsp_on_the_gru_gates(tmp_path, capsys):
    rep = _run(capsys, ["sparsify", "gru", "--scheme", "bsp", "--sparsity", "0.75", "--block-rows", "16",
                        "--row-sparsity", "0.25", "--types", "GRU", "--out", str(tmp_path / "bsp"), "--no-progress",
                        "--json"])
    layers = rep["task"]["sparsity"]["layers"]
    assert layers and all(v["scheme"] == "bsp" for v in layers.values())
    model = netcarve.load(tmp_path / "bsp")
    from netcarve.sparsity import make_scheme

    s = make_scheme("bsp", block_rows=16, row_sparsity=0.25)
    for name in layers:
        w = model.get_parameter(name).detach()
        s.validate(w != 0, 0.75)
        assert int((w.reshape(w.shape[0], -1) == 0).all(1).sum()) == w.shape[0] - round(0.75 * w.shape[0])


def test_recipe_with_rules_per_layer_type(trained_lenet, tmp_path, capsys):
    recipe = {
        "model": str(trained_lenet), "out": str(tmp_path / "r"),
        "plan": {"rules": [{"scheme": "unstructured", "sparsity": 0.5, "types": ["Conv2d"]},
                           {"scheme": "block", "options": {"block": [2, 8]}, "sparsity": 0.75, "layers": ["fc"]}],
                 "skip_first_last": False},
        "algorithm": "agp", "algorithm_options": {"end": 0.5},
        "finetune": {"epochs": 2, "lr": 0.01, "batch_size": 64},
    }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    rep = _run(capsys, ["run", str(p), "--no-progress", "--json"])
    layers = rep["task"]["sparsity"]["layers"]
    assert layers["conv1.weight"]["scheme"] == "unstructured" and layers["fc.weight"]["scheme"] == "block"
    assert layers["conv1.weight"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert layers["fc.weight"]["sparsity"] == pytest.approx(0.75, abs=0.05)


@pytest.mark.parametrize("args,msg", [
    (["--scheme", "nm", "--n", "2"], "--scheme nm needs --n and --m"),
    (["--scheme", "pattern", "--sparsity", "0.5"], "does not take --sparsity"),
    (["--scheme", "pattern", "--connectivity", "0.5"], "kernel reduction factor"),
    (["--scheme", "block", "--block", "4by4", "--sparsity", "0.5"], "--block must look like"),
    (["--scheme", "unstructured"], "needs a sparsity level"),
    (["--scheme", "unstructured", "--sparsity", "0.5", "--balanced"], "does not take --balanced"),
    (["--scheme", "block", "--sparsity", "0.5", "--row-sparsity", "0.5"], "does not take --row-sparsity"),
    (["--scheme", "bsp", "--sparsity", "0.5", "--block-rows", "0"], "'block_rows' must be >= 1"),
    (["--scheme", "unstructured", "--sparsity", "0.5", "--algorithm", "magic"], "unknown sparsity algorithm"),
    (["--scheme", "nm", "--n", "2", "--m", "4", "--algorithm", "agp", "--finetune-epochs", "1"], "fix their own"),
    (["--scheme", "unstructured", "--sparsity", "0.5", "--algorithm", "admm"], "needs at least 1 epoch"),
    (["--scheme", "unstructured", "--sparsity", "0.5", "--option", "rho"], "KEY=VALUE"),
    (["--scheme", "unstructured", "--sparsity", "0.5", "--layers", "conv9"], "no weight 'conv9'"),
    (["--scheme", "pattern", "--layers", "fc"], "cannot apply to fc.weight"),
])
def test_bad_options_are_clear(args, msg, tmp_path, capsys):
    rc = main(["sparsify", "lenet", "--out", str(tmp_path / "x"), "--no-progress", *args])
    assert rc == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("text,msg", [
    ("model: lenet\nout: x\n", "missing required field 'plan'"),
    ("model: lenet\nout: x\nplan: {rules: [{scheme: unstructured, sparsity: 0.5}]}\nepochs: 3\n", "unknown field(s) epochs"),
    ("model: lenet\nout: x\nplan: {rules: [{scheme: unstructured, sparsity: 0.5}]}\nfinetune: {epoch: 3}\n",
     "unknown finetune field(s) epoch"),
    ("model: [lenet\n", "not valid YAML"),
    ("model: lenet\nout: x\nplan: {rules: [{scheme: unstructured}]}\n", "needs a sparsity level"),
])
def test_bad_recipes_are_clear(text, msg, tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    assert main(["run", str(p)]) == 2
    assert msg in capsys.readouterr().err


def test_allocation_flag_spreads_the_level_and_is_saved_in_the_recipe(trained_lenet, tmp_path, capsys):
    out = tmp_path / "lamp"
    rep = _run(capsys, ["sparsify", str(trained_lenet), "--scheme", "unstructured", "--sparsity", "0.8",
                        "--allocation", "lamp", "--min-density", "0.05", "--include-first-last", "--out", str(out),
                        "--no-progress", "--json"])
    layers = rep["task"]["sparsity"]["layers"]
    assert len({round(v["sparsity"], 4) for v in layers.values()}) > 1  # not the same level everywhere
    numel = sum(v["numel"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    assert numel - nonzero == round(0.8 * numel)  # ... but the rule's total
    assert all(v["nonzero"] >= 0.05 * v["numel"] for v in layers.values())
    plan = yaml.safe_load((out / "recipe.yaml").read_text())["plan"]
    assert plan["allocation"] == "lamp" and plan["min_density"] == 0.05
    capsys.readouterr()
    assert main(["sparsify", str(trained_lenet), "--scheme", "unstructured", "--sparsity", "0.8", "--allocation",
                 "lamb", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "unknown sparsity allocation 'lamb'" in capsys.readouterr().err
