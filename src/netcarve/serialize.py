"""Save and load models as data: ``manifest.json`` (architecture + shapes) + ``model.safetensors``.

A saved directory rebuilds without unpickling anything:

1. ``create_model(manifest["model"]["name"], **manifest["model"]["kwargs"])`` builds the original
   architecture from the registry (a Hugging Face transformers model is saved as ``"transformers:<class>"`` with
   its config and rebuilt by that class of the installed transformers from the config);
2. every leaf layer listed in ``manifest["layers"]`` whose constructor arguments differ from the fresh
   one (e.g. a conv narrowed by channel pruning) is replaced by a layer built from the recorded arguments;
3. the weights are loaded from ``model.safetensors`` with a strict key and shape check.

Layer types are extensible with :func:`register_layer_spec` (defined in ``netcarve._layer_specs``). A run directory written by any netcarve
command is a checkpoint directory (it holds ``manifest.json`` and ``model.safetensors``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ._layer_specs import _LAYER_SPECS, _type_key, layer_specs, register_layer_spec  # noqa: F401 (re-exported)
from ._version import __version__
from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .utils import atomic_write

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = "netcarve.model"
FORMAT_VERSION = 2  # 2: optional "dropped_blocks" (depth pruning); written as 1 without it


def _state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    seen: dict[int, str] = {}
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        # safetensors refuses aliased storage; store each tensor on its own
        ptr = v.data_ptr()
        out[k] = v.detach().clone().contiguous() if ptr in seen else v.detach().contiguous()
        seen[ptr] = k
    return out


def save(model: nn.Module, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``manifest.json`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    spec = getattr(model, "netcarve_spec", None) or _transformers_spec(model)
    if not spec:
        raise ConfigError(
            f"cannot save {type(model).__name__}: it was not built by netcarve.create_model, so it cannot be "
            "rebuilt without pickling; register it with netcarve.register_model and build it with create_model"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = _state_dict_for_save(model)
    from .compact.depth import DROPPED_ATTR

    dropped = list(getattr(model, DROPPED_ATTR, None) or [])
    manifest = {
        "format": FORMAT,
        "format_version": 2 if dropped else 1,
        "netcarve_version": __version__,
        "model": {"name": spec["name"], "kwargs": spec.get("kwargs", {})},
        "layers": layer_specs(model),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in sd.items()},
        "metadata": metadata or {},
    }
    if dropped:  # residual blocks removed by depth pruning: load() removes them again before the weights
        manifest["dropped_blocks"] = dropped
    tmp = d / f".{WEIGHTS}.tmp"
    save_file(sd, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, d / WEIGHTS)
    with atomic_write(d / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, default=_json_default)
    return d


_HF = "transformers:"


def can_save(model: nn.Module) -> bool:
    """Whether :func:`save` can describe ``model`` (built by ``create_model``, or a Hugging Face transformers model)."""
    return bool(getattr(model, "netcarve_spec", None)) or _transformers_spec(model) is not None


def _transformers_spec(model: nn.Module) -> dict | None:
    """A Hugging Face transformers model (a class exported by the package, with a config): rebuilt from its class
    name and config; None for anything else."""
    cls = type(model)
    config = getattr(model, "config", None)
    if not cls.__module__.startswith("transformers.") or not hasattr(config, "to_json_string"):
        return None
    import transformers

    if getattr(transformers, cls.__name__, None) is not cls:
        return None
    return {"name": _HF + cls.__name__, "kwargs": {"config": json.loads(config.to_json_string(use_diff=False))}}


def _build_transformers(name: str, kwargs: dict) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"manifest names the Hugging Face model {name!r}: install transformers to load it") \
            from None
    cls = getattr(transformers, name[len(_HF):], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)) or "config" not in kwargs:
        raise CheckpointError(f"manifest names model {name!r}, which is not a transformers model class (with a "
                              "config) of the installed transformers")  # fmt: skip
    try:
        return cls(cls.config_class.from_dict(kwargs["config"]))
    except Exception as e:  # noqa: BLE001 - a config this transformers cannot take
        raise CheckpointError(f"manifest model {name!r} cannot be built from its config: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None  # fmt: skip


def _json_default(o):
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"metadata value of type {type(o).__name__} is not JSON serializable")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: a directory with ``manifest.json`` (a run directory is one),
    or the manifest / weights file inside it."""
    p = Path(path)
    if p.is_file() and p.name in (MANIFEST, WEIGHTS):
        p = p.parent
    if p.is_dir() and (p / MANIFEST).is_file():
        return p
    if p.is_dir():
        raise CheckpointError(f"{p} is not a netcarve checkpoint: no {MANIFEST} in it")
    raise CheckpointError(f"checkpoint {p} does not exist")


