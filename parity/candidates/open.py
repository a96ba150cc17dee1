"""`open_candidate`: the one place that tells the candidate kinds apart.

>>> open_candidate(None).kind
'ours'
>>> open_candidate("examples/timm_like.py:build").kind
'module'
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from siglip_scratch.errors import InputError

from .activations import ActivationCandidate
from .base import Candidate
from .module import ModuleCandidate, OursCandidate
from .onnx import OnnxCandidate

__all__ = ["ACTIVATION_SUFFIXES", "open_candidate"]

ACTIVATION_SUFFIXES = (".safetensors", ".npz")


def open_candidate(
    spec: Any,
    *,
    inputs_dir: str | os.PathLike[str] | None = None,
    layouts: Sequence[tuple[re.Pattern[str], str]] = (),
) -> Candidate:
    """The candidate ``spec`` names, opened with cheap checks only (files exist, a factory's file imports, the
    ONNX runtime is installed); nothing is built and no weights are read.

    Args:
        spec: None (our encoder); a `Candidate`; an ``nn.Module``; a factory (``f(config_dict)`` or ``f()``);
            ``"module.path:factory"`` or ``"file.py:factory"``; a path to an ``.onnx`` graph; or a path to an
            activations file (``.safetensors`` / ``.npz``) with ``inputs_dir`` (the export it was computed on;
            default: its folder) and ``layouts`` (declared per-site layout transforms).
    """
    if (inputs_dir is not None or layouts) and not _is_path(spec, ACTIVATION_SUFFIXES):
        raise InputError(
            "--inputs and --layout apply to an activations file", "--candidate-activations", "pass one, or drop them"
        )
    if spec is None:
        return OursCandidate()
    if isinstance(spec, Candidate):
        return spec
    if _is_path(spec, (".onnx",)):
        return OnnxCandidate(spec)
    if _is_path(spec, ACTIVATION_SUFFIXES):
        return ActivationCandidate(spec, inputs_dir=inputs_dir, layouts=layouts)
    if isinstance(spec, str):
        return ModuleCandidate.from_spec(spec)
    if isinstance(spec, nn.Module):
        return ModuleCandidate(module=spec, spec=type(spec).__qualname__)
    if callable(spec):
        return ModuleCandidate(factory=spec, spec=getattr(spec, "__qualname__", type(spec).__name__))
    raise InputError(
        f"cannot use a {type(spec).__name__} as a candidate",
        "candidate",
        "pass an nn.Module, a factory, 'module:factory', a .onnx file or an activations file",
    )


def _is_path(spec: Any, suffixes: tuple[str, ...]) -> bool:
    return isinstance(spec, (str, os.PathLike)) and str(spec).endswith(suffixes) and ":" not in os.fspath(spec)
