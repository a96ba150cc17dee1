"""Putting the shared weights into a PyTorch candidate, importing its factory, and running its forward.

Used by `module.ModuleCandidate` (a user's module or factory); `load_weights_into` documents the order in which
rename rules and a ``load_hf_state_dict`` loader compose.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siglip_scratch.errors import InputError
from siglip_scratch.files import read_json

from ..sites import RenameRules, apply_rename, compile_rename

__all__ = [
    "CheckpointView",
    "LoadResult",
    "RenameLike",
    "as_rename_rules",
    "build_candidate",
    "load_candidate_factory",
    "load_rename_map",
    "load_weights_into",
]

# What `compare(rename=...)` takes: a map file, the file's JSON as a dict, or (regex, replacement) pairs.
RenameLike = str | os.PathLike[str] | Mapping[str, Any] | Sequence[Sequence[Any]] | None


def load_candidate_factory(spec: str, flag: str = "--candidate", what: str = "factory") -> Any:
    """Resolve ``module.path:factory`` (or ``path/to/file.py:factory``) to the callable."""
    if ":" not in spec:
        raise InputError(f"{spec!r} is not module.path:{what}", flag, f"e.g. my_pkg.vit:{what}")
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError("file not found", module_name, f"check the path given to {flag}")
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
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}",
            flag,
            "check that it imports (is it on PYTHONPATH?)",
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"{module_name!r} has no callable {attr!r}", flag, None)
    return factory


def build_candidate(factory: Any, config: dict[str, Any], spec: str) -> nn.Module:
    """Call ``factory(config)`` (a config dict) or ``factory()`` and check that it returns an ``nn.Module``."""
    try:
        params = [
            p
            for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        params = []
    try:
        module = factory(config) if params else factory()
    except Exception as exc:  # the user's factory may raise anything
        raise InputError(f"candidate factory raised {type(exc).__name__}: {exc}", spec, "fix the factory") from None
    if not isinstance(module, nn.Module):
        raise InputError(
            f"candidate factory returned {type(module).__name__}, not a torch.nn.Module", spec, "return the model"
        )
    return module


def load_rename_map(path: str | os.PathLike[str]) -> RenameRules:
    path = Path(path)
    spec = read_json(path, what="rename map", error=InputError, fix="fix the file")
    return compile_rename(spec, str(path))


def as_rename_rules(rename: RenameLike, where: str = "rename") -> list[tuple[re.Pattern[str], str]]:
    """Rename rules from any form a user writes, validated and compiled.

    Args:
        rename: None (no rules); a path to a JSON map ``{"rename": [["regex", "replacement"], ...]}``;
            that JSON as a dict; or a list of ``(regex, replacement)`` pairs, the regex a string or an
            ``re.Pattern``. Rules apply in order, each to the result of the one before (they chain).
    Raises:
        InputError: naming the rule that is not a pair, does not compile, or refers to a missing group.
    """
    if rename is None:
        return []
    if isinstance(rename, (str, os.PathLike)):
        return list(load_rename_map(rename))
    if isinstance(rename, Mapping):
        return compile_rename(dict(rename), where)
    if isinstance(rename, (list, tuple)):
        rules: list[tuple[re.Pattern[str], str]] = []
        for i, pair in enumerate(rename):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], str)):
                raise InputError(f"rule {i} is not a (regex, replacement) pair: {pair!r}", where, None)
            if isinstance(pair[0], re.Pattern):
                rules.append((pair[0], pair[1]))
            else:
                rules += compile_rename({"rename": [[pair[0], pair[1]]]}, f"{where}[{i}]")
        return rules
    raise InputError(
        f"rename must be a path, a {{'rename': [...]}} dict or a list of (regex, replacement) pairs, "
        f"not {type(rename).__name__}",
        where,
        "see examples/timm_like_rename.json",
    )


@dataclass
class LoadResult:
    """What happened when the shared weights were put into the candidate."""

    missing_keys: list[str] = field(default_factory=list)  # candidate keys without a weight (or reported so)
    unexpected_keys: list[str] = field(default_factory=list)  # checkpoint keys the candidate did not take
    via: str = "state_dict"
    unloaded: list[str] = field(default_factory=list)  # candidate tensors still at their initial value
    allowed_unloaded: list[str] = field(default_factory=list)  # ... that --allow-unloaded lets pass
    inferred_parameters: list[tuple[str, str]] = field(default_factory=list)  # rules inferred for the parameters
    account: str = ""  # one line on how the parameters were matched (no --rename given)


class CheckpointView(MutableMapping[str, torch.Tensor]):
    """The canonical tensors as ``load_hf_state_dict`` sees them.

    Every read returns a fresh copy, so a loader that scales or reorders what it gets in place changes
    its own weights, never the tensors the reference shares; writes and deletions stay in this view.
    Which keys were read is recorded (checkpoint tensors nobody read are reported as not taken).
    """

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._state = state
        self._local: dict[str, torch.Tensor] = {}
        self._deleted: set[str] = set()
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._local:
            return self._local[key]
        if key in self._deleted or key not in self._state:
            raise KeyError(key)
        self.read.add(key)
        return self._state[key].clone()

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._local[key] = value
        self._deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._local.pop(key, None)
        self._deleted.add(key)

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self._state if k not in self._deleted and k not in self._local)
        yield from self._local

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:
        return key in self._local or (key in self._state and key not in self._deleted)


def load_weights_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    rules: RenameRules,
    spec: str,
    *,
    allow_unloaded: Sequence[re.Pattern[str]] = (),
) -> LoadResult:
    """Put the canonical tensors into the candidate, and account for every one of its tensors.

    1. Rename rules first: each candidate key whose renamed name is a canonical tensor of the same shape
       gets that tensor. Without a loader it is assigned (shared storage, no copy).
    2. If the candidate defines ``load_hf_state_dict(view)`` (for what renaming cannot express: a fused
       qkv, a ``[1, N, D]`` position table, a folded scale), every floating-point parameter and
       persistent buffer is first set to NaN, the rules *copy* into those placeholders (so nothing the
       loader writes in place can reach the reference's storage), then the loader runs on a
       `CheckpointView` (copies on read) and may return ``(missing, unexpected)`` or an object with
       ``missing_keys``/``unexpected_keys``. It runs last, so its version of a tensor wins. A key whose
       shape differs from its renamed canonical tensor is left to the loader.
    3. Whatever is still NaN (or was never assigned) was never loaded (``unloaded``), whatever its
       initial value was. Integer buffers (index tables) are not weights and are not checked.
    """
    own = module.state_dict(keep_vars=True)  # parameters and persistent buffers: the weights
    hook = getattr(module, "load_hf_state_dict", None)
    hook = hook if callable(hook) else None
    weights = [k for k, t in own.items() if t.is_floating_point()]
    used: set[str] = set()
    missing: list[str] = []
    unexpected: list[str] = []
    if hook is not None:
        for key in weights:
            _set_placeholder(module, key, own[key])

    current = module.state_dict(keep_vars=True)
    assign: dict[str, torch.Tensor] = {}
    for key, tensor_now in current.items():
        canonical = apply_rename(key, rules)
        tensor = state_dict.get(canonical)
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(tensor_now.shape):
            if hook is not None:
                continue  # a layout the loader is meant to convert; unloaded if it does not
            raise InputError(
                f"candidate parameter {key!r} has shape {list(tensor_now.shape)} but {canonical!r} is "
                f"{list(tensor.shape)}",
                spec,
                "fix the rename map, or define load_hf_state_dict(state_dict) for layouts renaming cannot express",
            )
        assign[key] = tensor
        used.add(canonical)
    if assign:
        # strict=False: `assign` holds only the keys the rules could fill; everything else is filled by the
        # loader or reported below as unloaded, never silently dropped. With a loader the rules copy
        # (the placeholders are the candidate's own storage); without one they share the tensors.
        with torch.no_grad():
            result = module.load_state_dict(assign, strict=False, assign=hook is None)
        assert not result.unexpected_keys and set(result.missing_keys) == set(current) - set(assign)

    filled: set[str] = set()
    if hook is not None:
        view = CheckpointView(state_dict)
        try:
            returned = hook(view)
        except Exception as exc:  # user code
            raise InputError(
                f"candidate.load_hf_state_dict raised {type(exc).__name__}: {exc}", spec, "fix the loader"
            ) from None
        missing, unexpected = _read_load_return(returned)
        used |= view.read
        after_hook = module.state_dict(keep_vars=True)
        filled = {k for k in weights if k in after_hook and not _still_placeholder(after_hook[k])}

    # Filled by the loader (NaN-free) or by the rules (the checkpoint's own tensor, whatever it holds: NaN
    # weights are reported as nonfinite_weights, not as unloaded).
    loaded = filled | set(assign)
    unloaded = sorted(k for k in weights if k not in loaded)
    allowed = [k for k in unloaded if any(p.fullmatch(k) for p in allow_unloaded)]
    if hook is None:
        missing = list(unloaded)
        via = "rename" if rules else "state_dict"
    else:
        via = "load_hf_state_dict + rename" if assign and rules else "load_hf_state_dict"
    return LoadResult(
        missing_keys=sorted(set(missing) - set(allowed)),
        unexpected_keys=sorted((set(state_dict) - used) | set(unexpected)),
        via=via,
        unloaded=[k for k in unloaded if k not in allowed],
        allowed_unloaded=allowed,
    )


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, name = key.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def _set_placeholder(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, name = _owner(module, key)
    placeholder = torch.full(tensor.shape, float("nan"), dtype=tensor.dtype, device=tensor.device)
    if name in owner._parameters and owner._parameters[name] is not None:
        owner._parameters[name].data = placeholder  # keep the Parameter object (ties, optimiser refs)
    else:
        owner._buffers[name] = placeholder


def _still_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and bool(torch.isnan(tensor.detach()).any())


def _read_load_return(returned: object) -> tuple[list[str], list[str]]:
    if returned is None:
        return [], []
    if hasattr(returned, "missing_keys") and hasattr(returned, "unexpected_keys"):
        return list(returned.missing_keys), list(returned.unexpected_keys)
    if isinstance(returned, tuple) and len(returned) == 2:
        return list(returned[0]), list(returned[1])
    return [], []
