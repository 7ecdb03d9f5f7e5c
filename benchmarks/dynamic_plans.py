"""What another input size costs a ``compile(..., dynamic=True)`` model: the compile of its plan on first use and the
resident memory that plan adds, with the plans sharing the example plan's weights and packed forms (the runtime's
behaviour) and without (``_share_payloads`` switched off: every plan lowers and packs its own copies), side by side.

    python benchmarks/dynamic_plans.py --threads 2 --out benchmarks/results/dynamic_plans-zen4.json

The model: the ``Seq2SeqTransformer`` of ``runtime_torch_encoder.py`` / ``greedy_decode.py`` (d 256, 2 + 2 layers,
5000-word vocabularies), dense and with every linear 90% zero in 4x16 blocks, compiled at a target of 12 tokens; then
target lengths 1 .. ``--sizes`` (other than 12) are called once each. Each (weights, sharing) cell runs in its own
process, so resident memory is measured from a fresh start: the growth of the process's resident set over those
calls, divided by the number of new plans; compile time per new size is the median first-call time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(sparse: bool, share: bool, sizes: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from runtime_torch_encoder import build, tokens

    import netcarve.runtime.compiled as compiled_mod
    from netcarve.runtime import compile as ncompile

    if not share:
        compiled_mod._share_payloads = lambda ops, parent: None
    torch.set_num_threads(threads)
    m = build(sparse, "seq2seq")
    src = tokens("seq2seq", 1)[0]
    c = ncompile(m, (src, torch.ones(1, 12, dtype=torch.long)), dynamic=True, max_shapes=sizes + 1)
    lengths = [n for n in range(1, sizes + 1) if n != 12]
    first_ms = []
    with torch.no_grad():
        c(src, torch.ones(1, 12, dtype=torch.long))
        rss0 = _rss_mb()
        for n in lengths:
            t = torch.ones(1, n, dtype=torch.long)
            t0 = time.perf_counter()
            y = c(src, t)
            first_ms.append((time.perf_counter() - t0) * 1e3)
            assert torch.allclose(y, m(src, t), atol=1e-4 * float(y.abs().max()))
        rss1 = _rss_mb()
    return {"sparse": sparse, "share": share, "new_plans": len(lengths), "compile_ms_median": statistics.median(first_ms),
            "compile_ms": first_ms, "rss_mb_per_plan": (rss1 - rss0) / len(lengths)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, default=16, help="target lengths 1 .. this are called")
    p.add_argument("--out", default=str(HERE / "results" / "dynamic_plans.json"))
    p.add_argument("--worker", nargs=2, metavar=("SPARSE", "SHARE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0] == "1", a.worker[1] == "1", a.sizes, a.threads)))
        return
    from netcarve.measure.env import environment

    rows = []
    for sparse in (False, True):
        for share in (True, False):
            r = subprocess.run([sys.executable, __file__, "--worker", str(int(sparse)), str(int(share)), "--sizes",
                                str(a.sizes), "--threads", str(a.threads)], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-3000:])
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{'sparse' if sparse else 'dense '} {'shared ' if share else 'copies '} compile "
                  f"{row['compile_ms_median']:.1f} ms per new size, {row['rss_mb_per_plan']:.1f} MB per plan",
                  file=sys.stderr)
    out = {"benchmark": "dynamic_plans", "command": "python benchmarks/dynamic_plans.py " + " ".join(sys.argv[1:]),
           "rows": rows, "env": environment(threads=a.threads)}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
