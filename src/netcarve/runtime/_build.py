"""Compile the native kernels for this CPU at first use, cache them, or say clearly why not.

The C++ sources in ``csrc/`` are built as a PyTorch extension (``torch.utils.cpp_extension.load``, g++ with
``-O3 -march=native -fopenmp``), so the kernels split work over torch's own thread pool and respect
``torch.set_num_threads``. Binaries are cached under ``$NETCARVE_CACHE`` (default ``~/.cache/netcarve``)
``/kernels/<cpu key>-<source hash>-torch<version>``, compiled from copies of the sources staged in that directory
(so every checkout of the same sources shares one binary): a new CPU model, changed sources or another torch
build compile afresh; everything else loads in milliseconds.

``NETCARVE_KERNELS=off`` disables them (the pure-PyTorch reference path runs instead). When no compiler is
found or the build fails, :func:`load_kernels` logs one clear warning naming the reason and returns None;
:func:`kernel_status` reports it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("sparse_conv.cpp", "sparse_linear.cpp", "pool.cpp", "depthwise.cpp", "transformer.cpp", "lanes.cpp",
           "plan.cpp")
HEADERS = ("kernels.h",)
_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "error": None, "tried": False, "build_dir": None}


def cache_root() -> Path:
    return Path(os.environ.get("NETCARVE_CACHE", str(Path.home() / ".cache" / "netcarve")))


def cpu_key() -> str:
    """A short, filesystem-safe name of this CPU model (binaries built with -march=native are per CPU)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40] or "cpu"
    return f"{slug}-{hashlib.sha1((name + flags).encode()).hexdigest()[:8]}"


def source_hash() -> str:
    h = hashlib.sha1()
    for s in SOURCES + HEADERS:
        h.update((CSRC / s).read_bytes())
    return h.hexdigest()[:12]


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx) or shutil.which("g++")


def kernel_status() -> dict[str, Any]:
    """``{"available": bool, "reason": str | None, "build_dir": str | None, "info": str | None}``."""
    m = load_kernels()
    return {"available": m is not None, "reason": _state["error"], "build_dir": _state["build_dir"],
            "info": m.build_info() if m is not None else None}


def load_kernels(verbose: bool = False):
    """The compiled kernel module, or None (reason in :func:`kernel_status`). Thread-safe; builds once."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["module"], _state["error"] = _build(verbose)
        _state["tried"] = True
        if _state["error"]:
            logger.warning("netcarve native kernels unavailable (%s); using the PyTorch reference path",
                           _state["error"])
        return _state["module"]


def _build(verbose: bool):
    if os.environ.get("NETCARVE_KERNELS", "").lower() in ("0", "off", "false", "no"):
        return None, "disabled by NETCARVE_KERNELS=off"
    if _compiler() is None:
        return None, "no C++ compiler found (install g++ or set CXX)"
    try:
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - part of every torch
        return None, f"torch.utils.cpp_extension unavailable: {e}"
    tv = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    name = f"netcarve_kernels_{source_hash()}"
    build_dir = cache_root() / "kernels" / f"{cpu_key()}-{source_hash()}-torch{tv}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _state["build_dir"] = str(build_dir)
    try:
        sources = staged_sources(build_dir)
        mod = cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as e:  # compiler errors, missing headers, ninja missing: all mean "not available"
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()][:2] or lines[-1:] or [type(e).__name__]
        return None, f"building the kernels in {build_dir} failed: {' | '.join(errs)}"
    return mod, None


def staged_sources(build_dir: Path) -> list[str]:
    """The kernel sources as copies inside ``build_dir`` (written once; the directory name holds their hash).

    Built from ``csrc/`` directly, the ninja file named the checkout's paths, so another checkout of the same
    sources (a clean clone, CI) rebuilt the shared binary and the first checkout rebuilt it again (measured:
    1.5 min each time on a Zen 4 VM). Copies that already exist are left untouched, so their times do not
    trigger a rebuild either."""
    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    for s in SOURCES + HEADERS:
        dst = src / s
        if not dst.exists():
            tmp = src / f".{s}.{os.getpid()}.tmp"
            tmp.write_bytes((CSRC / s).read_bytes())
            os.replace(tmp, dst)
    return [str(src / s) for s in SOURCES]


def _reset_for_tests() -> None:
    _state.update(module=None, error=None, tried=False, build_dir=None)
