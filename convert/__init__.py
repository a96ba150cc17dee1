"""The converter: any SigLIP checkpoint layout to a vision-only safetensors folder.

Installed as ``siglip_scratch.convert`` (see ARCHITECTURE.md).
"""

from .converter import ConvertResult, convert
from .sources import Plan, plan_conversion

__all__ = ["ConvertResult", "Plan", "convert", "plan_conversion"]
