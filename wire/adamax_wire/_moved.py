"""Old module paths kept importable after a move (used by ``adamax_client`` and ``adamax_server``).

``import adamax_server.engine`` (or ``adamax_client._wire``...) gives the module at its new path,
with a ``DeprecationWarning`` naming it: code written against the flat layout keeps working, new
code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder that resolves old dotted names (and names below them) to their new modules."""

    def __init__(self, moved: Mapping[str, str]) -> None:
        self._moved = dict(moved)

    def _target(self, fullname: str) -> str | None:
        for old, new in self._moved.items():
            if fullname == old or fullname.startswith(old + "."):
                return new + fullname[len(old):]
        return None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if self._target(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        new = self._target(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)  # type: ignore[arg-type]

    def exec_module(self, module: ModuleType) -> None:
        """The module was executed under its new name already."""


def install(moved: Mapping[str, str]) -> None:
    if not any(isinstance(f, MovedModules) and f._moved == dict(moved) for f in sys.meta_path):
        sys.meta_path.append(MovedModules(moved))
