"""siglip-scratch: a from-scratch SigLIP vision encoder, a converter and a parity harness.

The core (this package) needs only torch, safetensors, huggingface_hub, pillow and numpy;
`siglip_scratch.parity` additionally needs transformers for its reference.
"""

from .config import PRESETS, Siglip2VisionConfig, SiglipVisionConfig, get_preset, load_config
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    OutputError,
    SiglipScratchError,
    SourceError,
)
from .model import SiglipVisionModelOutput
from .modeling import Siglip2VisionModel, SiglipVisionModel, synthetic_state_dict
from .processor import Siglip2ImageProcessor, SiglipImageProcessor

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
