"""Checkpoint families, one module each: detection, layout (a key table or the prefix rules), config inference and
the native forward ``--verify`` computes the source with.

A new family is one new module here (a `Format`) plus one line in `FORMATS`. `sources.py` keeps what is common
(finding the weights, the strict `Plan`); `verify.py` calls a family's ``native`` forward and ``probe``.
"""

from siglip_scratch.errors import CheckpointError

from .base import Format, Layout, config_from_grid
from .big_vision import BIG_VISION
from .big_vision_naflex import BIG_VISION_NAFLEX
from .hf import HF
from .timm import TIMM

__all__ = ["FORMATS", "Format", "Layout", "by_family", "config_from_grid", "detect"]

# Asked in this order; the first that detects the store reads it (HF, asked last, takes what is left).
FORMATS: tuple[Format, ...] = (BIG_VISION_NAFLEX, BIG_VISION, TIMM, HF)


def detect(store, keys) -> Format:
    return next(f for f in FORMATS if f.detects(store, keys))


def by_family(family: str) -> Format:
    for f in FORMATS:
        if f.family == family:
            return f
    raise CheckpointError(f"no checkpoint family {family!r}", "plan", "report this")
