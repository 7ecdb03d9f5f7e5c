"""Where DeepSparse is faster, layer by layer: the sparse models of ``sparse_runtime.py`` profiled per layer in
netcarve's runtime (``CompiledModel.profile``: each step timed inside the native plan) and in DeepSparse 1.8
(``deepsparse.debug_analysis`` on the same sparse ONNX, run in its own virtualenv as a separate process; a measured
peer, never a dependency), side by side.

    python benchmarks/deepsparse_layers.py --models vgg16-unstructured90 --batch 64 --threads 2

DeepSparse reports the units it schedules, not PyTorch's modules: a sparse conv (``ks_convolution``), or a "pyramid"
(its fused tiles through a conv and the pooling after it, or through several layers). Each of its units is matched to
the run of netcarve steps that ends with the same output shape (channels x map) and holds as many convs as the unit
names (the ``getitem_*`` in its canonical name), in order; the rows give both times for that run and the ratio, plus
the non-zero multiply-adds per second of each (2 x non-zero weights x output positions / time: "useful GFLOP/s"),
next to this CPU's measured fp32 FMA peak when ``--peak`` is given. The models come from ``sparse_runtime.py``'s work
directory (``~/.cache/netcarve/bench/sparse_runtime``; run it first). DeepSparse's interpreter: ``--deepsparse-python``,
``$NETCARVE_DEEPSPARSE_PYTHON`` or ``~/.cache/netcarve/venvs/deepsparse/bin/python`` (README: how to make it).
Results in ``benchmarks/results/deepsparse_layers-<cpu>.json`` (``--out``) with the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from _cxx_probe import RESULTS, cpu_slug

CACHE = Path(os.environ.get("NETCARVE_CACHE", Path.home() / ".cache" / "netcarve")) / "bench" / "sparse_runtime"


def _shapes_and_macs(plan) -> tuple[dict, dict]:
    """Per plan step: its output's (channels, height) (height 1 for 2-D outputs), and for the tuned layers (convs,
    linears, recurrent layers) the multiply-adds with a non-zero weight at the plan's example batch, as the plan
    counts them."""
    shapes = {op.name: (int(op.out_shape[1]), int(op.out_shape[2]) if len(op.out_shape) == 4 else 1)
              for op in plan.ops if op.out_shape and len(op.out_shape) >= 2}
    return shapes, {lc.name: lc.nonzero_macs for lc in plan.layers}


def _deepsparse_layers(python: str, onnx_path: Path, batch: int, threads: int, iters: int) -> dict:
    out = onnx_path.with_suffix(".analysis.json")
    cmd = [python, "-m", "deepsparse.debug_analysis", str(onnx_path), "-b", str(batch), "-ncores", str(threads),
           "-wi", str(max(3, iters // 4)), "-bi", str(iters), "-q", "-x", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    if r.returncode != 0 or not out.exists():
        raise SystemExit(f"deepsparse.debug_analysis failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(out.read_text())


def _match(ds_units: list[dict], steps: list[dict], shapes: dict) -> list[tuple[dict, list[dict]]]:
    """DeepSparse's units in order, each with the run of netcarve steps it covers (see the module docstring)."""
    pairs, i = [], 0
    for u in ds_units:
        want = (u["output_dims"]["channels"], u["output_dims"]["y"])
        nconv = sum(t.startswith("getitem") for t in u["canonical_name"].split(","))
        convs = 0
        for j in range(i, len(steps)):
            convs += steps[j]["kind"] == "conv"
            if shapes.get(steps[j]["name"]) == want and convs >= nconv and (nconv > 0 or steps[j]["kind"] != "conv"):
                pairs.append((u, steps[i:j + 1]))
                i = j + 1
                break
        else:  # no run of steps ends in this unit's output: left unmatched (and the steps for the next units)
            pairs.append((u, []))
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg16-unstructured90", "vgg16-pattern"],
                   help="sparse_runtime.py's saved models: {resnet56,vgg16}-{pattern,unstructured90}")
    p.add_argument("--batch", type=int, nargs="+", default=[64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=20, help="DeepSparse iterations; netcarve: repeats of its profile")
    p.add_argument("--peak", type=float, default=None, help="the CPU's measured fp32 FMA peak (GFLOP/s), printed beside")
    p.add_argument("--deepsparse-python", default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import netcarve
    from netcarve.measure import environment
    from netcarve.measure.export import to_onnx
    from netcarve.measure.latency import _cap_ir_version, deepsparse_python
    from netcarve.runtime import compile as compile_plan

    py = deepsparse_python(a.deepsparse_python)
    if py is None:
        raise SystemExit("DeepSparse not found: make its virtualenv (README, 'DeepSparse') or pass --deepsparse-python")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            path = CACHE / f"{name}-projected"
            if not (path / "manifest.json").exists():
                print(f"{name}: no saved model at {path} (run benchmarks/sparse_runtime.py first); skipped")
                continue
            model = netcarve.load(path).eval()
            for batch in a.batch:
                x = torch.randn(batch, 3, 32, 32)
                onnx_path = Path(tmp) / f"{name}-b{batch}.onnx"
                to_onnx(model, (x,), onnx_path)
                _cap_ir_version(onnx_path, 9)
                ds = _deepsparse_layers(py, onnx_path, batch, a.threads, a.iters)
                plan = compile_plan(model, x)
                steps = min((plan.profile(x, repeats=max(5, a.iters), warmup=3) for _ in range(3)),
                            key=lambda ss: sum(s["ms"] for s in ss))
                shapes, macs = _shapes_and_macs(plan)
                units = [u for u in ds["layer_info"] if u["output_dims"]["channels"] > 0]
                rows = []
                print(f"\n{name}, batch {batch}, {a.threads} threads: DeepSparse {ds['average_total_time']:.3f} ms, "
                      f"netcarve {sum(s['ms'] for s in steps):.3f} ms (sum of steps)"
                      + (f"; fp32 FMA peak {a.peak:g} GFLOP/s" if a.peak else ""))
                print(f"{'DeepSparse unit':30s} {'netcarve steps':34s} {'DS ms':>8s} {'nc ms':>8s} {'nc/DS':>6s} "
                      f"{'DS GF/s':>8s} {'nc GF/s':>8s}")
                for u, run in _match(units, steps, shapes):
                    if not run:
                        rows.append({"deepsparse_unit": u["name"], "deepsparse_ops": u["canonical_name"],
                                     "deepsparse_ms": u["average_run_time_in_ms"], "netcarve_steps": []})
                        print(f"{u['name'][:30]:30s} {'(unmatched)':34s} {u['average_run_time_in_ms']:8.3f}")
                        continue
                    nc_ms = sum(s["ms"] for s in run)
                    ds_ms = u["average_run_time_in_ms"]
                    useful = 2 * sum(macs.get(s["name"], 0) for s in run) / 1e9
                    rows.append({"deepsparse_unit": u["name"], "deepsparse_ops": u["canonical_name"],
                                 "output": [u["output_dims"]["channels"], u["output_dims"]["y"]],
                                 "deepsparse_kernel_sparsity": u["kernel_sparsity"],
                                 "deepsparse_activation_sparsity": u["activation_sparsity"],
                                 "netcarve_steps": [s["name"] for s in run],
                                 "netcarve_kernels": [s["kernel"] for s in run],
                                 "deepsparse_ms": ds_ms, "netcarve_ms": nc_ms,
                                 "netcarve_over_deepsparse": nc_ms / ds_ms if ds_ms else None,
                                 "useful_gflop": useful,
                                 "deepsparse_useful_gflops": useful / ds_ms * 1e3 if ds_ms else None,
                                 "netcarve_useful_gflops": useful / nc_ms * 1e3 if nc_ms else None})
                    r = rows[-1]
                    print(f"{u['name'][:30]:30s} {','.join(r['netcarve_steps'])[:34]:34s} {ds_ms:8.3f} {nc_ms:8.3f} "
                          f"{nc_ms / ds_ms if ds_ms else float('nan'):6.2f} "
                          f"{r['deepsparse_useful_gflops'] or 0:8.1f} {r['netcarve_useful_gflops'] or 0:8.1f}")
                results.append({"model": name, "batch": batch, "deepsparse_total_ms": ds["average_total_time"],
                                "netcarve_steps_total_ms": sum(s["ms"] for s in steps), "units": rows,
                                "unmatched_netcarve_steps": len(steps) - sum(len(r["netcarve_steps"]) for r in rows)})
    env = environment(threads=a.threads)
    out = a.out or RESULTS / f"deepsparse_layers-{cpu_slug(env)}.json"
    out.write_text(json.dumps({"benchmark": "deepsparse_layers", "threads": a.threads, "peak_gflops": a.peak,
                               "command": f"python benchmarks/deepsparse_layers.py --models {' '.join(a.models)} "
                                          f"--batch {' '.join(map(str, a.batch))} --threads {a.threads}",
                               "rows": results, "env": env}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
