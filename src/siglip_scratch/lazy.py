"""Package attributes loaded on first use (PEP 562), so a CLI parses its arguments and reports a usage error before
torch is imported.

    >>> import types, sys
    >>> pkg = types.ModuleType("demo_pkg"); sys.modules["demo_pkg"] = pkg
    >>> pkg.__getattr__ = lazy_attributes("demo_pkg", {"dumps": "json"}, absolute=True)
    >>> pkg.dumps([1])
    '[1]'
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, table: dict[str, str], *, absolute: bool = False) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` in ``table`` is imported from its submodule (or, with
    ``absolute``, from that module) on first access and kept on the package."""

    def __getattr__(name: str) -> Any:
        if name in table:
            module = import_module(table[name]) if absolute else import_module(f".{table[name]}", package)
            value = getattr(module, name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
