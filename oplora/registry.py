"""Plug-ins registered by name and found by package scan: the adaptation methods (`oplora.methods`) and the evaluation
stages (`oplora.evaluation`).

A package's `__init__` calls `discover(__name__, __path__)`, which imports each of its public modules, so a module
dropped into the package registers itself (`Registry.register`, a class decorator) and no list names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def discover(package: str, path: Iterable[str]) -> None:
    """Import every public module (name not starting with _) of a package."""
    for module in pkgutil.iter_modules(path):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


class Registry:
    """Classes by their `name` attribute, which must be a new Python identifier."""

    def __init__(self, kind: str):
        self.kind = kind
        self.classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        name = getattr(cls, "name", "")
        if not name or not name.isidentifier():
            raise ValueError(f"{cls.__name__}: a {self.kind} needs a name that is a Python identifier, got {name!r}")
        if name in self.classes:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self.classes[name].__name__}")
        self.classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self.classes)

    def get(self, name: str) -> type:
        if name not in self.classes:
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        return self.classes[name]