def is_checkpoint(path: str | os.PathLike) -> bool:
    try:
        find_checkpoint(path)
        return True
    except CheckpointError:
        return False


def read_manifest(path: str | os.PathLike) -> dict:
    d = find_checkpoint(path)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / MANIFEST} is corrupt (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{d / MANIFEST} is not a netcarve manifest (format != {FORMAT!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{d / MANIFEST} has format_version {manifest['format_version']}, newer than this netcarve "
            f"({FORMAT_VERSION}); upgrade netcarve"
        )
    for key in ("model", "layers", "tensors"):
        if key not in manifest:
            raise CheckpointError(f"{d / MANIFEST} lacks the field {key!r}")
    return manifest


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def rebuild(manifest: dict) -> nn.Module:
    """Build the architecture a manifest describes (weights uninitialised)."""
    from .models import create_model

    name = manifest["model"]["name"]
    try:
        if isinstance(name, str) and name.startswith(_HF):
            model = _build_transformers(name, manifest["model"].get("kwargs", {}))
        else:
            model = create_model(name, **manifest["model"].get("kwargs", {}))
    except ConfigError as e:
        raise CheckpointError(f"manifest names model {name!r} which cannot be built: {e}") from None
    dropped = manifest.get("dropped_blocks") or []
    if dropped:
        from .compact.depth import drop_blocks
        from .models import example_input

        if not isinstance(dropped, list) or not all(isinstance(p, str) for p in dropped):
            raise CheckpointError("manifest field 'dropped_blocks' must be a list of module paths")
        try:
            model = drop_blocks(model, dropped, example_input(model))
        except (ConfigError, UnsupportedModelError) as e:
            raise CheckpointError(f"manifest dropped_blocks cannot be removed from {name!r}: {e}") from None
    current = layer_specs(model)
    for path, spec in manifest["layers"].items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"manifest layer {path!r} does not exist in model {name!r}") from None
        if current.get(path) == spec:
            continue
        if spec["type"] not in _LAYER_SPECS:
            raise CheckpointError(f"manifest layer {path!r} has type {spec['type']} which netcarve cannot rebuild")
        _set_submodule(model, path, _LAYER_SPECS.get(spec["type"]).build(dict(spec["args"])))
    return model


def _resize_attributes(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Tensor attributes sliced with a channel group (a ViT's class token and position table: parameters of a module
    that has no layer spec, so ``rebuild`` left them at the config's size) take the saved shape; same rank only."""
    for key, v in sd.items():
        owner, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue
        t = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
        if t is None or t.shape == v.shape or t.dim() != v.dim() or _type_key(type(module)) in _LAYER_SPECS:
            continue
        if name in module._parameters:
            setattr(module, name, nn.Parameter(torch.empty(v.shape, dtype=t.dtype), requires_grad=t.requires_grad))
        else:
            module._buffers[name] = torch.empty(v.shape, dtype=t.dtype)


def load(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save`; ``model.netcarve_metadata`` holds the saved metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = find_checkpoint(path)
    manifest = read_manifest(d)
    model = rebuild(manifest)
    wpath = d / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"{wpath} is missing")
    try:
        sd = load_file(str(wpath), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath} is corrupt or unreadable: {e}") from None
    declared = manifest["tensors"]
    problems = []
    for k, v in sd.items():
        if k not in declared:
            problems.append(f"{k}: in the weights but not in the manifest")
        elif list(v.shape) != declared[k]["shape"]:
            problems.append(f"{k}: weights have shape {list(v.shape)}, manifest says {declared[k]['shape']}")
    problems += [f"{k}: in the manifest but missing from the weights" for k in declared if k not in sd]
    if problems:
        raise CheckpointError(f"{d}: manifest does not match the weights: " + "; ".join(problems[:6]))
    _resize_attributes(model, sd)
    expected = model.state_dict()
    problems = [f"{k}: model has shape {list(expected[k].shape)}, weights {list(v.shape)}"
                for k, v in sd.items() if k in expected and expected[k].shape != v.shape]
    problems += [f"{k}: missing from the weights" for k in expected if k not in sd]
    problems += [f"{k}: not a parameter of the rebuilt model" for k in sd if k not in expected]
    if problems:
        raise CheckpointError(f"{d}: weights do not fit model {manifest['model']['name']!r}: " + "; ".join(problems[:6]))
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{wpath}: tensors contain NaN or inf values: {', '.join(bad[:6])}")
    model.load_state_dict(sd, strict=True)
    from .layers import keep_encoders_off_nested

    keep_encoders_off_nested(model)  # (pruned attention heads cannot take torch's nested-tensor path)
    model.netcarve_metadata = manifest.get("metadata", {})
    model.eval()
    return model
