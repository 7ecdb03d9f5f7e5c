"""The machine and software a measurement ran on.

This module uses only the standard library (versions come from package metadata, nothing heavy is
imported), so the engine subprocesses of :mod:`netcarve.measure.latency` can load it by file path
without importing torch.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

# CPU flags that matter for inference kernels; "amx" is true when any AMX flag is present
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx", "neon")


def _read_cpuinfo() -> tuple[str | None, set[str]]:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("vendor_id", "cpu family", "model", "stepping") and key not in _CPU_ID:
                    _CPU_ID[key] = value.strip()
                if (
                    model is None
                    and key in ("model name", "hardware", "processor")
                    and not value.strip().isdigit()
                ):
                    model = value.strip() or None
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


_CPU_ID: dict[str, str] = {}


def _cpu_id() -> str | None:
    """e.g. ``AuthenticAMD family 25 model 17 stepping 1`` (a VM's model name can be as vague as "AMD EPYC")."""
    if not _CPU_ID:
        return None
    return (f"{_CPU_ID.get('vendor_id', '?')} family {_CPU_ID.get('cpu family', '?')} "
            f"model {_CPU_ID.get('model', '?')} stepping {_CPU_ID.get('stepping', '?')}")


def _isa(flags: set[str]) -> dict[str, bool]:
    out = {k: k in flags for k in ISA_FLAGS if k not in ("amx", "neon")}
    out["amx"] = any(f.startswith("amx") for f in flags)
    out["neon"] = bool({"neon", "asimd"} & flags)
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _default_threads() -> int:
    torch = sys.modules.get("torch")  # only if already imported: never import it here
    if torch is not None:
        try:
            return int(torch.get_num_threads())
        except Exception:  # noqa: BLE001 - a half-initialised torch must not break the report
            pass
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() else _logical_cores()


def _logical_cores() -> int:
    return os.cpu_count() or 1


def environment(threads: int | None = None) -> dict:
    """A JSON-ready description of the CPU, the thread count and the software versions.

    Keys: ``cpu_model``, ``cpu_id`` (vendor, family, model, stepping), ``isa`` (``{flag: bool}`` for ``avx2, avx512f, avx512_vnni, avx512_bf16,
    avx_vnni, amx, neon``), ``logical_cores``, ``usable_cores`` (CPU affinity of this process),
    ``threads`` (``threads`` if given, else torch's current setting when torch is already imported, else
    ``OMP_NUM_THREADS``, else the logical core count), ``machine``, ``python``, ``os``, and the versions
    ``torch``, ``onnx``, ``onnxruntime``, ``openvino``, ``numpy``, ``netcarve`` (None when not installed).
    """
    model, flags = _read_cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = _logical_cores()
    return {
        "cpu_model": model or platform.processor() or None,
        "cpu_id": _cpu_id(),
        "isa": _isa(flags),
        "logical_cores": _logical_cores(),
        "usable_cores": usable,
        "threads": int(threads) if threads is not None else _default_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-openvino"),
        "openvino": _version("openvino"),
        "numpy": _version("numpy"),
        "netcarve": _version("netcarve"),
    }
