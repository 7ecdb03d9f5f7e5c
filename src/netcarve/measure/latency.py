"""Wall-clock latency of a model on one CPU inference engine, each engine in its own process.

:func:`measure_latency` runs ``warmup`` untimed calls, then ``rounds`` rounds of ``repeats`` timed calls
(``time.perf_counter`` around one synchronous call, garbage collection paused). Each round is summarised
by its median; ``p50_ms`` is the smallest round median (the round least disturbed by other work on the
machine) and ``p90_ms`` the 90th percentile of that same round.

Isolation (``isolate=True``, the default): the engine runs in a fresh Python subprocess with
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` set to ``threads`` and the engine's
own thread setting (``torch.set_num_threads`` + one inter-op thread; ONNX Runtime
``intra_op_num_threads`` + sequential execution; OpenVINO ``INFERENCE_NUM_THREADS``, one stream,
``LATENCY`` hint, f32 precision unless ``engine_options={"inference_precision": "bf16"}``). Two OpenMP
runtimes in one process stall each other on a small machine, hence one process per engine. The same
stall happens between processes: on a 2-core machine that other jobs keep busy, 2 OpenMP threads can
lose whole scheduler time slices at every barrier (torch latencies 10-200x the quiet value were seen),
so compare engines at ``threads=1`` there, or rerun when the machine is quiet.

* ``onnxruntime`` / ``openvino``: the parent exports ONNX with :func:`netcarve.measure.export.to_onnx`;
  the child imports only numpy and the engine (``result.extra["child_loaded"]`` records that torch was
  not imported).
* ``torch``: the parent writes the model with ``netcarve.save`` and the child rebuilds it with
  ``netcarve.load``. A model without ``netcarve_spec`` (not built by ``netcarve.create_model``; a Hugging Face
  transformers model is saved by class name and config), or one that ``netcarve.save`` refuses, is timed in this
  process instead and ``result.notes`` says so.

The child also checks its output against the parent's torch output on the same input
(``extra["max_abs_diff"]``, ``extra["max_ref_abs"]``); a relative difference above 1e-3 adds a note.

Per-layer times (``per_layer=True``) are measured interleaved with the whole-model calls, so that both
see the same machine conditions:

* torch: forward pre/post hooks on *every* module (containers too), one instrumented call after every
  timed call; a module's time is its self time (inclusive minus the modules it called), so a block's
  residual add or functional shortcut is charged to the block, ops in the top-level ``forward`` to the
  model (path ``""``), and the rows add up to the whole forward pass. The hook overhead per call is
  calibrated and subtracted (see :class:`netcarve.measure._runner.TorchLayerTimer`).
* onnxruntime: the built-in profiler (``enable_profiling``) on a second session, one profiled round after
  every timed round; kernel times of the nodes of one module are summed (attribution rules in
  :mod:`netcarve.measure._attribution`). The profiler slows every kernel (a few microseconds per node,
  more with several threads), so these rows typically add up to 5-60 % more than ``p50_ms``, and more
  than that for graphs of many tiny nodes.
* openvino: per-node performance counters (``PERF_COUNT``) on a second compiled model, one round after
  every timed round; when the device has none, ``per_layer`` is None and a note says why.

Each round's instrumented calls are summarised per layer by the mean over the 20 % of calls whose totals
are nearest the round's median total (per-layer medians would drop stalls that land on a different
layer in every call, so their sum would understate a typical call); like ``p50_ms``, the round with the
smallest total is reported. ``per_layer_sum_ms`` is the sum of the rows; when it differs from
``p50_ms`` by more than 15 % a note says so.

``engine_options``: ``{"inference_precision": "f32"|"bf16"|"f16"}`` (OpenVINO),
``{"graph_optimization_level": "disable"|"basic"|"extended"|"all"}`` (ONNX Runtime),
``{"interleave": "round"|"call"}`` (per-layer scheduling for the ONNX engines),
``{"env": {...}}`` (extra environment variables for the engine process, e.g. ``OMP_WAIT_POLICY``),
``{"python": PATH}`` (DeepSparse: the interpreter of its virtualenv), ``{"sparse": "auto"|"always"|"never"}``
(netcarve: the kernel choice of ``netcarve.runtime.compile``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, EngineUnavailableError, NetcarveError
from ..utils import call_model
from . import _runner
from ._util import eval_mode, forward_order
from .env import environment

ENGINES = ("torch", "onnxruntime", "openvino", "netcarve", "deepsparse")
_ENGINE_PIP = {
    "torch": "pip install torch",
    "deepsparse": "python -m venv DS && DS/bin/pip install deepsparse==1.8.0 numpy==1.26.4 onnx==1.14.1, then set "
                  "NETCARVE_DEEPSPARSE_PYTHON=DS/bin/python (it cannot share an environment with torch)",
    "netcarve": "install a C++ compiler (g++) for netcarve's native kernels (see netcarve.runtime.kernel_status())",
    "onnxruntime": "pip install onnxruntime",
    "openvino": "pip install openvino",
}
_RUNNER = Path(_runner.__file__).resolve()
_ENV_PY = Path(__file__).resolve().with_name("env.py")


@dataclass
class LatencyResult:
    engine: str
    threads: int
    batch: int
    p50_ms: float
    p90_ms: float
    rounds: list[float]  # median of each round, ms
    per_layer: list[dict] | None  # [{"name", "type", "latency_ms", ...}] or None
    env: dict
    warmup: int = 0
    repeats: int = 0
    isolated: bool = True
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_layer_sum_ms(self) -> float | None:
        if self.per_layer is None:
            return None
        return float(sum(r["latency_ms"] for r in self.per_layer))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_layer_sum_ms"] = self.per_layer_sum_ms
        return d


def engine_available(engine: str) -> bool:
    """Whether ``engine``'s Python package is importable (checked without importing it)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "netcarve":
        from ..runtime import kernel_status

        return bool(kernel_status()["available"])
    if engine == "deepsparse":
        return deepsparse_python() is not None
    return importlib.util.find_spec(engine) is not None


