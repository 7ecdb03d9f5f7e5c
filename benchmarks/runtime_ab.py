"""A runtime switch on and off, interleaved in one process: whole-model plans timed with a kernel switch of
netcarve's runtime on and off, alternating, so machine noise hits both sides alike. ``--models resnet56`` (default):
ResNet-56 dense, the compact 8/24/48 model, pattern 4-of-9 + connectivity, 90% unstructured; ``--models vgg16``:
VGG-16-BN dense, pattern, 90% unstructured (the CIFAR VGG with five max-pooling layers).

    python benchmarks/runtime_ab.py --switch banded --batch 1 64 --threads 2
    python benchmarks/runtime_ab.py --switch native_pool --models vgg16 --batch 1 64 --threads 2

Switches: ``banded`` (``set_banded``: each thread builds and computes its own output rows), ``row_layout``
(``set_row_layout``), ``native_pool`` (``set_native_pool``: netcarve's max pooling kernel instead of ATen's),
``small_rowtaps`` (``set_small_rowtaps``: small sparse outputs from taps regrouped by im2col row instead of
per-filter tap lists) and ``batched_small`` (``set_batched_small``: 4x4 / 2x2 sparse outputs at large batches as the
sparse weight times L1-sized im2col tiles instead of the padded wide grid), ``team`` (``set_team``: a plan's kernel
steps in one OpenMP region, loops handed over by atomics, instead of a fork / join per loop), ``lean_steps``
(``set_lean_steps``: conv outputs allocated without the dispatcher, direct convs' band offsets cached per step) and
``phase_split`` (``set_phase_split``: stride-2 band planes without per-row divisions, both column phases of a row
from one load, instead of the earlier copy); ``kx_split``, ``tiny_maps`` and ``tiny_2x2_kernels`` (the AVX-512 paths
for 3x3 stride-1 convs with whole-vector rows and for 4x4 / 2x2 maps, docs/runtime.md) and ``kx_stage``
(``set_kx_stage``: the kx-split path's large blocks staged in a per-thread copy of their rows).
``--switch lanes`` compares two compiles of each sparse model, every eligible layer sparse, without and with the
lanes layout (``lanes="never"`` / ``"always"``: 16 images per vector, netcarve.runtime.lanes; the dense models are
skipped). ``--switch codegen`` compares two compiles of each sparse model instead, ``sparse="auto"`` without and with
``codegen=True`` (per-layer generated code offered to the autotuner; the dense models are skipped). ``--switch threads``
compares each model compiled and run on one thread ("off") with the same on ``--threads`` threads ("on").
``--callers 2`` times each plan called from two Python threads at once (wall time per call, both threads'
calls counted; e.g. a server answering two requests): with ``--switch team`` the case where two plan runs compete
for the cores. ``--background T`` runs a training job in another process beside the timing (ResNet-56 in bf16 autocast on random
batches of 128, SGD, T threads, nice 10), running from before the compiles to the end: with ``--switch team`` the case where the OS
deschedules a plan's threads for another process's. ``--python-calls`` times plain calls of the compiled model from
Python (wall time, median of ``--repeats``) instead of the native timer's back-to-back runs.
Models come from the work directories of ``sparse_runtime.py`` (sparse ResNet-56 / VGG-16) and
``structural_resnet56.py`` (the compact model, ``--compact``); missing ones are skipped with a note. Every plan is
compiled once (autotuned with the switch on, the default) and timed inside the native plan: minimum over
``--rounds`` of the median of ``--repeats`` runs. Results in ``benchmarks/results/runtime_ab-<switch>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("NETCARVE_CACHE", Path.home() / ".cache" / "netcarve")) / "bench"
SWITCHES = {"codegen": None, "threads": None, "lanes": None, "banded": "set_banded", "row_layout": "set_row_layout", "native_pool": "set_native_pool",
            "small_rowtaps": "set_small_rowtaps", "batched_small": "set_batched_small", "team": "set_team",
            "lean_steps": "set_lean_steps", "phase_split": "set_phase_split", "kx_split": "set_kx_split", "tiny_maps": "set_tiny_maps", "tiny_2x2_kernels": "set_tiny_2x2_kernels",
            "kx_stage": "set_kx_stage"}


def _time_callers(plan, x, repeats: int, callers: int) -> float:
    """Wall time per call (ms) with ``callers`` Python threads each calling the plan ``repeats`` times at once."""
    import threading
    import time

    def loop():
        for _ in range(repeats):
            plan(x)

    ts = [threading.Thread(target=loop) for _ in range(callers)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return (time.perf_counter() - t0) * 1e3 / (repeats * callers)


def _median_call_ms(plan, x, repeats: int) -> float:
    import time

    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _background(threads: int):
    """A training job at nice 10 on ``threads`` threads in another process (ResNet-56 in bf16 autocast on random
    CIFAR-sized batches of 128, SGD, forward and backward), as a user's background training would run."""
    import subprocess
    import sys

    code = (f"import os, torch; os.nice(10); torch.set_num_threads({threads})\n"
            "from netcarve.models import create_model\n"
            "m = create_model('resnet56'); opt = torch.optim.SGD(m.parameters(), lr=0.01)\n"
            "x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))\n"
            "while True:\n"
            "    opt.zero_grad()\n"
            "    with torch.autocast('cpu', dtype=torch.bfloat16):\n"
            "        loss = torch.nn.functional.cross_entropy(m(x), y)\n"
            "    loss.backward(); opt.step()")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", choices=sorted(SWITCHES), default="banded")
    p.add_argument("--models", nargs="+", choices=["resnet56", "vgg16"], default=["resnet56"],
                   help="resnet56: dense, compact, pattern, unstructured90; vgg16 (VGG-16-BN, max pooling): dense, "
                        "pattern, unstructured90")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=100, help="runs per median at batch 1 (a tenth at larger batches)")
    p.add_argument("--compact", default=str(CACHE / "structural_resnet56" / "netcarve-all-r8" / "pruned"))
    p.add_argument("--sparse-dir", default=str(CACHE / "sparse_runtime"))
    p.add_argument("--callers", type=int, default=1,
                   help="Python threads calling each plan at once (> 1: wall time per call, not the native timer)")
    p.add_argument("--background", type=int, default=0,
                   help="threads of a niced CPU-bound process run beside the timing (0: none)")
    p.add_argument("--python-calls", action="store_true",
                   help="time calls from Python (median wall time) instead of the plan's native timer")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import netcarve
    from netcarve.measure import environment
    from netcarve.models import create_model
    from netcarve.runtime import compile as compile_plan
    from netcarve.runtime import kernel_status, load_kernels

    st = kernel_status()
    if not st["available"]:
        raise SystemExit(f"native kernels unavailable: {st['reason']}")
    codegen = a.switch == "codegen"
    lanes = a.switch == "lanes"
    if a.switch == "threads":
        def switch(on):
            torch.set_num_threads(a.threads if on else 1)
    else:
        switch = (lambda on: None) if codegen or lanes else getattr(load_kernels(), SWITCHES[a.switch])
    sources = {}
    if "resnet56" in a.models:
        sources.update({"dense": None, "compact": a.compact,
                        "pattern": os.path.join(a.sparse_dir, "resnet56-pattern-projected"),
                        "unstructured90": os.path.join(a.sparse_dir, "resnet56-unstructured90-projected")})
    if "vgg16" in a.models:
        sources.update({"vgg16-dense": None,
                        "vgg16-pattern": os.path.join(a.sparse_dir, "vgg16-pattern-projected"),
                        "vgg16-unstructured90": os.path.join(a.sparse_dir, "vgg16-unstructured90-projected")})
    models, skipped = {}, {}
    for name, path in sources.items():
        if path is None:
            models[name] = create_model("vgg16_bn" if name.startswith("vgg16") else "resnet56").eval()
        elif (Path(path) / "manifest.json").exists():
            models[name] = netcarve.load(path).eval()
        else:
            skipped[name] = f"no saved model at {path} (run the benchmark that makes it)"
    rows, hog = [], _background(a.background) if a.background else None
    for batch in a.batch:
        x = torch.randn(batch, 3, 32, 32)
        if a.switch == "threads":  # (off, on) = each model compiled on 1 and on --threads threads
            pairs = {}
            for k, m in models.items():
                sp = "never" if k.endswith(("dense", "compact")) else "auto"
                torch.set_num_threads(1)
                one = compile_plan(m, x, sparse=sp)
                torch.set_num_threads(a.threads)
                pairs[k] = (one, compile_plan(m, x, sparse=sp))
        elif codegen:  # (off, on) = two compiles of each sparse model
            pairs = {k: (compile_plan(m, x, sparse="auto"), compile_plan(m, x, sparse="auto", codegen=True))
                     for k, m in models.items() if not k.endswith(("dense", "compact"))}
        elif lanes:  # (off, on) = each sparse model compiled all-sparse without and with the lanes layout
            pairs = {k: (compile_plan(m, x, sparse="always", lanes="never"),
                         compile_plan(m, x, sparse="always", lanes="always"))
                     for k, m in models.items() if not k.endswith(("dense", "compact"))}
        else:  # one compile of each model, timed with the switch off and on
            pairs = {}
            for k, m in models.items():
                plan = compile_plan(m, x, sparse="never" if k.endswith(("dense", "compact")) else "always")
                pairs[k] = (plan, plan)
        plans = {k: v[1] for k, v in pairs.items()}
        repeats = a.repeats if batch == 1 else max(3, a.repeats // 10)
        times = {(k, on): [] for k in plans for on in (False, True)}
        for _ in range(a.rounds):
            for k in plans:
                for on in (False, True):
                    switch(on)
                    plan = pairs[k][on]
                    if a.python_calls:
                        for _ in range(max(3, repeats // 5)):
                            plan(x)
                        times[(k, on)].append(_median_call_ms(plan, x, repeats))
                    elif a.callers > 1:
                        _time_callers(plan, x, max(3, repeats // 5), a.callers)  # warm-up
                        times[(k, on)].append(_time_callers(plan, x, repeats, a.callers))
                    else:
                        times[(k, on)].append(plan.time(x, repeats, max(3, repeats // 5)))
        switch(True)
        for k in plans:
            off, on = min(times[(k, False)]), min(times[(k, True)])
            med_off, med_on = (statistics.median(times[(k, o)]) for o in (False, True))
            rows.append({"model": k, "batch": batch, "off_ms": off, "on_ms": on, "speedup": off / on,
                         "median_off_ms": med_off, "median_on_ms": med_on, "median_speedup": med_off / med_on,
                         "rounds_off_ms": times[(k, False)], "rounds_on_ms": times[(k, True)]})
            if codegen:
                rows[-1]["generated_layers"] = [lc.name for lc in pairs[k][1].layers if lc.choice == "generated"]
            print(f"b{batch:<3d} {k:15s} off {off:9.3f} ms  on {on:9.3f} ms  x{off / on:.2f}  (medians {med_off:.3f} / "
                  f"{med_on:.3f} ms)", flush=True)
    if hog is not None:
        if hog.poll() is not None:
            raise SystemExit(f"the background job ended early (exit code {hog.returncode})")
        hog.kill()
        hog.wait()
    suffix = (f"-callers{a.callers}" if a.callers > 1 else "") + (f"-background{a.background}" if a.background else "") \
        + ("-python" if a.python_calls else "")
    out = Path(a.out) if a.out else RESULTS / f"runtime_ab-{a.switch}{suffix}.json"
    out.write_text(json.dumps({"benchmark": "runtime_ab", "switch": a.switch, "threads": a.threads,
                               "callers": a.callers,
                               "command": f"python benchmarks/runtime_ab.py --switch {a.switch} --batch "
                                          f"{' '.join(map(str, a.batch))} --threads {a.threads}"
                                          + (f" --models {' '.join(a.models)}" if a.models != ["resnet56"] else "")
                                          + (f" --callers {a.callers}" if a.callers > 1 else "")
                                          + (f" --background {a.background}" if a.background else "")
                                          + (" --python-calls" if a.python_calls else ""),
                               "team_stalls": getattr(load_kernels(), "team_stalls", lambda: None)(),
                               "background_threads": a.background,
                               "rows": rows, "skipped": skipped, "env": environment()}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
