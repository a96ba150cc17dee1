"""Candidates: one `Candidate` interface, one module per kind, and `open_candidate`, the one place that tells
the kinds apart (see base.py for the life of a candidate).

A new kind is one new file here (a `Candidate` subclass) plus one line in `open.open_candidate`.
"""

from .activations import TRANSFORMS, ActivationCandidate
from .base import Candidate, Pinned
from .loading import LoadResult, RenameLike, as_rename_rules, load_candidate_factory, load_rename_map
from .module import ModuleCandidate, OursCandidate, build_ours
from .onnx import OnnxCandidate
from .open import open_candidate

__all__ = [
    "TRANSFORMS",
    "ActivationCandidate",
    "Candidate",
    "LoadResult",
    "ModuleCandidate",
    "OnnxCandidate",
    "OursCandidate",
    "Pinned",
    "RenameLike",
    "as_rename_rules",
    "build_ours",
    "load_candidate_factory",
    "load_rename_map",
    "open_candidate",
]
