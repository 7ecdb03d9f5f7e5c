"""Crash-safe training state: ``<out_dir>/train_state/``.

Layout after epoch ``k`` (1-based count of completed epochs)::

    train_state/
        model-e000k.safetensors   model.state_dict() (safetensors: no pickle)
        extra-e000k.pt            torch.save of plain containers + tensors: optimizer, scheduler,
                                  task auxiliary state (KD adapters), callback states, RNG states
        state.json                commit marker, written last: epoch, config, history, file names,
                                  byte sizes and sha256 of both files

Every file is written with :func:`netcarve.utils.atomic_write` (temp file + ``os.replace``) and the
per-epoch files carry the epoch in their name, so ``state.json`` always points at one complete, consistent
set of files: a process killed at any moment leaves either the previous epoch's state or the new one.
Files of older epochs and stale temp files are deleted after the commit. ``extra-*.pt`` is read with
``torch.load(weights_only=True)``; no ``nn.Module`` is ever pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import CheckpointError
from ..utils import atomic_write

STATE_DIR = "train_state"
STATE_FILE = "state.json"
FORMAT = "netcarve.train_state/1"


# ------------------------------------------------------------------------------------------- RNG


def get_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU) global RNG states as tensors / plain numbers (weights_only-safe)."""
    pv, pstate, pgauss = random.getstate()
    nname, nkeys, npos, nhas, ncached = np.random.get_state()
    return {
        "python": {"version": pv, "state": torch.tensor(pstate, dtype=torch.int64), "gauss": pgauss},
        "numpy": {
            "name": str(nname),
            "keys": torch.from_numpy(np.asarray(nkeys, dtype=np.int64)),
            "pos": int(npos),
            "has_gauss": int(nhas),
            "cached_gaussian": float(ncached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])


# ------------------------------------------------------------------------------------------- files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as contiguous CPU tensors; tied tensors are copied so safetensors accepts them."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"state_dict entry {k!r} of {type(model).__name__} is not a tensor")
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def state_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / STATE_DIR


def save_train_state(
    out_dir: str | Path, *, model: nn.Module, extra: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write one epoch's state under ``out_dir/train_state`` and commit it (``meta["epoch"]`` names it).

    ``meta`` must be JSON-serialisable; ``extra`` a weights_only-loadable container. Returns the dir.
    """
    sdir = state_dir(out_dir)
    sdir.mkdir(parents=True, exist_ok=True)
    epoch = int(meta["epoch"])
    files: dict[str, dict[str, Any]] = {}

    model_bytes = st_save(model_tensors(model), metadata={"format": "pt", "epoch": str(epoch)})
    buf = io.BytesIO()
    torch.save(extra, buf)
    for role, name, data in (
        ("model", f"model-e{epoch:04d}.safetensors", model_bytes),
        ("extra", f"extra-e{epoch:04d}.pt", buf.getvalue()),
    ):
        with atomic_write(sdir / name) as f:
            f.write(data)
        files[role] = {"file": name, "bytes": len(data), "sha256": _sha256(data)}

    doc = {"format": FORMAT, **meta, "files": files}
    with atomic_write(sdir / STATE_FILE, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True, allow_nan=True)
        f.write("\n")

    keep = {STATE_FILE, *(v["file"] for v in files.values())}
    for p in sdir.iterdir():
        if p.name not in keep and p.is_file():
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return sdir


def clear_train_state(out_dir: str | Path) -> None:
    """Un-commit (delete ``state.json``) and remove the files of ``out_dir/train_state``."""
    sdir = state_dir(out_dir)
    if not sdir.is_dir():
        return
    (sdir / STATE_FILE).unlink(missing_ok=True)
    for p in sdir.iterdir():
        if p.is_file():
            p.unlink(missing_ok=True)


def read_train_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The committed ``state.json`` of ``out_dir/train_state`` (None when there is none).

    Raises CheckpointError when it is unreadable or not a netcarve train state.
    """
    path = state_dir(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: unreadable training state ({e}); delete {path.parent} to start over"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a netcarve training state (format {FORMAT!r} expected)")
    for key in ("epoch", "files", "config"):
        if key not in doc:
            raise CheckpointError(f"{path}: training state lacks {key!r}")
    return doc


def _read_verified(sdir: Path, entry: dict[str, Any], role: str) -> tuple[Path, bytes]:
    try:
        path = sdir / entry["file"]
        want_bytes, want_sha = int(entry["bytes"]), entry["sha256"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{sdir / STATE_FILE}: malformed entry for the {role} file: {entry!r}"
        ) from None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({role} file of the training state in {sdir})") from None
    if len(data) != want_bytes:
        raise CheckpointError(
            f"{path}: corrupt training state: {len(data)} bytes, expected {want_bytes} (truncated?); "
            f"delete {sdir} to start over"
        )
    if _sha256(data) != want_sha:
        raise CheckpointError(f"{path}: corrupt training state: sha256 mismatch; delete {sdir} to start over")
    return path, data


def _check_fits(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Compare names and shapes before loading, so a mismatch leaves ``model`` untouched."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{path}: weights do not fit {type(model).__name__}: " + ", ".join(parts))


def load_train_state(out_dir: str | Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify the committed state, load its weights into ``model`` and return ``(meta, extra)``.

    Raises CheckpointError for missing / truncated / corrupt files or weights that do not fit ``model``.
    """
    meta = read_train_state(out_dir)
    sdir = state_dir(out_dir)
    if meta is None:
        raise CheckpointError(f"{sdir}: no training state ({STATE_FILE} missing)")
    files = meta["files"]
    if not isinstance(files, dict) or "model" not in files or "extra" not in files:
        raise CheckpointError(f"{sdir / STATE_FILE}: file list must name 'model' and 'extra'")
    mpath, mdata = _read_verified(sdir, files["model"], "model")
    epath, edata = _read_verified(sdir, files["extra"], "extra")
    try:
        tensors = st_load(mdata)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{mpath}: unreadable safetensors file: {e}") from None
    try:
        extra = torch.load(io.BytesIO(edata), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / unpickling errors of several types
        raise CheckpointError(f"{epath}: unreadable training state: {e}") from None
    if not isinstance(extra, dict):
        raise CheckpointError(f"{epath}: expected a dict, got {type(extra).__name__}")
    _check_fits(model, tensors, mpath)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{mpath}: weights do not fit {type(model).__name__}: {e}") from None
    return meta, extra
