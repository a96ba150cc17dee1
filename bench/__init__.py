"""``make bench`` / ``python -m siglip_scratch.bench``: ours against the competitors, side by side.

Lives beside the parts it measures (the core, ``convert/``, ``parity/``), not in the core: it imports
the parity harness and transformers, and the core must not know how it is judged.
"""

from .runner import flops_per_image, main

__all__ = ["flops_per_image", "main"]
