"""Loading pretrained weights into zoo models.

``load_pretrained(model, name, pretrained)`` resolves a tag of ``ModelInfo.pretrained`` (or ``True`` for
the first tag, or a file path) against the data root. ``load_weights(model, path)`` reads:

- akamaster ``.th`` / plain ``.pt`` / ``.pth`` state dicts (``torch.load(weights_only=True)``; a
  ``state_dict``/``model_state_dict``/``model`` entry is unwrapped and a ``module.`` prefix stripped),
- ``.safetensors`` files,
- ``.npz``: Keras-style ``layer/param`` arrays (MLPerf Tiny ResNet-8, mapped through the model's
  ``keras_layer_map``) or plain state-dict keys.

Keys and shapes must match the model exactly; only ``num_batches_tracked`` buffers may be missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..paths import resolve_data_root
from ._registry import get_model_info

_MAX_LISTED = 5


def load_pretrained(
    model: nn.Module, name: str, pretrained: bool | str = True, data_dir: str | os.PathLike | None = None
) -> nn.Module:
    """Load the pretrained weights of registered model ``name`` into ``model`` (in place; returned).

    ``pretrained``: ``True`` (the model's first tag), a tag of ``ModelInfo.pretrained``, or a file path.
    """
    info = get_model_info(name)
    if pretrained is True:
        if not info.pretrained:
            raise ConfigError(f"model {name!r} has no pretrained weights")
        rel = next(iter(info.pretrained.values()))
        path = resolve_data_root(data_dir) / rel
    elif isinstance(pretrained, (str, os.PathLike)) and str(pretrained) in info.pretrained:
        path = resolve_data_root(data_dir) / info.pretrained[str(pretrained)]
    elif isinstance(pretrained, (str, os.PathLike)) and (
        Path(pretrained).suffix or os.sep in str(pretrained) or Path(pretrained).exists()
    ):
        path = Path(pretrained).expanduser()
    else:
        tags = ", ".join(info.pretrained) or "(none)"
        raise ConfigError(
            f"model {name!r}: pretrained={pretrained!r} is neither a known tag ({tags}) nor a file path"
        )
    return load_weights(model, path)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``model`` (in place; returned). Raises CheckpointError on a missing or
    corrupt file, or when its keys/shapes do not match the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    state = _read_state_dict(model, path)
    _check_and_load(model, state, path)
    return model


def _read_state_dict(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files}
            return _npz_to_state_dict(model, arrays, path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt / truncated / not a weights file
        first = (str(e).strip().splitlines() or [""])[0][:200]  # torch.load's messages run to a page
        raise CheckpointError(
            f"cannot read weights file {str(path)!r} (not a .th/.pt/.pth state dict, .npz or .safetensors "
            f"netcarve can read, or corrupt): {type(e).__name__}: {first}"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from what torch.load returned, without a DataParallel ``module.``."""
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not (isinstance(obj, Mapping) and _is_tensor_dict(obj)):
        raise CheckpointError(
            f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors "
            "(nor a dict with a 'state_dict' / 'model_state_dict' / 'model' entry)"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _is_tensor_dict(d: Mapping) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


_KERAS_PARAMS = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def _npz_to_state_dict(
    model: nn.Module, arrays: dict[str, np.ndarray], path: Path
) -> dict[str, torch.Tensor]:
    if not any("/" in k for k in arrays):  # plain state-dict keys
        return {k: torch.from_numpy(v) for k, v in arrays.items()}
    layer_map: dict[str, str] | None = getattr(model, "keras_layer_map", None)
    if not layer_map:
        raise CheckpointError(
            f"weights file {str(path)!r} holds Keras-style 'layer/param' arrays but "
            f"{type(model).__name__} has no keras_layer_map to place them"
        )
    state: dict[str, torch.Tensor] = {}
    for key, arr in arrays.items():
        layer, _, param = key.rpartition("/")
        if layer not in layer_map or param not in _KERAS_PARAMS:
            state[key] = torch.from_numpy(arr)  # reported as unexpected
            continue
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if param == "kernel" and t.ndim == 4:  # conv HWIO -> OIHW
            t = t.permute(3, 2, 0, 1).contiguous()
        elif param == "kernel" and t.ndim == 2:  # dense (in, out) -> (out, in)
            t = t.t().contiguous()
        state[f"{layer_map[layer]}.{_KERAS_PARAMS[param]}"] = t
    return state


def _check_and_load(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} missing key(s): " + _fmt([(k, tuple(expected[k].shape)) for k in missing])
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s): "
                + _fmt([(k, tuple(state[k].shape)) for k in unexpected])
            )
        if shapes:
            listed = ", ".join(f"{k} file {a} vs model {b}" for k, a, b in shapes[:_MAX_LISTED])
            more = f" (+{len(shapes) - _MAX_LISTED} more)" if len(shapes) > _MAX_LISTED else ""
            parts.append(f"{len(shapes)} shape mismatch(es): {listed}{more}")
        raise CheckpointError(
            f"weights file {str(path)!r} does not match {type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)


def _fmt(items: list[tuple[str, tuple[int, ...]]]) -> str:
    s = ", ".join(f"{k} {list(shape)}" for k, shape in items[:_MAX_LISTED])
    return s + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")
