"""Single kernels against their dense twins, side by side in one process: the sparse direct conv (pattern 4-of-9 +
connectivity 3.6x, 12% dense) against torch's dense conv (oneDNN) on ResNet-56 / VGG-16 layer shapes, and the BSR
linear kernel (90% sparse in 4x16 / 16x16 tiles) against torch.addmm (MKL) on GRU/LSTM-sized gate matrices.

    python benchmarks/kernels.py --threads 2

Median of ``--repeats`` calls after warm-up, from Python (the same call overhead for both sides); results in
``benchmarks/results/kernels.json`` with the environment. Linear rows are also timed the way the runtime calls
them, from C++ (a one-step native plan each, dense = ATen's addmm, sparse = the BSR kernel: ``*_native_ms``), since
at these sizes a Python call costs as much as the sparse matmul; plus netcarve's own dense kernel, which plans use for
batches of at most 4 rows and its dense panel kernel above that (``netcarve_dense_native_ms``; before 2026-12-07 that
was addmm again at batch 32), and the BSR kernel's speedup
over the faster of the two dense ones (``native_speedup_vs_fastest_dense``). ``--only linear`` skips the convs. Correctness is
the tests' job; each row also records the max abs difference to the dense twin.

``--only depthwise``: netcarve's depthwise conv kernel against ATen's (oneDNN) on the depthwise layers of the CIFAR
MobileNetV2 (3x3, BN folded, ReLU fused), each as a one-step native plan (the way plans run them), the two
alternated over ``--rounds`` rounds, minimum of the per-round medians; batch 1 and 64.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"

CONVS = [(16, 16, 32), (32, 32, 16), (64, 64, 8), (64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4),
         (512, 512, 2)]
LINEARS = [(384, 128), (1536, 512), (4096, 1024)]


def _time(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def _depthwise_shapes() -> list[tuple[int, int, int, int, int]]:
    """(channels, input size, stride, kernel, padding) of the CIFAR MobileNetV2's depthwise convs, distinct."""
    from netcarve.models import create_model

    m = create_model("mobilenetv2").eval()
    shapes = set()

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d) and mod.groups > 1:
            shapes.add((mod.in_channels, inp[0].shape[2], mod.stride[0], mod.kernel_size[0], mod.padding[0]))

    hs = [mm.register_forward_hook(hook) for mm in m.modules()]
    m(torch.randn(1, 3, 32, 32))
    for h in hs:
        h.remove()
    return sorted(shapes)


