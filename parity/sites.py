"""Sites: the named places where two implementations are compared, and the hooks that read them.

A site is a module path in the hub layout. Values are taken with forward hooks (never from
``output_hidden_states``, whose last entry differs between transformers 4.57 and 5.x). In
isolated mode a forward pre-hook replaces a site's input with the reference's input to that
site (teacher forcing), so an error stays where it was made.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from siglip_scratch.config import SiglipVisionConfig
from siglip_scratch.errors import InputError

__all__ = [
    "Depth",
    "RenameRules",
    "SiteProgress",
    "apply_rename",
    "first_tensor",
    "input_tensor",
    "replace_first_tensor",
    "site_names",
]

Depth = Literal["coarse", "fine"]
RenameRules = Sequence[tuple[re.Pattern[str], str]]
SUBLAYER_SITES = ("layer_norm1", "self_attn", "layer_norm2", "mlp")


def site_names(config: SiglipVisionConfig, depth: Depth = "coarse") -> list[str]:
    """Canonical sites in the order their outputs are produced (a sub-layer before its layer)."""
    names = ["vision_model.embeddings"]
    for i in range(config.num_hidden_layers):
        layer = f"vision_model.encoder.layers.{i}"
        if depth == "fine":
            names += [f"{layer}.{s}" for s in SUBLAYER_SITES]
        names.append(layer)
    names.append("vision_model.post_layernorm")
    if config.vision_use_head:
        names.append("vision_model.head")
    return names


def apply_rename(name: str, rules: RenameRules) -> str:
    for pattern, replacement in rules:
        name = pattern.sub(replacement, name)
    return name


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a module produced: itself, the first of a tuple/list, or ``last_hidden_state``
    (an attribute, or a key of a dict)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    hidden = value.get("last_hidden_state") if isinstance(value, Mapping) else getattr(value, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else None


_PREFERRED_KWARGS = ("hidden_states", "hidden_state", "x", "input", "inputs_embeds", "pixel_values")


def _input_slot(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, int | str] | None:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return ("arg", i)
    for k in _PREFERRED_KWARGS:
        if isinstance(kwargs.get(k), torch.Tensor):
            return ("kwarg", k)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return ("kwarg", k)
    return None


def input_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The tensor a module takes as its input: the one teacher forcing replaces (same rule)."""
    slot = _input_slot(args, kwargs)
    if slot is None:
        return None
    kind, where = slot
    return args[where] if kind == "arg" else kwargs[where]  # type: ignore[index]


def replace_first_tensor(
    args: tuple[Any, ...], kwargs: dict[str, Any], new: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    slot = _input_slot(args, kwargs)
    if slot is None:
        return None
    kind, where = slot
    if kind == "arg":
        assert isinstance(where, int)
        return (*args[:where], new, *args[where + 1 :]), kwargs
    return args, {**kwargs, where: new}


class SiteProgress:
    """Per-site-group progress for one phase (an oracle pass, a candidate run) that can take minutes.

    ``done(site)`` is called as each site's output arrives. When a site group (the embeddings, one
    layer, post_layernorm, the head) has finished and at least ``every`` seconds have passed since the
    last line, one line says where the phase is: ``candidate: isolated run: layer 13/27 done``. Short
    runs print nothing beyond their phase line.
    """

    every = 2.0  # seconds between lines; a class attribute so tests can set 0

    def __init__(self, say: Callable[[str], None] | None, phase: str, names: Sequence[str]):
        self.say, self.phase = say, phase
        self.layers = sum(1 for n in names if _LAYER.fullmatch(n))
        self.last = time.perf_counter()
        self.group: str | None = None

    def done(self, site: str) -> None:
        if self.say is None:
            return
        group = self._group(site)
        if group == self.group:
            return
        finished, self.group = self.group, group
        now = time.perf_counter()
        if finished is not None and now - self.last >= self.every:
            self.say(f"{self.phase}: {finished} done")
            self.last = now

    def _group(self, site: str) -> str:
        m = _LAYER_IN.match(site)
        if m:
            return f"layer {int(m.group(1)) + 1}/{self.layers}"
        return site.rsplit(".", 1)[-1]


_LAYER = re.compile(r".*encoder\.layers\.\d+")
_LAYER_IN = re.compile(r".*encoder\.layers\.(\d+)(\.|$)")


def named_sites(model: nn.Module, to_canonical: Callable[[str], str], wanted: Sequence[str]) -> dict[str, nn.Module]:
    """canonical site name -> module, for the wanted sites the model has."""
    wanted_set = set(wanted)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        canonical = to_canonical(name)
        if canonical in wanted_set and canonical not in found:
            found[canonical] = module
    return found


@contextmanager
def hooks(
    sites: Mapping[str, nn.Module],
    on_input: Callable[[str, tuple[Any, ...], dict[str, Any]], Any] | None = None,
    on_output: Callable[[str, Any], None] | None = None,
) -> Iterator[None]:
    """Install pre-hooks (may return replaced ``(args, kwargs)``) and forward hooks; always removed."""
    handles = []
    try:
        for name, module in sites.items():
            if on_input is not None:

                def pre(mod, args, kwargs, _name=name):
                    return on_input(_name, args, kwargs)

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            if on_output is not None:

                def post(mod, args, output, _name=name):
                    on_output(_name, output)

                handles.append(module.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def compile_rename(spec: object, source: str) -> list[tuple[re.Pattern[str], str]]:
    """Validate ``{"rename": [["regex", "replacement"], …]}`` and compile it."""
    rules = spec.get("rename") if isinstance(spec, dict) else None
    if not isinstance(rules, list):
        raise InputError(
            'rename map must be {"rename": [["regex", "replacement"], ...]}',
            source,
            "see examples/timm_like_rename.json",
        )
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, list) and len(rule) == 2 and all(isinstance(r, str) for r in rule)):
            raise InputError(f"rule {i} is not a [regex, replacement] pair of strings: {rule!r}", source, None)
        try:
            out.append((re.compile(rule[0]), rule[1]))
        except re.error as exc:
            raise InputError(
                f"rule {i} regex {rule[0]!r} does not compile ({exc})", source, "fix the pattern"
            ) from None
        pattern = out[-1][0]
        for ref in re.findall(r"\\(\d+)|\\g<(\w+)>", rule[1]):
            group = ref[0] or ref[1]
            if (group.isdigit() and int(group) > pattern.groups) or (
                not group.isdigit() and group not in pattern.groupindex
            ):
                raise InputError(
                    f"rule {i} replacement {rule[1]!r} refers to group {group} that {rule[0]!r} lacks", source, None
                )
    return out
