"""Runtime coverage: which models ``netcarve.runtime.compile`` runs, and how much of each natively.

    python benchmarks/runtime_coverage.py [--out benchmarks/results/runtime_coverage.json] [--models a b ...]

For every model of the pruning coverage benchmark (``benchmarks/coverage.py``: the netcarve zoo and the external
architectures of ``benchmarks/coverage_models.py``, random init, eval mode, batch 2): compile it twice, dense
(``sparse="never"``, the lowering does not depend on the weights' zeros):

* ``fallback=False`` (strict): does the whole model lower to native steps? If not, the error names the first
  module or op the plan does not lower.
* ``fallback=True`` (the default): the plan's step count, its "python" steps (runs of unsupported nodes that
  PyTorch executes inside the plan) and the nodes they hold; ``ok`` = the plan's output (and its plain-PyTorch
  twin's) matches the model's: max abs error <= 1e-4 x the output's max abs value.

No timing: latency is ``benchmarks/sparse_runtime.py`` / ``netcarve bench`` (every engine in its own process).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# benchmarks/coverage.py under another name ("coverage" is also the coverage.py package)
_spec = importlib.util.spec_from_file_location("netcarve_bench_coverage", HERE / "coverage.py")
_cov = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = _cov
    _spec.loader.exec_module(_cov)
build, model_names = _cov.build, _cov.model_names

RTOL = 1e-4
DEFAULT_OUT = HERE / "results" / "runtime_coverage.json"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def record(name: str, source: str) -> dict:
    from netcarve.runtime import compile as rt_compile

    model, x = build(name, source)
    xs = x if isinstance(x, tuple) else (x,)  # (a model of several inputs: their tuple)
    xs = tuple(torch.cat([t, t.flip(0) if t.dtype.is_floating_point else t]) if t.shape[0] == 1 else t for t in xs)
    x = xs if len(xs) > 1 else xs[0]
    rec: dict = {"model": name, "source": source}
    try:
        rt_compile(model, x, sparse="never", fallback=False, repeats=2)
        rec["strict"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded
        rec["strict"] = f"{type(e).__name__}: {str(e).split('; supported:')[0]}"
    t0 = time.perf_counter()
    try:
        c = rt_compile(model, x, sparse="never", repeats=2)
        with torch.no_grad():
            ref = model(*xs)
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            err, err_ref = _rel(c(*xs), ref), _rel(c.reference(*xs), ref)
        rec.update({"ok": err <= RTOL and err_ref <= RTOL, "native": c.native, "steps": len(c.ops),
                    "python_steps": sum(op.kind == "python" for op in c.ops), "fallback_nodes": c.fallback,
                    "rel_err": err, "reference_rel_err": err_ref})
    except Exception as e:  # noqa: BLE001 - recorded
        rec.update({"ok": False, "error": f"{type(e).__name__}: {e}"})
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from netcarve.measure import environment
    from netcarve.runtime import kernel_status

    st = kernel_status()
    if not st["available"]:
        raise SystemExit(f"native kernels unavailable: {st['reason']}")
    t0 = time.time()
    rows = []
    for name, source in model_names():
        if a.models and name not in a.models:
            continue
        r = record(name, source)
        rows.append(r)
        print(f"{name:22s} strict {'ok' if r['strict'] == 'ok' else 'no'}  fallback "
              f"{'ok' if r['ok'] else 'FAIL'}  steps {r.get('steps', '-'):>4}  python {r.get('python_steps', '-'):>3}"
              f"  {r['strict'] if r['strict'] != 'ok' else ''}"[:200], flush=True)
    totals = {"models": len(rows), "strict_ok": sum(r["strict"] == "ok" for r in rows),
              "fallback_ok": sum(bool(r["ok"]) for r in rows),
              "steps": sum(r.get("steps", 0) for r in rows), "python_steps": sum(r.get("python_steps", 0) for r in rows)}
    print(f"{totals['strict_ok']} of {totals['models']} models lower natively whole; {totals['fallback_ok']} run "
          f"(outputs checked) with fallback steps: {totals['python_steps']} python of {totals['steps']} steps")
    cmd = "python benchmarks/runtime_coverage.py" + (f" --models {' '.join(a.models)}" if a.models else "")
    Path(a.out).write_text(json.dumps({"benchmark": "runtime_coverage", "command": cmd, "rtol": RTOL,
                                       "seconds": round(time.time() - t0, 1), "totals": totals, "rows": rows,
                                       "env": environment()}, indent=1))
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
