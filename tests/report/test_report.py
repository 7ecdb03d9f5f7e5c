import json

from netcarve.report import ModelStats, build_report, format_table, read_report, write_report


def _rep():
    base = ModelStats("baseline", top1=90.0, params=1000, macs=4_000_000, size_bytes=8000,
                      latency_ms={"p50": 2.0, "p90": 2.5})
    comp = ModelStats("compressed", top1=89.5, params=400, macs=2_000_000, size_bytes=3200,
                      latency_ms={"p50": 1.25, "p90": 1.5})
    mid = ModelStats("pruned, no fine-tune", top1=60.0, macs=2_000_000, latency_ms={"p50": 1.3, "p90": 1.6})
    return build_report(baseline=base, compressed=comp, points=[base, mid, comp],
                        measurement={"engine": "onnxruntime", "threads": 2, "batch": 1},
                        env={"cpu_model": "TestCPU"}, task={"model": "lenet", "dataset": "digits"},
                        command="netcarve demo")


def test_summary_ratios():
    s = _rep()["summary"]
    assert s["macs_reduction"] == 2.0
    assert s["params_reduction"] == 2.5
    assert s["size_reduction"] == 2.5
    assert s["speedup"] == 1.6
    assert abs(s["top1_delta_pp"] + 0.5) < 1e-9


def test_table_contains_values():
    t = format_table(_rep())
    assert "90.00%" in t and "89.50%" in t and "1.60x speedup" in t and "-0.50 pp" in t
    assert "onnxruntime" in t and "TestCPU" in t
    md = format_table(_rep(), markdown=True)
    assert md.startswith("| model | top-1 |")


def test_write_report_files(tmp_path):
    paths = write_report(_rep(), tmp_path)
    rep = read_report(tmp_path)
    assert rep["schema"] == "netcarve.report/1"
    assert rep["compressed"]["latency_ms"]["p50"] == 1.25
    assert json.loads((tmp_path / "report.json").read_text()) == rep
    assert "pruned, no fine-tune" in (tmp_path / "report.md").read_text()
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(tmp_path.glob(".*tmp*"))
