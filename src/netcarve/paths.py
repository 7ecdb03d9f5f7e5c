"""Where the data lives: :func:`resolve_data_root`.

The data root is the directory that holds ``cifar10/`` (npz layout), ``cifar-10-batches-py/`` (the
official pickle layout) and ``pretrained/``. It is looked up in this order:

1. the explicit ``data_dir`` argument (the CLI's ``--data-dir``);
2. the environment variable ``NETCARVE_DATA``;
3. a ``shared/data`` directory found by walking up from the current directory (so ``../shared/data``
   next to a checkout is found), then by walking up from this package's source location.

Anything that cannot be found raises :class:`netcarve.errors.DataError` listing every place tried.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError

ENV_VAR = "NETCARVE_DATA"
HOW_TO = (
    f"pass --data-dir DIR on the command line (data_dir=DIR in Python) or set {ENV_VAR}=DIR, "
    "where DIR is the data root (the folder holding cifar10/ or cifar-10-batches-py/)"
)

PathLike = str | os.PathLike


def _search_starts() -> list[Path]:
    """Directories whose ancestors are searched for ``shared/data`` (cwd first, then the package)."""
    return [Path.cwd(), Path(__file__).resolve().parent]


def _walk_up_candidates() -> list[Path]:
    seen: list[Path] = []
    for start in _search_starts():
        for d in (start, *start.parents):
            cand = d / "shared" / "data"
            if cand not in seen:
                seen.append(cand)
    return seen


def resolve_data_root(data_dir: PathLike | None = None) -> Path:
    """Return the data root directory (see the module docstring for the search order).

    An explicit ``data_dir`` or ``NETCARVE_DATA`` that does not exist is an error (it is never
    silently replaced by a directory found elsewhere).

    Raises:
        DataError: nothing found; the message names every place tried and how to pass ``--data-dir``.
    """
    if data_dir is not None and str(data_dir) != "":
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {str(p)!r} (given as data_dir / --data-dir) does not exist")
        return p
    env = os.environ.get(ENV_VAR, "")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(
                f"data directory {str(p)!r} (from the environment variable {ENV_VAR}) does not exist"
            )
        return p
    tried = _walk_up_candidates()
    for cand in tried:
        if cand.is_dir():
            return cand
    listing = "\n  ".join(str(c) for c in tried)
    raise DataError(
        f"no data directory found. Tried: data_dir argument (not given), ${ENV_VAR} (not set), "
        f"and a shared/data folder above the current directory and the package:\n  {listing}\n"
        f"To fix: {HOW_TO}."
    )


def describe_root_source(data_dir: PathLike | None) -> str:
    """How the root was chosen, for error messages (``'data_dir argument'``, ``'$NETCARVE_DATA'``, ...)."""
    if data_dir is not None and str(data_dir) != "":
        return "data_dir / --data-dir"
    if os.environ.get(ENV_VAR):
        return f"${ENV_VAR}"
    return "found by searching for shared/data"
