"""``netcarve bench``: whole-model and per-layer latency of one model on every engine, side by side.

Engines (each timed in its own process, see :mod:`netcarve.measure.latency`): ``torch`` (eager), ``onnxruntime``
and ``openvino`` (dense, when installed), ``netcarve-dense`` (netcarve's native plan with every layer on the faster
of its dense kernels, ATen's or netcarve's direct conv: BN folded, ReLU / residual fused, no Python between
layers), ``netcarve`` (the same plan with each layer on the fastest of the sparse and dense kernels, autotuned
here) and ``deepsparse`` (a peer, run from its own
virtualenv: ``--deepsparse-python``, ``$NETCARVE_DEEPSPARSE_PYTHON`` or ``~/.cache/netcarve/venvs/deepsparse``;
skipped with the install command when absent).

Per layer, the ``netcarve`` rows give each conv's kernel choice and time next to its MACs: the effective
throughput ``2 * dense MACs / time`` (what a dense engine would need to match it) and the useful throughput
``2 * non-zero MACs / time``, printed beside this CPU's fp32 GEMM ceiling measured in the same run.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..errors import ConfigError, EngineUnavailableError
from ..measure import engine_available, environment, measure_latency
from ..utils import input_batch

DENSE_ENGINES = ("torch", "onnxruntime", "openvino")
ALL_ENGINES = ("torch", "onnxruntime", "openvino", "netcarve-dense", "netcarve", "netcarve-gen", "deepsparse")
# run when no engines are named (netcarve-gen: netcarve with per-layer generated code offered too, which builds
# every sparse conv's code on first use)
DEFAULT_ENGINES = tuple(e for e in ALL_ENGINES if e != "netcarve-gen")


def gemm_ceiling_gflops(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """fp32 GEMM throughput of torch.mm (MKL / oneDNN) on n x n matrices at ``threads``: the CPU's practical
    dense ceiling, measured (median of ``repeats``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            torch.mm(a, b)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t0)
        ts.sort()
        return 2.0 * n**3 / ts[len(ts) // 2] / 1e9
    finally:
        torch.set_num_threads(old)


def run_bench(model: torch.nn.Module, x: torch.Tensor, *, engines=DEFAULT_ENGINES, threads: int = 2,
              repeats: int = 30, rounds: int = 5, warmup: int = 10, deepsparse_python: str | None = None,
              progress=None) -> dict[str, Any]:
    """Time ``model`` on ``x`` with every requested engine; returns the ``--json`` document (``netcarve-gen``:
    netcarve's runtime compiled with ``codegen=True``, each sparse conv also offered its own generated code)."""
    unknown = [e for e in engines if e not in ALL_ENGINES]
    if unknown:
        raise ConfigError(f"netcarve bench: unknown engine(s) {unknown}; choose from {', '.join(ALL_ENGINES)}")
    out: dict[str, Any] = {"engines": {}, "skipped": {}, "layers": [], "batch": input_batch(x), "threads": threads}
    kw = dict(threads=threads, warmup=warmup, repeats=repeats, rounds=rounds)
    for name in engines:
        if progress:
            progress(name)
        try:
            if name == "deepsparse":
                from ..measure.latency import deepsparse_python as find_ds

                if find_ds(deepsparse_python) is None:
                    raise EngineUnavailableError(
                        "deepsparse is not installed (set NETCARVE_DEEPSPARSE_PYTHON or --deepsparse-python to its "
                        "virtualenv's python)")
                r = measure_latency(model, x, engine="deepsparse", engine_options={"python": deepsparse_python}, **kw)
            elif name.startswith("netcarve"):
                if not engine_available("netcarve"):
                    from ..runtime import kernel_status

                    raise EngineUnavailableError(f"netcarve kernels unavailable: {kernel_status()['reason']}")
                mode = "never" if name == "netcarve-dense" else "auto"
                r = measure_latency(model, x, engine="netcarve", per_layer=name == "netcarve",
                                    engine_options={"sparse": mode, "codegen": name == "netcarve-gen"}, **kw)
            else:
                if not engine_available(name):
                    raise EngineUnavailableError(f"{name} is not installed")
                r = measure_latency(model, x, engine=name, **kw)
        except EngineUnavailableError as e:
            out["skipped"][name] = str(e)
            continue
        out["engines"][name] = {"latency_ms": r.p50_ms, "p90_ms": r.p90_ms, "rounds_ms": r.rounds,
                                "max_abs_diff": r.extra.get("max_abs_diff"), "notes": r.notes}
        if name == "netcarve" and r.per_layer is not None:
            out["layers"] = _layer_rows(r)
            # the whole-plan check: the per-layer choices timed against uniform plans, and the one kept
            out["plan_check"] = (r.extra.get("compiled") or {}).get("plan_check")
    rank_against_dense(out)
    env = environment(threads)
    env["gemm_fp32_gflops"] = gemm_ceiling_gflops(threads)
    out["env"] = env
    return out


def rank_against_dense(doc: dict[str, Any]) -> None:
    """Set ``doc["fastest_dense"]`` and every engine's ``speedup_vs_fastest_dense`` from ``doc["engines"]``."""
    dense = {k: v["latency_ms"] for k, v in doc["engines"].items() if k in DENSE_ENGINES}
    if dense:
        best = min(dense, key=dense.get)
        doc["fastest_dense"] = {"engine": best, "latency_ms": dense[best]}
        for v in doc["engines"].values():
            v["speedup_vs_fastest_dense"] = dense[best] / v["latency_ms"] if v["latency_ms"] > 0 else None


def _layer_rows(r) -> list[dict[str, Any]]:
    compiled = r.extra.get("compiled") or {}
    convs = {lc["name"]: lc for lc in compiled.get("layers", [])}
    rows = []
    for row in r.per_layer:
        lc = convs.get(row["name"])
        ms = row["latency_ms"]
        d = {"name": row["name"], "type": row["type"], "latency_ms": ms, "steps": row.get("steps")}
        if lc is not None:
            d.update(kernel=lc["choice"], density=lc["density"], macs=lc["macs"], nonzero_macs=lc["nonzero_macs"],
                     sparse_ms=lc["sparse_ms"], dense_ms=lc["dense_ms"], direct_ms=lc.get("direct_ms"))
            if lc.get("generated_ms") is not None:
                d["generated_ms"] = lc["generated_ms"]
            if ms > 0:
                d["effective_gflops"] = 2.0 * lc["macs"] / ms / 1e6
                d["useful_gflops"] = 2.0 * lc["nonzero_macs"] / ms / 1e6
        rows.append(d)
    return rows


def format_bench(doc: dict[str, Any]) -> str:
    lines = [f"batch {doc['batch']}, {doc['threads']} threads, {doc['env'].get('cpu_model')}"]
    lines.append(f"{'engine':<16} {'latency ms':>11} {'vs fastest dense':>17}")
    for name, v in doc["engines"].items():
        sp = v.get("speedup_vs_fastest_dense")
        sp_txt = f"{sp:.2f}x" if sp else "-"
        lines.append(f"{name:<16} {v['latency_ms']:11.3f} {sp_txt:>17}")
    for name, why in doc["skipped"].items():
        lines.append(f"{name:<16} {'skipped':>11}  ({why})")
    if doc["layers"]:
        ceil = doc["env"].get("gemm_fp32_gflops")
        lines.append("")
        lines.append(f"netcarve per layer (fp32 GEMM ceiling here: {ceil:.0f} GFLOP/s)")
        lines.append(f"{'layer':<28} {'kernel':>7} {'density':>8} {'ms':>8} {'eff. GFLOP/s':>13} {'useful':>8}")
        for r in doc["layers"]:
            if "kernel" in r:
                lines.append(f"{r['name'][:28]:<28} {r['kernel']:>7} {r['density']:8.3f} {r['latency_ms']:8.4f} "
                             f"{r.get('effective_gflops', 0):13.1f} {r.get('useful_gflops', 0):8.1f}")
            else:
                lines.append(f"{(r['name'] or '(glue)')[:28]:<28} {'':>7} {'':>8} {r['latency_ms']:8.4f}")
    return "\n".join(lines)


def bench_cli(a) -> dict[str, Any]:
    from ..models import example_input
    from .common import resolve_model

    if a.batch < 1 or a.threads < 1:
        raise ConfigError("netcarve bench: --batch and --threads must be >= 1")
    model = resolve_model(a.model, a.weights, a.data_dir)
    x = example_input(model, batch=a.batch)
    engines = a.engines or list(DEFAULT_ENGINES)
    py = a.deepsparse_python
    return run_bench(model, x, engines=engines, threads=a.threads, repeats=a.repeats, rounds=a.rounds,
                     deepsparse_python=py)
