"""Training speed of small-map convs as one matrix product (``TrainConfig.small_conv_gemm``) against oneDNN.

Two parts, each alternating the variants in one process (minimum over ``--rounds`` of medians):

- per layer: forward + backward of single 3x3 convs (batch ``--batch``) through ``F.conv2d`` and through
  :func:`netcarve.train.small_conv.conv2d_gemm`, at the sizes where the choice matters (VGG-16's 4x4 and 2x2
  stages, and an 8x8 one where the product loses);
- whole training step (forward, loss, backward, SGD step) of a CIFAR model with the routing off (limit 0) and
  at ``--limits`` output pixels (ResNet-56's smallest convs have 64 output pixels: its rows at limits 4 and
  16 route nothing and show the run-to-run noise), in bf16 autocast + channels-last (how ``benchmarks/sparsity_cifar.py`` trains
  VGG-16) and in fp32.

    python benchmarks/train_small_conv.py --threads 2

Results in ``benchmarks/results/train_small_conv.json`` (``--out``) with the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _timing import median_ms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train_small_conv.json"
LAYERS = [(512, 512, 2), (512, 512, 4), (256, 512, 4), (256, 256, 8)]  # (C, K, H=W), 3x3, padding 1


def _alternate(fns: dict, rounds: int, repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
        fn()
    t = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):  # the order rotates every round: no variant always runs first
        for n in names[r % len(names):] + names[: r % len(names)]:
            t[n].append(median_ms(fns[n], repeats=repeats))
    return {n: min(v) for n, v in t.items()}


def _conv_fb(conv, x, w, gy) -> None:
    conv(x, w, None, 1, 1).backward(gy)


def _train_step(m, opt, x, y, bf16: bool, limit: int) -> None:
    from netcarve.train.small_conv import _ATTR

    for mod in m.modules():  # the routing's pixel limit; -1 sends every conv to oneDNN
        if hasattr(mod, _ATTR):
            setattr(mod, _ATTR, limit if limit > 0 else -1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(m(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def layer_rows(batch: int, rounds: int, repeats: int) -> list[dict]:
    from netcarve.train.small_conv import conv2d_gemm

    rows = []
    for precision in ("bf16", "fp32"):
        dt = torch.bfloat16 if precision == "bf16" else torch.float32
        for c, k, h in LAYERS:
            x = torch.randn(batch, c, h, h, dtype=dt).contiguous(memory_format=torch.channels_last).requires_grad_()
            w = torch.randn(k, c, 3, 3, dtype=dt).requires_grad_()
            gy = torch.randn(batch, k, h, h, dtype=dt).contiguous(memory_format=torch.channels_last)

            r = _alternate({"onednn": partial(_conv_fb, F.conv2d, x, w, gy),
                            "gemm": partial(_conv_fb, conv2d_gemm, x, w, gy)}, rounds, repeats)
            rows.append({"precision": precision, "in_channels": c, "out_channels": k, "size": h, "batch": batch,
                         "onednn_ms": r["onednn"], "gemm_ms": r["gemm"], "speedup": r["onednn"] / r["gemm"]})
            print(f"layer {precision} {c}->{k} {h}x{h} b{batch}: oneDNN f+b {r['onednn']:.1f} ms, one product "
                  f"{r['gemm']:.1f} ms ({r['onednn'] / r['gemm']:.2f}x)", flush=True)
    return rows


def step_rows(models: list[str], limits: list[int], batch: int, rounds: int, repeats: int) -> list[dict]:
    import netcarve.train.small_conv as sc
    from netcarve.models import create_model

    rows = []
    for name in models:
        for precision in ("bf16", "fp32"):
            torch.manual_seed(0)
            m = create_model(name).to(memory_format=torch.channels_last).train()
            opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
            x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,))

            with sc.small_map_convs(m, max(limits)) as routed:
                fns = {str(lim): partial(_train_step, m, opt, x, y, precision == "bf16", lim) for lim in [0, *limits]}
                r = _alternate(fns, rounds, repeats)
            base = r["0"]
            for lim in limits:
                rows.append({"model": name, "precision": precision, "batch": batch, "limit_pixels": lim,
                             "onednn_step_ms": base, "step_ms": r[str(lim)], "speedup": base / r[str(lim)],
                             "routable_convs": len(routed)})
                print(f"{name} {precision} b{batch} train step: oneDNN {base:.0f} ms, limit {lim} px "
                      f"{r[str(lim)]:.0f} ms ({base / r[str(lim)]:.2f}x)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--models", nargs="+", default=["vgg16_bn", "resnet56"])
    p.add_argument("--limits", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from netcarve.measure import environment

    layers = layer_rows(a.batch, a.rounds, a.repeats)
    steps = step_rows(a.models, a.limits, a.batch, a.rounds, a.repeats)
    out = Path(a.out)
    out.write_text(json.dumps({
        "benchmark": "train_small_conv", "layers": layers, "steps": steps, "env": environment(a.threads),
        "command": f"python benchmarks/train_small_conv.py --threads {a.threads} --batch {a.batch} --models "
        + " ".join(a.models) + " --limits " + " ".join(map(str, a.limits)),
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
