"""siglip-scratch: a from-scratch SigLIP vision encoder, a converter and a parity harness.

The core (this package) needs only torch, safetensors, huggingface_hub, pillow and numpy;
`siglip_scratch.parity` additionally needs transformers for its reference.
"""

from .config import PRESETS, SiglipVisionConfig, get_preset
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    OutputError,
    SiglipScratchError,
    SourceError,
)
from .model import SiglipVisionModelOutput
from .modeling import SiglipVisionModel, synthetic_state_dict
from .processor import SiglipImageProcessor

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "OutputError",
    "SiglipImageProcessor",
    "SiglipScratchError",
    "SiglipVisionConfig",
    "SiglipVisionModel",
    "SiglipVisionModelOutput",
    "SourceError",
    "__version__",
    "get_preset",
    "synthetic_state_dict",
]
