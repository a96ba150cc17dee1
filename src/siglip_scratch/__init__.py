"""siglip-scratch: a from-scratch SigLIP vision encoder, a converter and a parity harness.

The core (this package) needs only torch, safetensors, huggingface_hub, pillow and numpy;
`siglip_scratch.parity` additionally needs transformers for its reference.
"""

from importlib import import_module
from typing import Any

from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    OutputError,
    SiglipScratchError,
    SourceError,
)

# The heavy names (torch, numpy, PIL behind them) load on first use, so a CLI parses its arguments and reports a
# usage error before torch is imported (PEP 562).
_LAZY = {
    "PRESETS": "config",
    "Siglip2VisionConfig": "config",
    "SiglipVisionConfig": "config",
    "get_preset": "config",
    "load_config": "config",
    "SiglipVisionModelOutput": "model",
    "Siglip2VisionModel": "modeling",
    "SiglipVisionModel": "modeling",
    "synthetic_state_dict": "modeling",
    "Siglip2ImageProcessor": "processor",
    "SiglipImageProcessor": "processor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "OutputError",
    "Siglip2ImageProcessor",
    "Siglip2VisionConfig",
    "Siglip2VisionModel",
    "SiglipImageProcessor",
    "SiglipScratchError",
    "SiglipVisionConfig",
    "SiglipVisionModel",
    "SiglipVisionModelOutput",
    "SourceError",
    "__version__",
    "get_preset",
    "load_config",
    "synthetic_state_dict",
]
