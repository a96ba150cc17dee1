"""siglip-scratch: a from-scratch SigLIP vision encoder, a converter and a parity harness.

The core (this package) needs only torch, safetensors, huggingface_hub, pillow and numpy;
`siglip_scratch.parity` additionally needs transformers for its reference.
"""

from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    OutputError,
    SiglipScratchError,
    SourceError,
)
from .lazy import lazy_attributes

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


__getattr__ = lazy_attributes(__name__, _LAZY)


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
