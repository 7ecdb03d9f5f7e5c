"""Greedy decoding with an ``nn.Transformer`` translation model: every engine runs the whole decode loop (one call
per new target token, the target one token longer each call), each engine in its own process.

    python benchmarks/greedy_decode.py --threads 2 --batches 1 8 --steps 24 \
        --out benchmarks/results/greedy_decode-zen4.json

The model: ``Seq2SeqTransformer`` of ``benchmarks/coverage_models.py`` (PyTorch's translation tutorial: embeddings,
sinusoidal positions, ``nn.Transformer`` 2 + 2 layers, d 256, 4 heads, ff 1024, a generator Linear over 5,000
target words; the causal mask and the padding masks built in forward from the ids), random weights, dense and with
every linear 90% zero in 4x16 blocks (``runtime_torch_encoder.build``). Source: 32 tokens, the last 8 padding. The
decode starts from token 1 and appends the argmax of the last position ``--steps`` times (no early stop, so every
engine does the same work); each call re-runs the encoder, as the model's forward does.

Engines:
- ``torch``: eager PyTorch.
- ``netcarve``: ``netcarve.runtime.compile(model, (src, tgt), dynamic=True)``, tuned at a target of ``steps // 2``
  tokens; every other length gets its plan on first use (with the same kernel per layer), so the first decode
  includes those compiles (``first_decode_ms``) and later decodes reuse them.
- ``onnxruntime`` / ``openvino``: one ONNX file per target length (exported once, batch dynamic; cached in
  ``--work``), one session / compiled model per length created before timing, so they run static shapes (their best
  case; the setup is not timed); onnxruntime's sessions share one global thread pool. (Neither exporter makes one
  graph for all target lengths of this model: torch.export stops on a data-dependent guard inside
  ``nn.Transformer``, and the TorchScript exporter with a dynamic length axis bakes the example's length into the
  attention reshapes, so onnxruntime fails on another length.)

Timing: two warm-up decodes, then ``--rounds`` rounds of ``--repeats`` decodes; the median decode per round, the
minimum over rounds. Every engine's tokens are checked against eager PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = ("torch", "netcarve", "onnxruntime", "openvino")


def _decode(step, src, steps: int):
    import torch

    tgt = torch.ones(src.shape[0], 1, dtype=torch.long)
    for _ in range(steps):
        logits = step(src, tgt)
        tgt = torch.cat([tgt, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tgt


def _onnx_files(model, src, steps: int, work: Path, tag: str) -> list[Path]:
    """One ONNX file per target length 1 .. steps (batch dynamic), exported once into ``work``."""
    import torch

    from netcarve.measure.export import to_onnx

    files = []
    for n in range(1, steps + 1):
        f = work / f"seq2seq-{tag}-tgt{n}.onnx"
        if not f.exists():
            tmp = f.with_name(f.stem + f".{os.getpid()}.tmp.onnx")
            to_onnx(model, (src[:1], torch.ones(1, n, dtype=torch.long)), tmp, dynamic_batch=True)
            os.replace(tmp, f)
        files.append(f)
    return files


def _engine_step(engine: str, model, src, steps: int, threads: int, work: Path, tag: str):
    """(step function (src, tgt) -> logits, setup seconds)."""
    import numpy as np
    import torch

    t0 = time.perf_counter()
    if engine == "torch":
        return model, time.perf_counter() - t0
    if engine == "netcarve":
        from netcarve.runtime import compile as ncompile

        c = ncompile(model, (src, torch.ones(src.shape[0], max(1, steps // 2), dtype=torch.long)), dynamic=True,
                     max_shapes=steps + 1)
        return c, time.perf_counter() - t0
    files = _onnx_files(model, src, steps, work, tag)
    t0 = time.perf_counter()  # (the export is cached work, not the engine's setup)
    if engine == "onnxruntime":
        import onnxruntime as ort
        from onnxruntime.capi import _pybind_state

        # one thread pool for all the sessions (a pool per session: 24 pools of spinning threads on 2 cores)
        _pybind_state.set_global_thread_pool_sizes(threads, 1)
        so = ort.SessionOptions()
        so.use_per_session_threads = False
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        sessions = [ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"]) for f in files]
        names = [[i.name for i in s.get_inputs()] for s in sessions]

        def step(s, t):
            n = t.shape[1] - 1
            out = sessions[n].run(None, dict(zip(names[n], (s.numpy(), t.numpy()))))[0]
            return torch.from_numpy(np.asarray(out))
    else:
        import openvino as ov

        core = ov.Core()
        cfg = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
               "INFERENCE_PRECISION_HINT": "f32"}
        requests = [core.compile_model(core.read_model(str(f)), "CPU", cfg).create_infer_request() for f in files]

        def step(s, t):
            r = requests[t.shape[1] - 1].infer({0: s.numpy(), 1: t.numpy()})
            return torch.from_numpy(np.asarray(r[0]))
    return step, time.perf_counter() - t0


def worker(a) -> None:
    import statistics

    import torch

    sys.path.insert(0, str(HERE))
    from runtime_torch_encoder import build, tokens

    torch.set_num_threads(a.threads)
    work = Path(a.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model = build(a.sparse, "seq2seq")
    src = tokens("seq2seq", a.batch)[0]
    tag = "sparse" if a.sparse else "dense"
    with torch.no_grad():
        step, setup_s = _engine_step(a.engine, model, src, a.steps, a.threads, work, tag)
        t0 = time.perf_counter()
        out = _decode(step, src, a.steps)
        first_ms = (time.perf_counter() - t0) * 1e3
        _decode(step, src, a.steps)
        rounds = []
        for _ in range(a.rounds):
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                _decode(step, src, a.steps)
                ts.append((time.perf_counter() - t0) * 1e3)
            rounds.append(statistics.median(ts))
    print(json.dumps({"engine": a.engine, "batch": a.batch, "sparse": a.sparse, "tokens": out.tolist(),
                      "decode_ms": min(rounds), "rounds_ms": rounds, "first_decode_ms": first_ms,
                      "setup_s": setup_s}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--work", default="~/.cache/netcarve/bench/greedy_decode")
    p.add_argument("--out", default=str(HERE / "results" / "greedy_decode.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sparse", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return

    from netcarve.measure.env import environment
    from netcarve.measure.latency import engine_available

    rows, skipped = [], {}
    for b in a.batches:
        for sparse in (False, True):
            ref = None
            for engine in a.engines:
                if engine in ("onnxruntime", "openvino") and not engine_available(engine):
                    skipped[engine] = "not installed"
                    continue
                cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--batch", str(b), "--steps",
                       str(a.steps), "--threads", str(a.threads), "--rounds", str(a.rounds), "--repeats",
                       str(a.repeats), "--work", a.work] + (["--sparse"] if sparse else [])
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                            "OMP_NUM_THREADS": str(a.threads)})
                if r.returncode != 0:
                    raise SystemExit(f"{engine} batch {b} failed:\n{r.stderr[-3000:]}")
                row = json.loads(r.stdout.strip().splitlines()[-1])
                if engine == "torch":
                    ref = row["tokens"]
                row["tokens_match_torch"] = ref is not None and row["tokens"] == ref
                del row["tokens"]
                rows.append(row)
                print(f"batch {b} {'sparse' if sparse else 'dense'} {engine}: {row['decode_ms']:.1f} ms per decode "
                      f"(first {row['first_decode_ms']:.0f} ms, setup {row['setup_s']:.1f} s, tokens match: "
                      f"{row['tokens_match_torch']})", file=sys.stderr)
    out = {"benchmark": "greedy_decode", "command": "python benchmarks/greedy_decode.py " + " ".join(sys.argv[1:]),
           "model": "Seq2SeqTransformer d 256, 4 heads, ff 1024, 2 + 2 layers, vocab 5000 + 5000; source 32 tokens "
                    "(last 8 padding)", "steps": a.steps, "threads": a.threads, "rows": rows, "skipped": skipped,
           "env": environment(threads=a.threads)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
