"""Candidates: our encoder, or any user's ``nn.Module``, and putting the shared weights into it."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siglip_scratch.config import SiglipVisionConfig
from siglip_scratch.errors import InputError
from siglip_scratch.files import read_json

from .sites import RenameRules, apply_rename, compile_rename

__all__ = ["LoadResult", "load_candidate_factory", "load_rename_map", "load_weights_into"]


def load_candidate_factory(spec: str) -> Any:
    """Resolve ``module.path:factory`` (or ``path/to/file.py:factory``) to the callable."""
    if ":" not in spec:
        raise InputError(
            f"candidate {spec!r} is not module.path:factory", "--candidate", "e.g. my_pkg.vit:build_siglip"
        )
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError("candidate file not found", module_name, "check the path")
            mod_spec = importlib.util.spec_from_file_location(f"_siglip_candidate_{path.stem}", path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as exc:  # the user's module may raise anything while importing
        raise InputError(
            f"cannot import candidate module {module_name!r}: {type(exc).__name__}: {exc}",
            "--candidate",
            "check that it imports (is it on PYTHONPATH?)",
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"{module_name!r} has no callable {attr!r}", "--candidate", None)
    return factory


def build_candidate(factory: Any, config: SiglipVisionConfig, spec: str) -> nn.Module:
    """Call ``factory(config_dict)`` or ``factory()`` and check that it returns an ``nn.Module``."""
    try:
        params = [
            p
            for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        params = []
    try:
        module = factory(config.to_dict()) if params else factory()
    except Exception as exc:  # the user's factory may raise anything
        raise InputError(f"candidate factory raised {type(exc).__name__}: {exc}", spec, "fix the factory") from None
    if not isinstance(module, nn.Module):
        raise InputError(
            f"candidate factory returned {type(module).__name__}, not a torch.nn.Module", spec, "return the model"
        )
    return module


def load_rename_map(path: str | Path) -> RenameRules:
    path = Path(path)
    spec = read_json(path, what="rename map", error=InputError, fix="fix the file")
    return compile_rename(spec, str(path))


@dataclass
class LoadResult:
    """What happened when the shared weights were put into the candidate."""

    missing_keys: list[str] = field(default_factory=list)  # candidate keys left without a weight
    unexpected_keys: list[str] = field(default_factory=list)  # checkpoint keys the candidate did not take
    via: str = "state_dict"


def load_weights_into(
    candidate: nn.Module, state_dict: Mapping[str, torch.Tensor], rules: RenameRules, spec: str
) -> LoadResult:
    """Assign the canonical tensors to the candidate's parameters (shared storage, no copy).

    A candidate with ``load_hf_state_dict(state_dict)`` gets the canonical dict and does its own
    relayout (fused qkv and the like); it may return ``(missing, unexpected)`` or an object with
    ``missing_keys``/``unexpected_keys``.
    """
    hook = getattr(candidate, "load_hf_state_dict", None)
    if callable(hook):
        try:
            returned = hook(dict(state_dict))
        except Exception as exc:  # user code
            raise InputError(
                f"candidate.load_hf_state_dict raised {type(exc).__name__}: {exc}", spec, "fix the loader"
            ) from None
        missing, unexpected = _read_load_return(returned)
        return LoadResult(sorted(missing), sorted(unexpected), via="load_hf_state_dict")

    own = candidate.state_dict()
    assign: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key, current in own.items():
        canonical = apply_rename(key, rules)
        tensor = state_dict.get(canonical)
        if tensor is None:
            missing.append(key)
            continue
        if tuple(tensor.shape) != tuple(current.shape):
            raise InputError(
                f"candidate parameter {key!r} has shape {list(current.shape)} but {canonical!r} is "
                f"{list(tensor.shape)}",
                spec,
                "fix the rename map, or define load_hf_state_dict(state_dict) for layouts renaming cannot express",
            )
        assign[key] = tensor
        used.add(canonical)
    # strict=False because the candidate may lack weights (its keys without a canonical tensor); those
    # are exactly `missing`, reported in the result and failing the verdict, as are the checkpoint
    # tensors nobody took (`unexpected`). `assign` holds only the candidate's own keys.
    result = candidate.load_state_dict(assign, strict=False, assign=True)
    assert sorted(result.missing_keys) == sorted(missing) and not result.unexpected_keys
    unexpected = sorted(set(state_dict) - used)
    return LoadResult(sorted(missing), unexpected)


def _read_load_return(returned: object) -> tuple[list[str], list[str]]:
    if returned is None:
        return [], []
    if hasattr(returned, "missing_keys") and hasattr(returned, "unexpected_keys"):
        return list(returned.missing_keys), list(returned.unexpected_keys)
    if isinstance(returned, tuple) and len(returned) == 2:
        return list(returned[0]), list(returned[1])
    return [], []
