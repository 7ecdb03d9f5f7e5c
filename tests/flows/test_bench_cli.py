"""netcarve bench: engines side by side in their own processes, netcarve per-layer rows, clear skips."""

import json

from netcarve.cli.main import main


def test_bench_json_document(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NETCARVE_DEEPSPARSE_PYTHON", str(tmp_path / "no-such-python"))
    rc = main(["bench", "resnet8", "--batch", "2", "--threads", "1", "--repeats", "3", "--rounds", "1",
               "--engines", "torch", "netcarve-dense", "netcarve", "deepsparse", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["engines"]) == {"torch", "netcarve-dense", "netcarve"}
    assert "deepsparse" in doc["skipped"] and "NETCARVE_DEEPSPARSE_PYTHON" in doc["skipped"]["deepsparse"]
    for v in doc["engines"].values():
        assert v["latency_ms"] > 0 and v["max_abs_diff"] < 1e-3
        assert v["speedup_vs_fastest_dense"] > 0  # relative to torch, the only dense engine here
    assert doc["fastest_dense"]["engine"] == "torch"
    assert doc["batch"] == 2 and doc["threads"] == 1
    assert doc["env"]["gemm_fp32_gflops"] > 0 and doc["env"]["threads"] == 1
    tuned = [r for r in doc["layers"] if "kernel" in r]
    assert len(tuned) == 10  # resnet8: 7 3x3 convs + 2 1x1 shortcut convs + the linear head
    for r in tuned:
        assert r["kernel"] in ("sparse", "dense", "direct") and r["macs"] > 0 and r["latency_ms"] >= 0
        times = {k: r[f"{k}_ms"] for k in ("sparse", "dense", "direct") if r.get(f"{k}_ms") is not None}
        assert "sparse" not in times  # a dense model: the sparse kernel is not offered (SPARSE_MAX_DENSITY)
        # each layer's fastest kernel, unless the whole-plan check kept every layer on one kernel family
        family = {"tuned_aten": "dense", "tuned_direct": "direct"}.get((doc["plan_check"] or {}).get("chosen"))
        assert r["kernel"] == (family if family in times else min(times, key=times.get))
        assert "direct" in times  # netcarve's dense conv kernel, and for the linear head its dense panel kernel


def test_bench_text_and_errors(capsys):
    assert main(["bench", "lenet", "--engines", "netcarve", "--repeats", "2", "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "netcarve per layer" in out and "GEMM ceiling" in out
    assert main(["bench", "lenet", "--engines", "tensorrt"]) == 2
    assert "unknown engine" in capsys.readouterr().err


def test_bench_netcarve_gen_engine_on_a_sparse_checkpoint(tmp_path, capsys):
    import pytest
    import torch

    import netcarve
    from netcarve.runtime import codegen

    ok, why = codegen.host_supported()
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    m = netcarve.create_model("lenet").eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_(torch.rand(mod.weight.shape) < 0.2)
    netcarve.save(m, tmp_path / "sparse")
    rc = main(["bench", str(tmp_path / "sparse"), "--batch", "4", "--threads", "1", "--repeats", "3", "--rounds", "1",
               "--engines", "netcarve-gen", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    e = doc["engines"]["netcarve-gen"]
    assert e["latency_ms"] > 0 and e["max_abs_diff"] < 1e-3
    assert any(n.startswith("codegen:") for n in e["notes"])


def test_run_bench_with_inputs_by_argument_name():
    import torch

    from netcarve.flows.bench import run_bench

    class ByName(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask):
            return self.fc((self.emb(input_ids) * attention_mask[..., None]).mean(1))

    x = {"input_ids": torch.randint(0, 20, (3, 5)), "attention_mask": torch.ones(3, 5)}
    doc = run_bench(ByName().eval(), x, engines=["torch", "netcarve"], threads=1, repeats=3, rounds=1)
    assert doc["batch"] == 3 and set(doc["engines"]) == {"torch", "netcarve"}
    assert doc["engines"]["netcarve"]["max_abs_diff"] < 1e-4