def _depthwise_rows(mod, a) -> list[dict]:
    """ATen's conv (plan kernel 0) against netcarve's depthwise kernel (4), one-step plans, alternated."""
    rows = []
    for n in (1, 64):
        for c, hw, s, k, pad in _depthwise_shapes():
            x = torch.randn(n, c, hw, hw)
            w = torch.randn(c, 1, k, k)
            b = torch.randn(c)
            plans = {}
            for name, kern in (("aten", 0), ("netcarve", 4)):
                plans[name] = mod.Plan(2, 1)
                plans[name].add_conv("dw", [0], 1, w, b, [], None, s, pad, c, True, kern)
            ref = torch.relu(torch.nn.functional.conv2d(x, w, b, s, pad, 1, c))
            diff = float((plans["netcarve"].run(x) - ref).abs().max())
            reps = max(20, a.repeats * 10 // (n * c * hw * hw // 16384 + 1))
            t = {name: [] for name in plans}
            for _ in range(a.rounds):
                for name, pl in plans.items():
                    t[name].append(pl.time(x, reps, max(3, reps // 10)))
            aten, ours = min(t["aten"]), min(t["netcarve"])
            rows.append({"kernel": "depthwise_conv2d", "shape": f"{c}x{hw}x{hw} k{k} s{s}", "batch": n,
                         "aten_native_ms": aten, "netcarve_native_ms": ours, "speedup": aten / ours,
                         "max_abs_diff": diff, "repeats": reps, "rounds": a.rounds})
            print(f"depthwise {c}x{hw}x{hw} k{k} s{s} N={n}: ATen {aten * 1e3:.1f} us, netcarve {ours * 1e3:.1f} us, "
                  f"{aten / ours:.2f}x", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--only", choices=["all", "conv", "linear", "depthwise"], default="all")
    p.add_argument("--rounds", type=int, default=3, help="depthwise: alternated rounds (minimum of the medians)")
    p.add_argument("--out", default=str(RESULTS), help="results JSON (default benchmarks/results/kernels.json; "
                   "e.g. kernels-avx2.json for a machine of another ISA)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from netcarve.measure import environment
    from netcarve.runtime import SparseConv2d, kernel_status, load_kernels
    from netcarve.runtime.kernels import bsr_tensors, direct_pack
    from netcarve.sparsity import make_scheme

    st = kernel_status()
    if not st["available"]:
        raise SystemExit(f"native kernels unavailable: {st['reason']}")
    mod = load_kernels()
    rows = []
    torch.manual_seed(0)
    pattern = make_scheme("pattern", connectivity=1 - 1 / 3.6)
    with torch.inference_mode():
        for c, f, hw in CONVS if a.only in ("all", "conv") else []:
            w = torch.randn(f, c, 3, 3)
            w = w * pattern.project(w, pattern.default_level())
            b = torch.randn(f)
            for n in (1, 64):
                x = torch.randn(n, c, hw, hw)
                m = SparseConv2d(w, b, 1, 1, relu=True)
                dense = _time(lambda x=x, w=w, b=b: torch.relu(torch.conv2d(x, w, b, 1, 1)), max(10, a.repeats // (n // 8 + 1)))
                sparse = _time(lambda m=m, x=x: m(x), max(10, a.repeats // (n // 8 + 1)))
                wp = direct_pack(w)

                def direct(x=x, wp=wp, b=b, f=f):  # netcarve's dense direct kernel (every tap, zeros included)
                    return mod.direct_conv2d(x, wp, b, None, f, 3, 3, 1, 1, True)

                direct_ms = _time(direct, max(10, a.repeats // (n // 8 + 1)))
                ref = torch.relu(torch.conv2d(x, w, b, 1, 1))
                diff = float((m(x) - ref).abs().max())
                gflop = 2 * n * f * c * 9 * hw * hw / 1e9
                rows.append({"kernel": "sparse_conv2d", "shape": f"{c}->{f} 3x3 at {hw}x{hw}", "batch": n,
                             "density": float((w != 0).float().mean()), "dense_ms": dense, "sparse_ms": sparse,
                             "speedup": dense / sparse, "max_abs_diff": diff, "direct_ms": direct_ms,
                             "direct_vs_dense": dense / direct_ms, "direct_max_abs_diff": float((direct() - ref).abs().max()),
                             "dense_gflops": gflop / dense * 1e3, "direct_gflops": gflop / direct_ms * 1e3})
                print(f"conv {c}->{f} {hw}x{hw} n={n}: dense {dense:.3f} ms, sparse {sparse:.3f} ms, "
                      f"{dense / sparse:.2f}x; dense direct {direct_ms:.3f} ms ({dense / direct_ms:.2f}x oneDNN)",
                      flush=True)
        for r, k in LINEARS if a.only in ("all", "linear") else []:
            for blk in ([4, 16], [16, 16]):
                w = torch.randn(r, k)
                w = w * make_scheme("block", block=blk).project(w, 0.9)
                b = torch.randn(r)
                bt = bsr_tensors(w, tuple(blk))
                for m_ in (1, 32):
                    x = torch.randn(m_, k)
                    dense = _time(lambda b=b, x=x, w=w: torch.addmm(b, x, w.t()), a.repeats * 5)
                    sparse = _time(lambda x=x, bt=bt, b=b, r=r: mod.bsr_linear(x, *bt, b, r), a.repeats * 5)
                    diff = float((mod.bsr_linear(x, *bt, b, r) - torch.addmm(b, x, w.t())).abs().max())
                    native = {}
                    # dense: ATen's addmm, and netcarve's own dense kernels (batches <= 4: the dot-product one; more
                    # rows: the panel kernel, the plan's "direct" linear)
                    for kind, sp, small in (("dense", False, False), ("netcarve_dense", False, True),
                                            ("sparse", True, True)):
                        plan = mod.Plan(2, 1)
                        plan.add_linear("fc", 0, 1, w, b, False, list(bt), sp, kind == "netcarve_dense")
                        reps = a.repeats * 25
                        mod.set_dense_small_linear(small)
                        native[kind] = min(plan.time(x, reps, reps // 10) for _ in range(3))
                    mod.set_dense_small_linear(True)
                    fastest = min(native["dense"], native["netcarve_dense"])
                    rows.append({"kernel": "bsr_linear", "shape": f"{r}x{k} block {blk[0]}x{blk[1]}", "batch": m_,
                                 "density": float((w != 0).float().mean()), "dense_ms": dense, "sparse_ms": sparse,
                                 "speedup": dense / sparse, "max_abs_diff": diff,
                                 "dense_native_ms": native["dense"], "sparse_native_ms": native["sparse"],
                                 "native_speedup": native["dense"] / native["sparse"],
                                 "netcarve_dense_native_ms": native["netcarve_dense"],
                                 "native_speedup_vs_fastest_dense": fastest / native["sparse"]})
                    print(f"linear {r}x{k} {blk} M={m_}: dense {dense * 1e3:.1f} us, bsr {sparse * 1e3:.1f} us, "
                          f"{dense / sparse:.2f}x; from C++ {native['dense'] * 1e3:.1f} / {native['sparse'] * 1e3:.1f}"
                          f" us, {native['dense'] / native['sparse']:.2f}x; netcarve dense "
                          f"{native['netcarve_dense'] * 1e3:.1f} us, fastest dense / bsr "
                          f"{fastest / native['sparse']:.2f}x", flush=True)
        if a.only in ("all", "depthwise"):
            rows += _depthwise_rows(mod, a)
    env = environment(a.threads)
    env["kernels"] = st["info"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = f"python benchmarks/kernels.py --threads {a.threads}" + (f" --only {a.only}" if a.only != "all" else "") \
        + (f" --out {a.out}" if out != RESULTS else "")
    doc = {"benchmark": "kernels", "command": cmd, "rows": rows, "env": env}
    if a.only != "all" and out.exists():  # keep the other kernels' rows (and their command / environment)
        old = json.loads(out.read_text())
        ran = {"linear": "bsr_linear", "conv": "sparse_conv2d", "depthwise": "depthwise_conv2d"}[a.only]
        prev = {(r["shape"], r["batch"]): r for r in old.get("rows", []) if r.get("kernel") == ran}
        for r in rows:
            o = prev.get((r["shape"], r["batch"]))
            if o:
                r["previous"] = {k: o[k] for k in ("dense_ms", "sparse_ms", "speedup") if k in o}
        kept = [r for r in old.get("rows", []) if r.get("kernel") != ran]
        doc = {"benchmark": "kernels", "command": cmd, "rows": kept + rows, "env": env,
               "earlier": {"command": old.get("command"), "env": old.get("env"), "kept_rows": len(kept)}}
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
