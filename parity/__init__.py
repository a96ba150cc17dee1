"""The parity harness: compare a SigLIP vision encoder with transformers, site by site.

Installed as ``siglip_scratch.parity`` (see ARCHITECTURE.md). transformers is imported only
when a reference is built, so importing this package never needs it.
"""

import sys
import types
from typing import Any

from siglip_scratch.lazy import lazy_attributes

# Loaded on first use (PEP 562): `siglip-parity` parses its arguments before torch is imported.
_LAZY = {
    "assert_parity": "compare",
    "compare": "compare",
    "make_pixels": "inputs",
    "DEFAULT_TOLERANCES": "judge",
    "ORACLE_RULES": "judge",
    "SiteResult": "judge",
    "Report": "report",
    "RunOptions": "options",
    "compile_rename": "sites",
    "site_names": "sites",
    "Weights": "weights",
    "resolve_weights": "weights",
}


class _Package(types.ModuleType):
    """`compare` is both a submodule and the function this package exports. Importing the submodule binds it as an
    attribute of the package; this keeps the function under that name (the submodule stays importable as
    ``siglip_scratch.parity.compare`` through ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "DEFAULT_TOLERANCES",
    "ORACLE_RULES",
    "Report",
    "RunOptions",
    "SiteResult",
    "Weights",
    "assert_parity",
    "compare",
    "compile_rename",
    "make_pixels",
    "resolve_weights",
    "site_names",
]
