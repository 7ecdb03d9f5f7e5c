"""Run reports: ``report.json`` (schema ``netcarve.report/1``, see docs/report-schema.md), ``report.md``
(the same table) and ``pareto.png`` (accuracy against measured latency for every point of the run)."""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils import atomic_write

SCHEMA = "netcarve.report/1"


@dataclass
class ModelStats:
    """One measured model: accuracy (percent), size, cost and latency at the report's batch and threads."""

    label: str
    top1: float | None = None
    top5: float | None = None
    loss: float | None = None
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    latency_ms: dict[str, float] | None = None  # {"p50": .., "p90": ..}
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def build_report(
    *,
    baseline: ModelStats,
    compressed: ModelStats | None,
    points: list[ModelStats],
    measurement: dict[str, Any],
    env: dict[str, Any],
    task: dict[str, Any],
    command: str | None = None,
) -> dict:
    """Assemble the report dict. ``measurement`` = {"engine", "threads", "batch", ...}."""
    rep: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "task": task,
        "measurement": measurement,
        "baseline": baseline.to_dict(),
        "compressed": compressed.to_dict() if compressed else None,
        "points": [p.to_dict() for p in points],
        "env": env,
    }
    if compressed is not None:
        lb = (baseline.latency_ms or {}).get("p50")
        lc = (compressed.latency_ms or {}).get("p50")
        rep["summary"] = {
            "top1_delta_pp": None
            if baseline.top1 is None or compressed.top1 is None
            else compressed.top1 - baseline.top1,
            "macs_reduction": _ratio(baseline.macs, compressed.macs),
            "params_reduction": _ratio(baseline.params, compressed.params),
            "size_reduction": _ratio(baseline.size_bytes, compressed.size_bytes),
            "speedup": _ratio(lb, lc),
        }
    return rep


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{v:.2f}%"
    if kind == "int":
        return f"{v:,}"
    if kind == "mega":
        return f"{v / 1e6:.2f}M"
    if kind == "bytes":
        return f"{v / 1024:.1f} KiB" if v < 1024 * 1024 else f"{v / 1024 / 1024:.2f} MiB"
    if kind == "ms":
        return f"{v:.3f}"
    if kind == "x":
        return f"{v:.2f}x"
    return str(v)


def format_table(rep: dict, markdown: bool = False) -> str:
    """The before/after table of a report as fixed-width text (or a markdown table)."""
    m = rep["measurement"]
    rows = [rep["baseline"]] + ([rep["compressed"]] if rep.get("compressed") else [])
    head = ["model", "top-1", "params", "MACs", "file size", "p50 ms", "p90 ms"]
    body = []
    for r in rows:
        lat = r.get("latency_ms") or {}
        body.append(
            [
                r["label"],
                _fmt(r.get("top1"), "pct"),
                _fmt(r.get("params"), "int"),
                _fmt(r.get("macs"), "mega"),
                _fmt(r.get("size_bytes"), "bytes"),
                _fmt(lat.get("p50"), "ms"),
                _fmt(lat.get("p90"), "ms"),
            ]
        )
    s = rep.get("summary")
    if s:
        body.append(
            [
                "change",
                "-" if s["top1_delta_pp"] is None else f"{s['top1_delta_pp']:+.2f} pp",
                _fmt(s["params_reduction"], "x") + " fewer",
                _fmt(s["macs_reduction"], "x") + " fewer",
                _fmt(s["size_reduction"], "x") + " smaller",
                _fmt(s["speedup"], "x") + " speedup",
                "",
            ]
        )
    caption = (
        f"latency: engine {m.get('engine')}, batch {m.get('batch')}, {m.get('threads')} threads, "
        f"{m.get('method') or 'min over rounds of medians'}; CPU {rep.get('env', {}).get('cpu_model', '?')}"
    )
    target = (rep.get("task") or {}).get("latency_target")
    if target and target.get("verdict"):
        caption += f"\n{target['verdict']}"
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + f"\n\n{caption}\n"
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt_row = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt_row(head), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in body]
    return "\n".join(lines) + f"\n{caption}"