_DS_DEFAULT = Path.home() / ".cache" / "netcarve" / "venvs" / "deepsparse" / "bin" / "python"
_ds_checked: dict[str, bool] = {}


def deepsparse_python(python: str | None = None) -> str | None:
    """The interpreter of a separate virtualenv with DeepSparse (a measured peer, never a dependency):
    ``python`` when given, else ``$NETCARVE_DEEPSPARSE_PYTHON``, else
    ``~/.cache/netcarve/venvs/deepsparse/bin/python``; None when none exists or ``import deepsparse`` fails there."""
    py = python or os.environ.get("NETCARVE_DEEPSPARSE_PYTHON") or (str(_DS_DEFAULT) if _DS_DEFAULT.exists() else None)
    if not py:
        return None
    if py not in _ds_checked:
        try:
            r = subprocess.run([py, "-c", "import deepsparse"], capture_output=True, timeout=120,
                               env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
            _ds_checked[py] = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _ds_checked[py] = False
    return py if _ds_checked[py] else None


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor],
    engine: str = "torch",
    threads: int = 2,
    warmup: int = 10,
    repeats: int = 30,
    rounds: int = 5,
    per_layer: bool = False,
    isolate: bool = True,
    engine_options: dict | None = None,
    timeout_s: float = 1800.0,
) -> LatencyResult:
    """Measure the latency of ``model(example_input)`` on ``engine`` with ``threads`` threads.

    ``example_input`` is a tensor (or a tuple of positional tensors) whose first dimension is the batch.
    Raises :class:`~netcarve.errors.EngineUnavailableError` (with the pip command) when the engine is
    not installed or fails to run the model, :class:`~netcarve.errors.ConfigError` for bad arguments.
    """
    available = (deepsparse_python((engine_options or {}).get("python")) is not None if engine == "deepsparse"
                 else engine_available(engine))
    if not available:
        raise EngineUnavailableError(
            f"engine {engine!r} is not installed; install it with: {_ENGINE_PIP[engine]}"
        )
    for name, v, lo in (
        ("threads", threads, 1),
        ("repeats", repeats, 1),
        ("rounds", rounds, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
    names = None
    if isinstance(example_input, dict):  # by forward argument name: in forward's order, passed by keyword
        names = forward_order(model, example_input)
        args = tuple(example_input[k] for k in names)
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError("example_input must be a tensor, a tuple of tensors or a dict of tensors by forward argument "
                          "name")
    batch = int(args[0].shape[0]) if args[0].dim() else 1

    with eval_mode(model):
        with torch.no_grad():
            reference = _runner._flatten_tensors(call_model(model, dict(zip(names, args)) if names else args))
        with tempfile.TemporaryDirectory(prefix="netcarve-latency-") as tmp:
            work = Path(tmp)
            req = {
                "engine": engine,
                "threads": threads,
                "warmup": warmup,
                "repeats": repeats,
                "rounds": rounds,
                "per_layer": bool(per_layer),
                "engine_options": dict(engine_options or {}),
                "workdir": str(work),
                "env_py": str(_ENV_PY),
                "inputs": _save_arrays(work, "input", [a.detach().cpu().numpy() for a in args]),
                "input_names": names,
                "reference": _save_arrays(work, "reference", [t.detach().cpu().numpy() for t in reference]),
            }
            notes: list[str] = []
            extra: dict[str, Any] = {}
            in_process_model = None
            if engine in ("torch", "netcarve"):
                reason = _save_for_child(model, work / "model") if isolate else "isolate=False"
                if reason is None:
                    req["model"] = str(work / "model")
                else:
                    in_process_model = model
                    if isolate:
                        notes.append(f"timed in-process, not in a subprocess: {reason}")
            else:
                from .export import to_onnx

                onnx_path = to_onnx(model, dict(zip(names, args)) if names else args, work / "model.onnx")
                if engine == "deepsparse":
                    _cap_ir_version(onnx_path, 9)
                req["model"] = str(onnx_path)
                extra["onnx_exporter"] = _onnx_exporter(onnx_path)
            if engine == "deepsparse":  # its own virtualenv: always a separate process
                req["python"] = deepsparse_python(req["engine_options"].pop("python", None))
                req["engine_options"].setdefault("env", {})["NM_DISABLE_ANALYTICS"] = "1"
                isolate = True
            isolated = isolate and in_process_model is None
            if isolated:
                res = _run_child(work, req, threads, timeout_s)
            else:
                res = _run_in_process(req, in_process_model, threads)
            if not res.get("ok"):
                kind = res.get("error_kind")
                msg = res.get("message", "unknown error")
                if kind == "missing":
                    raise EngineUnavailableError(f"engine {engine!r}: {msg}")
                raise EngineUnavailableError(f"engine {engine!r} failed to run {type(model).__name__}: {msg}")
            times = res["times_ms"]
            medians = [float(np.median(t)) for t in times]
            best = int(np.argmin(medians))
            per_layer_rows = None
            if per_layer:
                per_layer_rows, layer_notes, layer_extra = _per_layer(engine, res.get("layers"), model, work)
                notes += layer_notes
                extra.update(layer_extra)

    notes += list(res.get("notes") or [])
    diff, scale = res.get("max_abs_diff"), res.get("max_ref_abs")
    extra.update({"max_abs_diff": diff, "max_ref_abs": scale, "child_loaded": res.get("loaded")})
    if per_layer_rows is not None and medians[best] > 0:
        ratio = sum(r["latency_ms"] for r in per_layer_rows) / medians[best]
        if abs(ratio - 1.0) > 0.15:
            notes.append(f"per-layer rows add up to {100 * ratio:.0f}% of the whole-model p50")
    if diff is not None and diff > 1e-3 * max(1.0, scale or 0.0):
        notes.append(
            f"{engine} output differs from torch eager: max abs diff {diff:.3g} (max |ref| {scale:.3g})"
        )
    env = res.get("env") or environment(threads)
    env["threads_effective"] = res.get("threads_effective")
    return LatencyResult(
        engine=engine,
        threads=threads,
        batch=batch,
        p50_ms=medians[best],
        p90_ms=float(np.percentile(times[best], 90)),
        rounds=medians,
        per_layer=per_layer_rows,
        env=env,
        warmup=warmup,
        repeats=repeats,
        isolated=isolated,
        notes=notes,
        extra=extra,
    )


# ---------------------------------------------------------------------------------------------- plumbing


def compare_latency(
    models: dict[str, nn.Module],
    example_inputs: dict[str, Any],
    engine: str = "torch",
    threads: int = 2,
    processes: int = 3,
    **kwargs,
) -> dict[str, LatencyResult]:
    """Latency of several variants of a model, compared fairly on a noisy machine.

    Each variant is timed ``processes`` times, each time in a fresh process, interleaved
    (a, b, a, b, ...) so slow spells of the machine hit every variant alike; a variant's result is its
    best process (lowest p50: the least disturbed one), with every process's p50 kept in
    ``result.extra["process_p50_ms"]``. Between fresh processes of the same model p50 varies by up to
    ~1.5x here (thread placement, pool state), more than within one process's rounds.
    """
    if processes < 1:
        raise ConfigError(f"processes must be >= 1, got {processes}")
    runs: dict[str, list[LatencyResult]] = {k: [] for k in models}
    for _ in range(processes):
        for name, model in models.items():
            runs[name].append(
                measure_latency(model, example_inputs[name], engine=engine, threads=threads, **kwargs)
            )
    out = {}
    for name, results in runs.items():
        best = min(results, key=lambda r: r.p50_ms)
        best.extra["process_p50_ms"] = [r.p50_ms for r in results]
        out[name] = best
    return out


def _save_arrays(work: Path, stem: str, arrays: list[np.ndarray]) -> list[str]:
    paths = []
    for i, a in enumerate(arrays):
        p = work / f"{stem}_{i}.npy"
        np.save(p, np.ascontiguousarray(a))
        paths.append(str(p))
    return paths


def _save_for_child(model: nn.Module, directory: Path) -> str | None:
    """Write the model for the torch child; return why it cannot be, or None on success."""
    from ..serialize import can_save

    if not can_save(model):
        return f"{type(model).__name__} has no netcarve_spec (not built by netcarve.create_model)"
    try:
        import netcarve

        netcarve.save(model, directory)
    except (ImportError, NetcarveError, NotImplementedError, OSError) as e:
        return f"netcarve.save failed: {type(e).__name__}: {e}"
    return None


def _cap_ir_version(path: Path, ir: int) -> None:
    """DeepSparse 1.8 reads ONNX IR <= 9; today's exporters write 10 without using anything IR 10 added."""
    import onnx

    m = onnx.load(str(path))
    if m.ir_version > ir:
        m.ir_version = ir
        onnx.save(m, str(path))


def _child_env(threads: int, extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[k] = str(threads)
    # the torch child imports netcarve: make sure it finds this copy even without an install
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


def _run_child(work: Path, req: dict, threads: int, timeout_s: float) -> dict:
    (work / "request.json").write_text(json.dumps(req), encoding="utf-8")
    try:
        proc = subprocess.run(
            [req.get("python") or sys.executable, str(_RUNNER), str(work)],
            env=_child_env(threads, (req.get("engine_options") or {}).get("env")),
            cwd=str(work),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise EngineUnavailableError(
            f"engine {req['engine']!r}: no result within {timeout_s:.0f} s"
        ) from None
    out = work / "result.json"
    if not out.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise EngineUnavailableError(
            f"engine {req['engine']!r}: worker exited with code {proc.returncode} and no result:\n{tail}"
        )
    return json.loads(out.read_text(encoding="utf-8"))


def _run_in_process(req: dict, model, threads: int) -> dict:
    old = torch.get_num_threads()
    try:
        if req["engine"] == "torch" and model is not None:
            torch.set_num_threads(threads)
        return _runner.run_request(req, model=model)
    finally:
        torch.set_num_threads(old)


def _onnx_exporter(path: Path) -> str | None:
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in m.metadata_props}.get("netcarve.exporter")
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------- per layer


def _module_order(model: nn.Module) -> tuple[dict[str, int], dict[str, str]]:
    order, types = {}, {}
    for i, (name, m) in enumerate(model.named_modules()):
        order.setdefault(name, i)
        types.setdefault(name, type(m).__name__)
    return order, types


def _per_layer(engine: str, layers, model: nn.Module, work: Path):
    notes: list[str] = []
    extra: dict[str, Any] = {}
    if not layers or not layers.get("rounds"):
        if engine != "openvino":
            notes.append(f"{engine}: no per-layer data was produced")
        return None, notes, extra
    order, types = _module_order(model)
    # like p50_ms (the smallest round median), the per-layer rows come from the round whose typical
    # instrumented call was fastest: both are "least disturbed round" estimates
    sums = [sum(r) for r in layers["rounds"]]
    best = layers["rounds"][int(np.argmin(sums))]
    if engine == "netcarve":  # plan steps: fused ops carry their module path; glue ops go to the model ("")
        agg: dict[str, float] = {}
        steps_of: dict[str, list[str]] = {}
        for (name, kind, kernel), ms in zip(layers["entries"], best):
            path = name if name in types else ""
            agg[path] = agg.get(path, 0.0) + float(ms)
            steps_of.setdefault(path, []).append(f"{kind}:{kernel}")
        rows = [{"name": p, "type": types.get(p, "?"), "latency_ms": ms, "steps": steps_of[p]}
                for p, ms in agg.items()]
        extra["compiled"] = layers.get("summary")
    elif engine == "torch":
        rows = [
            {"name": name, "type": typ, "latency_ms": float(ms)}
            for (name, typ), ms, called in zip(layers["entries"], best, layers["called"])
            if called
        ]
        extra["hook_overhead_us"] = {
            "floor": layers.get("hook_floor_us"),
            "per_child_call": layers.get("hook_parent_us"),
        }
    else:
        from ._attribution import OnnxGraphIndex, map_openvino_nodes, map_ort_nodes

        index = OnnxGraphIndex(work / "model.onnx")
        if engine == "onnxruntime":
            node_names = [n for n, _ in layers["nodes"]]
            mapping, unresolved = map_ort_nodes(index, layers["nodes"], layers.get("optimized_model"))
        else:
            node_names = [r["name"] for r in layers["nodes"]["profiled"]]
            mapping, unresolved = map_openvino_nodes(index, layers["nodes"])
        if unresolved:
            notes.append(
                f"{engine}: {len(unresolved)} engine node(s) could not be traced to a module and were charged "
                f"to the top-level model: {', '.join(unresolved[:8])}{' ...' if len(unresolved) > 8 else ''}"
            )
        agg: dict[str, float] = {}
        nodes_of: dict[str, list[str]] = {}
        for n, ms in zip(node_names, best):
            path = mapping[n]
            agg[path] = agg.get(path, 0.0) + float(ms)
            nodes_of.setdefault(path, []).append(n)
        rows = [
            {"name": p, "type": types.get(p, "?"), "latency_ms": ms, "nodes": nodes_of[p]}
            for p, ms in agg.items()
        ]
        extra["engine_nodes"] = len(node_names)
        if engine == "onnxruntime":
            notes.append(
                "onnxruntime per-layer times come from its profiler, which slows every kernel a little"
            )
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    return rows, notes, extra
