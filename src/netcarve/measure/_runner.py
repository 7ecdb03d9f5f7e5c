"""Engine worker: times one model with one engine and writes ``result.json``.

Run as a script by :func:`netcarve.measure.latency.measure_latency` (``python _runner.py WORKDIR``) so
that each engine gets a fresh process with its own OpenMP / TBB runtime and a fixed thread count. At
module level it imports only the standard library and numpy; the ONNX Runtime and OpenVINO paths then
import just that engine (never torch, never netcarve), the torch path imports torch and netcarve to
rebuild the model with ``netcarve.load``. The same functions are imported in-process for
``isolate=False`` and for models that cannot be rebuilt in a subprocess.

Protocol: ``WORKDIR/request.json`` holds ``engine, threads, warmup, repeats, rounds, per_layer, model,
inputs, reference, env_py, engine_options``; the worker writes ``WORKDIR/result.json`` with
``ok, times_ms`` (one list of per-run milliseconds per round), ``layers`` (engine-specific raw per-layer
data, see each engine), ``env``, ``threads_effective``, ``max_abs_diff``, ``max_ref_abs``, ``loaded``
(which heavy modules ended up imported) and ``notes``; or ``ok: false`` with ``error_kind`` /
``message``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # keep this directory off sys.path: measure/profile.py would shadow stdlib profile
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

_PIP = {
    "deepsparse": "pip install deepsparse==1.8.0 in a virtualenv of its own (numpy 1.26, onnx 1.14)",
    "netcarve": "a C++ compiler (g++) for netcarve's native kernels",
    "onnxruntime": "pip install onnxruntime",
    "openvino": "pip install openvino",
    "torch": "pip install torch",
}


class EngineMissing(Exception):
    """The engine's Python package cannot be imported."""


# ------------------------------------------------------------------------------------------------ timing


def run_rounds(
    fn, warmup: int, repeats: int, rounds: int, layer_step=None, interleave: str = "call",
    min_round_ms: float = 100.0, max_repeats: int = 5000,
):
    """``warmup`` calls, then ``rounds`` rounds of ``repeats`` timed calls of ``fn``.

    ``layer_step()`` (one instrumented call, returning its per-layer data) is interleaved with the timed
    calls so that whole-model and per-layer numbers see the same machine conditions: after every timed
    call (``interleave="call"``) or ``repeats`` of them after every timed round (``"round"``). Warm-up
    covers both. Without per-layer steps, rounds are lengthened to at least ``min_round_ms`` of timed calls
    (more repeats, at most ``max_repeats``) after a warm-up of the same length. Returns the per-round lists of milliseconds and the per-round lists of step results.
    """
    pc = time.perf_counter
    for _ in range(warmup):
        fn()
        if layer_step is not None:
            layer_step()
    if layer_step is None and min_round_ms > 0:
        # tiny models: a round of `repeats` calls can last well under a millisecond, too short to ride out
        # thread-pool wake-ups and frequency changes; keep warming up and lengthen rounds to min_round_ms
        t0, n = pc(), 0
        while n < 3 or (pc() - t0) * 1e3 < min_round_ms:
            fn()
            n += 1
        per_call_ms = (pc() - t0) * 1e3 / n
        repeats = max(repeats, min(max_repeats, math.ceil(min_round_ms / max(per_call_ms, 1e-6))))
    times, layers = [], []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            ts, steps = [], []
            for _ in range(repeats):
                t0 = pc()
                fn()
                ts.append((pc() - t0) * 1e3)
                if layer_step is not None and interleave == "call":
                    steps.append(layer_step())
            if layer_step is not None and interleave != "call":
                steps = [layer_step() for _ in range(repeats)]
            times.append(ts)
            layers.append(steps)
    finally:
        if enabled:
            gc.enable()
    return times, layers


