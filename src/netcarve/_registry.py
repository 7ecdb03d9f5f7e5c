"""One generic registry used by every extension point (models, datasets, criteria, engines, ...).

Each extension point exposes ``register_x`` (a decorator), ``get_x(name)`` and ``list_x(pattern)``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def _add(o: T) -> T:
            if name in self._items and not overwrite:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        if obj is not None:
            return _add(obj)
        return _add

    def register_subclass(self, name: str, cls, base: type, *, overwrite: bool = False, who: str = "register"):
        """Register a subclass of ``base`` under ``name`` and set its ``name`` attribute; without ``cls``,
        return a class decorator. A non-subclass is a ConfigError naming ``who``."""

        def _add(c):
            if not (isinstance(c, type) and issubclass(c, base)):
                raise ConfigError(f"{who}({name!r}): expected a {base.__name__} subclass, got {c!r}")
            c.name = name
            return self.register(name, c, overwrite=overwrite)

        return _add(cls) if cls is not None else _add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


def registry_functions(reg: Registry) -> tuple[Callable, Callable, Callable]:
    return reg.register, reg.get, reg.list
