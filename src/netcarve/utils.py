"""Small helpers shared across layers."""

from __future__ import annotations

import inspect
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same way for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode and restore each one's own training flag afterwards (a model
    may mix training and frozen eval-mode parts)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def without_kv_cache(model: torch.nn.Module):
    """A Hugging Face model (``model.config.use_cache``) with its key / value cache off, restored afterwards: the
    same logits, without the cache object in its output (torch.export cannot return one, and the cached keys /
    values would count as model outputs). Other models are left as they are."""
    config = getattr(model, "config", None)
    on = getattr(config, "use_cache", None) is True
    if on:
        config.use_cache = False
    try:
        yield model
    finally:
        if on:
            config.use_cache = True


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Write to a temporary file beside ``path`` and rename it into place (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def call_model(model, example_input):
    """``model`` called on an example input as netcarve's functions take it: a tensor (``model(x)``), a tuple or
    list of positional arguments (``model(*x)``), or a dict by forward argument name (``model(**x)``, as HF-style
    models are called with a tokenizer's batch)."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def forward_params(model, varargs: bool = False) -> list[inspect.Parameter] | None:
    """``model.forward``'s named arguments (positional and keyword-only, in order), with ``varargs`` also ``*args`` /
    ``**kwargs``; None when the signature cannot be read."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p for p in params if varargs or p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def input_batch(x) -> int:
    """The batch (dim 0) of an example input: a tensor, a tuple of them, or a dict by forward argument name."""
    if isinstance(x, dict):
        x = next(iter(x.values()))
    elif isinstance(x, (tuple, list)):
        x = x[0]
    return int(x.shape[0])


def input_shapes(x):
    """The shape(s) of an example input, as lists: one list, a list of them (a tuple), or a dict of them by name."""
    if isinstance(x, dict):
        return {k: list(v.shape) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [list(v.shape) for v in x]
    return list(x.shape)

