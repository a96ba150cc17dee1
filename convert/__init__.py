"""The converter: any SigLIP checkpoint layout to a vision-only safetensors folder.

Installed as ``siglip_scratch.convert`` (see ARCHITECTURE.md).
"""

from siglip_scratch.lazy import lazy_attributes

# Loaded on first use (PEP 562): `siglip-convert` parses its arguments before torch is imported.
_LAZY = {"ConvertResult": "converter", "convert": "converter", "Plan": "sources", "plan_conversion": "sources"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = ["ConvertResult", "Plan", "convert", "plan_conversion"]
