"""The converter: any SigLIP checkpoint layout to a vision-only safetensors folder.

Installed as ``siglip_scratch.convert`` (see ARCHITECTURE.md).
"""

from importlib import import_module
from typing import Any

# Loaded on first use (PEP 562): `siglip-convert` parses its arguments before torch is imported.
_LAZY = {"ConvertResult": "converter", "convert": "converter", "Plan": "sources", "plan_conversion": "sources"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConvertResult", "Plan", "convert", "plan_conversion"]
