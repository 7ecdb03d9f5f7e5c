"""One table per model: MACs, parameters and latency for every layer, plus totals and the environment.

:func:`profile_model` returns (JSON-ready)::

    {"layers": [{"name", "type", "macs", "params", "latency_ms", "share"}, ...],
     "total": {"macs", "params", "latency_ms", "p90_ms", "per_layer_sum_ms"},
     "env": {...}, "engine", "batch", "threads", "input_shape", "model", "notes"}

``layers`` holds every row of :func:`~netcarve.measure.counting.count_model` (leaf modules and modules
that own parameters) and every module the engine charged time to (with the torch engine that includes
containers, whose self time is their own glue ops such as a residual add; with the ONNX engines the
module that owns each graph node). A module that ran but got no time of its own (an engine fused it into
its neighbour, e.g. BatchNorm folded into the conv) has ``latency_ms`` 0.0; without ``per_layer``
every ``latency_ms`` and ``share`` is None. ``share`` is the row's fraction of ``per_layer_sum_ms``
(so the shares add up to 1); ``total.latency_ms`` is the whole-model ``p50_ms``, measured without
per-layer instrumentation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import input_shapes
from .counting import count_model
from .latency import measure_latency


def _resize_batch(x, batch: int):
    """``x`` (a tensor, a tuple of them or a dict by argument name) with its samples repeated or cut to ``batch``."""
    if isinstance(x, dict):
        return {k: _resize_batch(v, batch) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(_resize_batch(v, batch) for v in x)
    if x.shape[0] == batch:
        return x
    reps = -(-batch // x.shape[0])
    return torch.cat([x] * reps)[:batch].contiguous()


def profile_model(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    engine: str = "torch",
    threads: int = 2,
    batch: int = 1,
    per_layer: bool = True,
    **latency_kwargs: Any,
) -> dict:
    """Count and time ``model`` at batch size ``batch``.

    ``example_input`` may have any batch size: its samples are repeated or cut to ``batch``. Without it,
    a model built by :func:`netcarve.create_model` gets :func:`netcarve.example_input`. Other keyword
    arguments (``warmup``, ``repeats``, ``rounds``, ``isolate``, ``engine_options``) go to
    :func:`~netcarve.measure.latency.measure_latency`.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive integer, got {batch!r}")
    if example_input is None:
        from ..models import example_input as _example_input

        x = _example_input(model, batch=batch)
    else:
        x = _resize_batch(example_input, batch)
    cost = count_model(model, x)
    lat = measure_latency(model, x, engine=engine, threads=threads, per_layer=per_layer, **latency_kwargs)

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    timed = {r["name"]: r for r in (lat.per_layer or [])}
    rows: dict[str, dict] = {}
    for lc in cost.layers:
        rows[lc.name] = {"name": lc.name, "type": lc.type, "macs": lc.macs, "params": lc.params}
    for name, r in timed.items():
        rows.setdefault(name, {"name": name, "type": r["type"], "macs": 0, "params": 0})
    layer_sum = lat.per_layer_sum_ms
    for name, row in rows.items():
        if lat.per_layer is None:
            row["latency_ms"], row["share"] = None, None
        else:
            ms = float(timed[name]["latency_ms"]) if name in timed else 0.0
            row["latency_ms"] = ms
            row["share"] = ms / layer_sum if layer_sum else 0.0
    layers = sorted(rows.values(), key=lambda r: order.get(r["name"], len(order)))
    spec = getattr(model, "netcarve_spec", None)
    return {
        "layers": layers,
        "total": {
            "macs": cost.total_macs,
            "params": cost.total_params,
            "latency_ms": lat.p50_ms,
            "p90_ms": lat.p90_ms,
            "per_layer_sum_ms": layer_sum,
        },
        "env": lat.env,
        "engine": engine,
        "batch": batch,
        "threads": threads,
        "input_shape": input_shapes(x),
        "model": spec["name"] if spec else type(model).__name__,
        "notes": list(lat.notes),
    }


def _human(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else "..." + s[-(width - 3) :]


def format_profile_table(profile: dict, name_width: int = 36, type_width: int = 22) -> str:
    """A fixed-width text table of a :func:`profile_model` dict: name, type, MACs, params, latency ms,
    share %, then a total line and the engine / CPU / notes."""
    head = f"{'name':<{name_width}} {'type':<{type_width}} {'MACs':>10} {'params':>10} {'latency ms':>11} {'share %':>8}"
    rule = "-" * len(head)
    lines = [head, rule]
    for r in profile["layers"]:
        ms = r.get("latency_ms")
        share = r.get("share")
        lines.append(
            f"{_cut(r['name'] or '(model)', name_width):<{name_width}} {_cut(r['type'], type_width):<{type_width}} "
            f"{_human(r['macs']):>10} {_human(r['params']):>10} "
            f"{'-' if ms is None else f'{ms:.3f}':>11} {'-' if share is None else f'{100 * share:.1f}':>8}"
        )
    t = profile["total"]
    lines.append(rule)
    lines.append(
        f"{'total (whole-model p50)':<{name_width}} {'':<{type_width}} {_human(t['macs']):>10} "
        f"{_human(t['params']):>10} {t['latency_ms']:>11.3f} {'':>8}"
    )
    if t.get("per_layer_sum_ms") is not None:
        lines.append(
            f"{'sum of per-layer rows':<{name_width}} {'':<{type_width}} {'':>10} {'':>10} {t['per_layer_sum_ms']:>11.3f}"
        )
    env = profile.get("env") or {}
    lines.append(
        f"engine {profile.get('engine')}, batch {profile.get('batch')}, threads {profile.get('threads')}, "
        f"p90 {t.get('p90_ms', float('nan')):.3f} ms, cpu {env.get('cpu_model')}"
    )
    for note in profile.get("notes") or []:
        lines.append(f"note: {note}")
    return "\n".join(lines)
