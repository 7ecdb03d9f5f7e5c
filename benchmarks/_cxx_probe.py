"""Shared by the standalone C++ probes (``codegen_probe.py``, ``outer_probe.py``, ``share_probe.py``, ``l1_probe.py``):
build a generated source with g++ for this host, run it, and write the probe's results JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from netcarve.measure import environment

RESULTS = Path(__file__).resolve().parent / "results"


def build_and_run(src: str, args: list[str], opt: str = "-O3", flags: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> tuple[dict, int, float]:
    """Compile ``src`` (g++ ``opt`` -march=native ``flags``), run it with ``args`` (and ``env`` added to this process's
    environment) and parse its stdout as JSON. Returns the parsed output, the bytes of code in the generated functions
    (static ``gen*`` symbols) and the compile seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        cpp, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        cpp.write_text(src)
        t0 = time.perf_counter()
        subprocess.run(["g++", opt, "-march=native", *flags, "-o", str(exe), str(cpp)], check=True)
        compile_s = time.perf_counter() - t0
        syms = subprocess.run(["nm", "-S", "--size-sort", str(exe)], capture_output=True, text=True).stdout
        code = sum(int(m.group(1), 16) for m in re.finditer(r"^[0-9a-f]+ ([0-9a-f]+) t _ZL\d+gen\d+", syms, re.M))
        out = subprocess.run([str(exe), *args], capture_output=True, text=True, check=True,
                             env={**os.environ, **env} if env else None).stdout
    return json.loads(out), code, compile_s


def cpu_slug(env: dict) -> str:
    """The CPU model as a file-name part (results/<probe>-<cpu>.json)."""
    return re.sub(r"[^a-z0-9]+", "-", str(env.get("cpu_model", "cpu")).lower()).strip("-")


def save_probe(name: str, res: dict, out: Path | None) -> Path:
    """A probe's parsed output with its command and the environment, in ``out`` or
    ``benchmarks/results/<name>-<cpu>.json``."""
    env = environment()
    path = out or RESULTS / f"{name}-{cpu_slug(env)}.json"
    path.write_text(json.dumps({"benchmark": name, "command": f"python benchmarks/{name}.py", **res, "env": env},
                               indent=1))
    print(f"results: {path}")
    return path


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def write_results(name: str, out: Path | None, reps: int, rounds: int, rows: list[dict]) -> None:
    """``benchmarks/results/<name>.json`` (or ``out``) with the rows, the command and the environment (1 thread)."""
    doc = {"benchmark": name, "command": f"python benchmarks/{name}.py" + (f" --out {out}" if out else ""),
           "reps": reps, "rounds": rounds, "rows": rows, "env": environment(threads=1)}
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