def plot_points(rep: dict, path: str | os.PathLike) -> Path:
    """Scatter of top-1 against measured p50 latency for every point of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in rep["points"] if p.get("top1") is not None and (p.get("latency_ms") or {}).get("p50")]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for p in pts:
        x, y = p["latency_ms"]["p50"], p["top1"]
        ax.scatter([x], [y], s=36)
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    m = rep["measurement"]
    ax.set_xlabel(f"p50 latency (ms), {m.get('engine')}, batch {m.get('batch')}, {m.get('threads')} threads")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{rep['task'].get('model', '')} on {rep['task'].get('dataset', '')}")
    ax.grid(alpha=0.3)
    if pts:
        xs = [p["latency_ms"]["p50"] for p in pts]
        ax.set_xlim(0, max(xs) * 1.25)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(rep: dict, run_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and pareto.png into ``run_dir``."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    with atomic_write(d / "report.json", "w") as f:
        json.dump(rep, f, indent=1)
    md = [f"# netcarve report: {rep['task'].get('model', '')} on {rep['task'].get('dataset', '')}", ""]
    if rep.get("command"):
        md += [f"Command: `{rep['command']}`", ""]
    md += [format_table(rep, markdown=True), "", "![accuracy vs latency](pareto.png)", ""]
    if rep.get("points"):
        md += ["## Points", "", "| point | top-1 | MACs | p50 ms |", "|---|---|---|---|"]
        for p in rep["points"]:
            md.append(
                f"| {p['label']} | {_fmt(p.get('top1'), 'pct')} | {_fmt(p.get('macs'), 'mega')} | "
                f"{_fmt((p.get('latency_ms') or {}).get('p50'), 'ms')} |"
            )
        md.append("")
    md += _latency_target_md((rep.get("task") or {}).get("latency_target"))
    md += _sparsity_md((rep.get("task") or {}).get("sparsity"))
    env = rep.get("env") or {}
    md += ["## Environment", "", "```", json.dumps(env, indent=1), "```", ""]
    with atomic_write(d / "report.md", "w") as f:
        f.write("\n".join(md))
    png = plot_points(rep, d / "pareto.png")
    return {"json": d / "report.json", "md": d / "report.md", "png": png}


def _latency_target_md(t: dict | None) -> list[str]:
    """The latency-target search (``task.latency_target``, from ``netcarve prune --latency-ms``) as markdown."""
    if not t:
        return []
    md = ["## Latency target", "",
          f"Target p50 <= {t['target_ms']:g} ms on {t['engine']} (batch {t['batch']}, {t['threads']} threads). "
          f"{t.get('verdict', '')}.", ""]
    if t.get("note"):
        md += [t["note"], ""]
    md += [f"Search: {len(t['trials'])} candidate(s) timed in {t.get('seconds')} s; a candidate's latency is the "
           f"{t.get('statistic', 'min over its measurements')}.", "",
           "| # | role | ratio | MACs reduction | latency ms | measurements ms | meets |", "|---|---|---|---|---|---|---|"]
    for r in t["trials"]:
        runs = ", ".join(f"{v:.4g}" for v in r["measurements_ms"])
        md.append(f"| {r['step']} | {r['role']} | {r['ratio']:.4f} | {r['macs_reduction']:.2f}x | "
                  f"{r['latency_ms']:.4g} | {runs} | {'yes' if r['meets'] else 'no'} |")
    return md + [""]


def _sparsity_md(s: dict | None) -> list[str]:
    """Per-weight sparsity of a ``netcarve sparsify`` run (``task.sparsity``) as markdown."""
    if not s:
        return []
    t = s["total"]
    md = ["## Sparsity", "",
          f"{s['algorithm']}: {t['nonzero']:,} of {t['numel']:,} weights of the sparsified layers kept "
          f"({t['numel'] / max(1, t['nonzero']):.2f}x fewer); whole model {s['dense_params']:,} -> "
          f"{s['nonzero_params']:,} non-zero parameters; {s['dense_macs'] / 1e6:.2f}M -> "
          f"{s['nonzero_macs'] / 1e6:.2f}M MACs multiply a non-zero weight.", "",
          "| weight | scheme | level | non-zero | sparsity |", "|---|---|---|---|---|"]
    for name, r in s["layers"].items():
        lv = "-" if r.get("level") is None else f"{r['level']:.3f}"
        md.append(f"| {name} | {r['scheme']} | {lv} | {r['nonzero']:,} / {r['numel']:,} | {r['sparsity']:.3f} |")
    for name, why in (s.get("skipped") or {}).items():
        md.append(f"| {name} | dense | - | - | {why} |")
    return md + [""]


def read_report(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())


__all__ = ["SCHEMA", "ModelStats", "build_report", "format_table", "plot_points", "write_report", "read_report"]