def central_mean(rows, fraction: float = 0.2) -> list[float]:
    """Per-column mean over the ``fraction`` of rows whose totals are nearest the median total.

    Each row is one instrumented run (time per layer or node). Per-column medians would drop the
    stalls that land on a different layer in every run, so their sum would fall short of a typical
    run; averaging whole runs near the median keeps the columns consistent with a typical (median)
    total, even when the totals are bimodal because other processes preempt some runs."""
    a = np.asarray(rows, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        return []
    totals = a.sum(axis=1)
    k = max(1, int(round(fraction * len(totals))))
    nearest = np.argsort(np.abs(totals - np.median(totals)), kind="stable")[:k]
    return [float(v) for v in a[nearest].mean(axis=0)]


def _compare(outputs, references) -> tuple[float | None, float | None]:
    if not references:
        return None, None
    diff, scale = 0.0, 0.0
    for o, r in zip(outputs, references):
        o = np.asarray(o, dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        if o.shape != r.shape:
            return float("inf"), float(np.abs(r).max()) if r.size else 0.0
        if r.size:
            diff = max(diff, float(np.abs(o - r).max()))
            scale = max(scale, float(np.abs(r).max()))
    return diff, scale


# ------------------------------------------------------------------------------------------------ torch


class TorchLayerTimer:
    """Self time of every module of ``model``, measured with global forward pre/post hooks.

    A module's *inclusive* time runs from its pre-hook to its post-hook; its *self* time is the inclusive
    time minus the inclusive times of the modules it called (a dynamic call stack, so a module shared
    between places is charged to whoever called it). Self times therefore include a container's own
    operations (a residual ``+``, a functional shortcut, a reshape) and add up to the root's inclusive
    time. The hook machinery costs a little per call; it is calibrated on a chain of ``nn.Identity``
    modules (``floor_s``: the part that lands inside a module's own interval, ``parent_s``: the extra
    part that lands in its caller's self time) and subtracted, self times clamped at 0.

    The hooks are global (``register_module_forward_*_hook``) so that switching them on and off between
    calls costs two registrations, and modules outside ``model`` are ignored.
    """

    def __init__(self, model, calibrate: bool = True):
        self.entries: list[tuple[str, str]] = []
        self._index: dict[int, int] = {}
        for name, m in model.named_modules():
            if id(m) not in self._index:
                self._index[id(m)] = len(self.entries)
                self.entries.append((name, type(m).__name__))
        n = len(self.entries)
        self.self_s = [0.0] * n
        self.child_calls = [0] * n
        self.called = [False] * n
        self.stack: list[list] = []
        self.handles: list = []
        self.floor_s, self.parent_s = self.calibrate() if calibrate else (0.0, 0.0)

    def attach(self):
        from torch.nn.modules import module as _module

        if self.handles:
            return
        index, stack, self_s, child_calls, called = (
            self._index, self.stack, self.self_s, self.child_calls, self.called
        )  # fmt: skip
        push, pop, pc = stack.append, stack.pop, time.perf_counter

        def pre(mod, args):
            i = index.get(id(mod))
            if i is None:
                return
            if stack:
                child_calls[stack[-1][0]] += 1
            push([i, 0.0, pc()])

        def post(mod, args, out):
            t1 = pc()
            if id(mod) not in index or not stack:
                return
            i, children, t0 = pop()
            dt = t1 - t0
            self_s[i] += dt - children
            called[i] = True
            if stack:
                stack[-1][1] += dt

        self.handles = [
            _module.register_module_forward_pre_hook(pre),
            _module.register_module_forward_hook(post),
        ]

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def calibrate(self, n: int = 64, repeats: int = 30, rounds: int = 3) -> tuple[float, float]:
        """Measure the hook cost per module call on ``Sequential(n x Identity)``: per round the median
        over ``repeats`` calls, then the smallest round (the least disturbed by other processes)."""
        import torch
        from torch import nn

        chain = nn.Sequential(*[nn.Identity() for _ in range(n)])
        x = torch.zeros(1)
        sub = TorchLayerTimer(chain, calibrate=False)
        pc = time.perf_counter
        floors, parents = [], []
        with torch.inference_mode():
            for _ in range(5):  # warm both call paths
                chain(x)
                sub.step(lambda: chain(x))
            for _ in range(rounds):
                fl, pa, plain = [], [], []
                for _ in range(repeats):
                    t0 = pc()
                    chain(x)
                    plain.append(pc() - t0)
                    sub.step(lambda: chain(x))
                    fl.append(sum(sub.self_s[1:]) / n)
                    pa.append(sub.self_s[0] / n)
                plain_per_call = float(np.median(plain)) / n  # fast-path dispatch + Identity itself
                floors.append(float(np.median(fl)))
                parents.append(max(0.0, float(np.median(pa)) - plain_per_call))
        return min(floors), min(parents)

    def reset(self):
        n = len(self.entries)
        self.self_s[:] = [0.0] * n
        self.child_calls[:] = [0] * n
        self.stack.clear()

    def step(self, fn) -> list[float]:
        """One instrumented call of ``fn``: corrected self time per module, in ms."""
        self.reset()
        self.attach()
        try:
            fn()
        finally:
            self.detach()
        f, p = self.floor_s, self.parent_s
        return [max(0.0, s - f - p * c) * 1e3 if s else 0.0 for s, c in zip(self.self_s, self.child_calls)]


def bench_torch(model, inputs, warmup, repeats, rounds, per_layer, threads=None, names=None):
    """Time a torch model in this process (``names``: the inputs are these keyword arguments). ``layers`` =
    ``{"entries": [[name, type], ...], "rounds": [[ms per entry], ...], "called": [bool], "hook_floor_us",
    "hook_parent_us"}``."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    model.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)
    kw = dict(zip(names, args)) if names else None
    with torch.inference_mode():
        out = model(**kw) if kw else model(*args)

        def fn():
            model(**kw) if kw else model(*args)

        timer = TorchLayerTimer(model) if per_layer else None
        step = (lambda: timer.step(fn)) if per_layer else None
        times, steps = run_rounds(fn, warmup, repeats, rounds, step, "call")
    layers = None
    if timer is not None:
        layers = {
            "entries": [list(e) for e in timer.entries],
            "called": list(timer.called),
            "rounds": [central_mean(r) for r in steps],
            "hook_floor_us": timer.floor_s * 1e6,
            "hook_parent_us": timer.parent_s * 1e6,
        }
    outs = [t.numpy() for t in _flatten_tensors(out)]
    return {"times": times, "layers": layers, "out": outs, "threads": torch.get_num_threads(), "notes": []}


def _flatten_tensors(x):
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flatten_tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _flatten_tensors(y)]
    return []


def _run_torch(req, inputs, model=None):
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise EngineMissing(str(e)) from None
    if model is None:  # a fresh worker process: also pin the inter-op pool (only possible before first use)
        import torch

        import netcarve

        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        model = netcarve.load(req["model"])
    return bench_torch(
        model, inputs, req["warmup"], req["repeats"], req["rounds"], req["per_layer"], req["threads"],
        req.get("input_names"),
    )


# ------------------------------------------------------------------------------------------ onnxruntime


def _run_onnxruntime(req, inputs, model=None):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EngineMissing(str(e)) from None
    opts = dict(req.get("engine_options") or {})
    level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts.get("graph_optimization_level", "all")]

    def options(profile_prefix=None):
        so = ort.SessionOptions()
        so.intra_op_num_threads = req["threads"]
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = level
        so.log_severity_level = 3
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
            so.optimized_model_filepath = os.path.join(req["workdir"], "ort_optimized.onnx")
        return so

    providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(req["model"], options(), providers=providers)
    feed = {i.name: a for i, a in zip(sess.get_inputs(), inputs)}
    out = sess.run(None, feed)

    def fn():
        sess.run(None, feed)

    prof = None
    step = None
    if req["per_layer"]:
        prof = ort.InferenceSession(
            req["model"], options(os.path.join(req["workdir"], "ort_profile")), providers=providers
        )

        def step():
            prof.run(None, feed)

    times, _ = run_rounds(
        fn, req["warmup"], req["repeats"], req["rounds"], step, opts.get("interleave", "round")
    )
    layers = None
    if prof is not None:
        path = prof.end_profiling()
        layers = _parse_ort_profile(path, skip=req["warmup"], repeats=req["repeats"], rounds=req["rounds"])
        layers["optimized_model"] = os.path.join(req["workdir"], "ort_optimized.onnx")
    return {"times": times, "layers": layers, "out": out, "threads": req["threads"], "notes": []}


def _parse_ort_profile(path, skip, repeats, rounds):
    """``{"nodes": [[name, op_name], ...], "rounds": [[median ms per node], ...]}`` from an ORT
    profile, node kernel times summed per run, runs after the first ``skip`` split into rounds."""
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    starts = [r[0] for r in runs]
    per_run: list[dict] = [dict() for _ in runs]
    ops: dict[str, str] = {}
    import bisect

    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        k = bisect.bisect_right(starts, e["ts"]) - 1
        if k < 0 or e["ts"] > runs[k][1]:
            continue
        name = e["name"][: -len("_kernel_time")]
        ops.setdefault(name, (e.get("args") or {}).get("op_name", ""))
        per_run[k][name] = per_run[k].get(name, 0.0) + e["dur"] / 1e3
    names = list(ops)
    per_run = per_run[skip:]
    out_rounds = []
    for r in range(rounds):
        chunk = per_run[r * repeats : (r + 1) * repeats]
        if not chunk:
            break
        out_rounds.append(central_mean([[run.get(n, 0.0) for n in names] for run in chunk]))
    return {"nodes": [[n, ops[n]] for n in names], "rounds": out_rounds}


# --------------------------------------------------------------------------------------------- openvino


def _run_openvino(req, inputs, model=None):
    try:
        import openvino as ov
    except ImportError as e:
        raise EngineMissing(str(e)) from None
    opts = dict(req.get("engine_options") or {})
    core = ov.Core()
    net = core.read_model(req["model"])
    cfg = {
        "INFERENCE_NUM_THREADS": int(req["threads"]),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        # f32 by default: on CPUs with avx512_bf16 / AMX OpenVINO would otherwise silently run in bf16
        "INFERENCE_PRECISION_HINT": opts.get("inference_precision", "f32"),
    }
    compiled = core.compile_model(net, "CPU", cfg)
    request = compiled.create_infer_request()
    feeds = {i: a for i, a in enumerate(inputs)}
    res = request.infer(feeds)
    out = [np.asarray(res[o]) for o in compiled.outputs]

    def fn():
        request.infer(feeds)

    prof_req = None
    step = None
    names: list[str] = []
    if req["per_layer"]:
        try:
            prof_compiled = core.compile_model(net, "CPU", {**cfg, "PERF_COUNT": True})
            prof_req = prof_compiled.create_infer_request()
        except Exception:  # noqa: BLE001 - no performance counters on this build/device
            prof_req = None
    if prof_req is not None:
        index: dict[str, int] = {}
        executed = ov.ProfilingInfo.Status.EXECUTED

        def step():
            prof_req.infer(feeds)
            row: dict[int, float] = {}
            for p in prof_req.profiling_info:
                if p.status != executed:
                    continue
                k = index.setdefault(p.node_name, len(index))
                if k == len(names):
                    names.append(p.node_name)
                row[k] = row.get(k, 0.0) + p.real_time.total_seconds() * 1e3
            return row

    times, node_rounds = run_rounds(
        fn, req["warmup"], req["repeats"], req["rounds"], step, opts.get("interleave", "round")
    )
    layers = None
    notes = []
    if req["per_layer"] and prof_req is None:
        notes.append("openvino: performance counters (PERF_COUNT) unavailable; no per-layer times")
    if prof_req is not None:
        rounds_ms = []
        for rows in node_rounds:
            rounds_ms.append(central_mean([[row.get(k, 0.0) for k in range(len(names))] for row in rows]))
        layers = {"nodes": _ov_runtime_nodes(prof_compiled, names, net), "rounds": rounds_ms}
    threads = req["threads"]
    try:
        threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    except Exception:  # noqa: BLE001
        pass
    return {"times": times, "layers": layers, "out": out, "threads": threads, "notes": notes}


def _ov_graph(ops, rt_keys: bool) -> dict:
    info = {}
    for op in ops:
        d = {
            "inputs": [v.get_node().get_friendly_name() for v in op.input_values()],
            "consumers": [
                t.get_node().get_friendly_name() for o in op.outputs() for t in o.get_target_inputs()
            ],
        }
        if rt_keys:
            rt = op.get_rt_info()

            def get(key, rt=rt):
                try:
                    return str(rt[key].astype(str)) if key in rt else ""
                except Exception:  # noqa: BLE001
                    return ""

            d["type"] = get("layerType")
            d["original"] = [s for s in get("originalLayersNames").split(",") if s]
        else:
            d["type"] = op.get_type_name()
        info[op.get_friendly_name()] = d
    return info


def _ov_runtime_nodes(compiled, names, net):
    """Profiled node names plus the runtime graph (type, fused original layers, neighbours) and the
    front-end graph (before compilation), for attribution in the parent."""
    return {
        "profiled": [{"name": n} for n in names],
        "graph": _ov_graph(compiled.get_runtime_model().get_ordered_ops(), True),
        "frontend": _ov_graph(net.get_ordered_ops(), False),
    }


# ------------------------------------------------------------------------------------------------ driver


# ------------------------------------------------------------------------------------------ netcarve


def _run_netcarve(req, inputs, model=None):
    """netcarve's native runtime: compile (autotune sparse vs dense per conv, ``engine_options["sparse"]``:
    auto / always / never) and time the compiled plan. ``layers`` = ``{"entries": [[name, kind, kernel]],
    "rounds": [[ms per plan step]], "summary": compile summary}``."""
    import torch

    import netcarve
    from netcarve.runtime import compile as rt_compile
    from netcarve.runtime import kernel_status

    if model is None:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        model = netcarve.load(req["model"])
    torch.set_num_threads(req["threads"])
    st = kernel_status()
    if not st["available"]:
        raise EngineMissing(f"netcarve native kernels unavailable: {st['reason']}")
    args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    names = req.get("input_names")
    # (the example as compile takes it: one tensor, a tuple of the positional inputs, or a dict by argument name)
    example = dict(zip(names, args)) if names else args[0] if len(args) == 1 else tuple(args)
    opts = req.get("engine_options") or {}
    compiled = rt_compile(model.eval(), example, sparse=opts.get("sparse", "auto"),
                          codegen=bool(opts.get("codegen")))
    xs = tuple(args)  # (compiled from a dict: its inputs in forward's order)
    if names:
        xs = tuple(example[k] for k in compiled.input_names)
    out = compiled(*xs)

    def fn():
        compiled(*xs)

    kernels = {lc.name: lc.choice for lc in compiled.layers}
    step = (lambda: list(compiled._plan.profile(xs[0] if len(xs) == 1 else list(xs), 1, 0))) if req["per_layer"] \
        else None
    times, steps = run_rounds(fn, req["warmup"], req["repeats"], req["rounds"], step, "call")
    layers = None
    if step is not None:
        layers = {"entries": [[op.name, op.kind, "python" if op.kind == "python" else kernels.get(op.name, "aten")]
                              for op in compiled.ops],
                  "rounds": [central_mean(r) for r in steps], "summary": compiled.summary()}
    notes = [f"netcarve runtime: {sum(c in ('sparse', 'lanes') for c in kernels.values())} of {len(kernels)} conv / linear / recurrent layers "
             f"run the sparse kernel ({opts.get('sparse', 'auto')})"]
    n_lanes = sum(c == "lanes" for c in kernels.values())
    if n_lanes:
        pc = compiled.plan_check or {}
        notes.append(f"{n_lanes} of them in the lanes layout (16 images per vector, zeros skipped)"
                     + (f": whole plan {pc['lanes_ms']:.3f} ms against {pc['without_lanes_ms']:.3f} without it when "
                        "compiled" if "lanes_ms" in pc else ""))
    if compiled.fallback:
        py_steps = sum(op.kind == "python" for op in compiled.ops)
        notes.append(f"{py_steps} of {len(compiled.ops)} plan steps run in PyTorch (python fallback): "
                     + "; ".join(compiled.fallback[:6]) + ("; ..." if len(compiled.fallback) > 6 else ""))
    if opts.get("codegen"):
        notes.append(f"codegen: {sum(c == 'generated' for c in kernels.values())} layers run generated code")
    return {"times": times, "layers": layers, "out": [out.numpy()], "threads": torch.get_num_threads(),
            "notes": notes}


def _run_deepsparse(req, inputs, model=None):
    """DeepSparse 1.8 (Neural Magic's sparse CPU engine, end-of-life) on the ONNX file, in its own
    virtualenv; a measured peer only."""
    try:
        from deepsparse import Engine
    except ImportError as e:
        raise EngineMissing(str(e)) from None
    xs = [np.ascontiguousarray(a, dtype=np.float32) for a in inputs]
    eng = Engine(model=req["model"], batch_size=int(xs[0].shape[0]), num_cores=int(req["threads"]))
    out = eng.run(xs)

    def fn():
        eng.run(xs)

    times, _ = run_rounds(fn, req["warmup"], req["repeats"], req["rounds"], None, "call")
    import deepsparse

    return {"times": times, "layers": None, "out": [np.asarray(o) for o in out], "threads": int(req["threads"]),
            "notes": [f"deepsparse {deepsparse.__version__}, num_cores={req['threads']}"]}


_ENGINES = {"torch": _run_torch, "onnxruntime": _run_onnxruntime, "openvino": _run_openvino,
            "netcarve": _run_netcarve, "deepsparse": _run_deepsparse}


def _load_env(req):
    path = req.get("env_py")
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("_netcarve_measure_env", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.environment(req["threads"])


def run_request(req: dict, model=None) -> dict:
    """Run one request (see the module docstring) and return the result dict."""
    inputs = [np.load(p) for p in req["inputs"]]
    refs = [np.load(p) for p in req.get("reference") or []]
    try:
        got = _ENGINES[req["engine"]](req, inputs, model)
    except EngineMissing as e:
        return {
            "ok": False,
            "error_kind": "missing",
            "message": f"{e}; install it with: {_PIP[req['engine']]}",
        }
    diff, scale = _compare(got["out"], refs)
    env = _load_env(req)
    return {
        "ok": True,
        "times_ms": got["times"],
        "layers": got["layers"],
        "env": env,
        "threads_effective": got["threads"],
        "max_abs_diff": diff,
        "max_ref_abs": scale,
        "loaded": {m: m in sys.modules for m in ("torch", "onnxruntime", "openvino", "netcarve", "deepsparse")},
        "notes": got["notes"],
    }


def main(workdir: str) -> int:
    with open(os.path.join(workdir, "request.json"), encoding="utf-8") as f:
        req = json.load(f)
    try:
        result = run_request(req)
    except Exception as e:  # noqa: BLE001 - report every failure to the parent
        result = {
            "ok": False,
            "error_kind": "failed",
            "message": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
