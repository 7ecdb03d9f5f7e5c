"""The environment record: keys, types, and no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

from netcarve.measure import env as env_mod
from netcarve.measure import environment

KEYS = {
    "cpu_model", "isa", "logical_cores", "usable_cores", "threads", "machine", "python", "os",
    "torch", "onnx", "onnxruntime", "openvino", "numpy", "netcarve",
}  # fmt: skip


def test_keys_and_types():
    env = environment(threads=3)
    assert KEYS <= set(env)
    assert env["threads"] == 3
    assert isinstance(env["logical_cores"], int) and env["logical_cores"] >= 1
    assert 1 <= env["usable_cores"] <= env["logical_cores"]
    assert set(env["isa"]) >= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx"}
    assert all(isinstance(v, bool) for v in env["isa"].values())
    assert env["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert env["torch"] is not None  # torch is a hard dependency
    json.dumps(env)  # JSON-ready


def test_default_threads_follows_torch_once_imported():
    import torch

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert environment()["threads"] == 1
    finally:
        torch.set_num_threads(old)


def test_isa_flags_from_cpuinfo_text():
    flags = {"fpu", "avx2", "avx512f", "amx_tile", "amx_bf16"}
    isa = env_mod._isa(flags)
    assert isa["avx2"] and isa["avx512f"] and isa["amx"]
    assert not isa["avx512_vnni"] and not isa["avx512_bf16"] and not isa["neon"]
    assert env_mod._isa({"asimd"})["neon"]


def test_missing_package_version_is_none():
    assert env_mod._version("surely-not-an-installed-distribution-xyz") is None


def test_module_imports_only_the_standard_library():
    # the engine subprocesses load env.py by path; it must not pull in torch or numpy
    code = (
        "import importlib.util, sys, json;"
        f"spec = importlib.util.spec_from_file_location('e', {env_mod.__file__!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "e = m.environment(2);"
        "print(json.dumps([e['threads'], 'torch' in sys.modules, 'numpy' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [2, False, False]


def test_cpu_id_names_vendor_family_and_model():
    import os

    import pytest

    from netcarve.measure import environment

    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo on this platform")
    cid = environment()["cpu_id"]
    assert cid is not None and " family " in cid and " model " in cid
