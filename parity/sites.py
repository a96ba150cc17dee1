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
from siglip_scratch.vlm import FeaturePath

__all__ = [
    "EMBEDDINGS",
    "FEATURE_SITES",
    "FIRST_LAYER",
    "INPUT_SITES",
    "PROJECTOR",
    "SITE_CONTRACT",
    "VISION_FEATURE",
    "Depth",
    "RenameRules",
    "SiteProgress",
    "apply_rename",
    "first_tensor",
    "image_features",
    "input_tensor",
    "replace_first_tensor",
    "site_names",
    "teacher_forced",
    "teacher_input",
]

Depth = Literal["coarse", "fine"]
RenameRules = Sequence[tuple[re.Pattern[str], str]]
SUBLAYER_SITES = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
SITE_CONTRACT = (
    "site contract (what each canonical module must output; shapes for batch B, N patches, width D):\n"
    "  vision_model.embeddings           [B, N, D] patch embeddings + position embeddings, before layer 0\n"
    "  …layers.i.layer_norm1 / .layer_norm2   [B, N, D] the LayerNorm outputs (inputs of attention / MLP)\n"
    "  …layers.i.self_attn / .mlp        [B, N, D] the sub-block outputs, before their residual add\n"
    "  …layers.i                         [B, N, D] the layer output, after both residual adds\n"
    "  vision_model.post_layernorm       [B, N, D] the final LayerNorm output (last_hidden_state)\n"
    "  vision_model.head                 [B, D] the MAP-pooled output (pooler_output)\n"
    "with --image-features (a VLM's path past the tower; sites after the deepest layer it uses are not judged):\n"
    "  vision_feature                    [B, T, D·k] the projector's input: the hidden state(s) the VLM selects\n"
    "  multi_modal_projector             [B, T', D_text] the image tokens the language model receives\n"
    "A module may return a tensor, a tuple/list (first item), an object with last_hidden_state, or a dict\n"
    "with last_hidden_state. The model's own output (tensor, tuple, object or dict with last_hidden_state /\n"
    "pooler_output) stands in for post_layernorm and head when no module carries them (with --image-features: a\n"
    "tensor, or a dict / object with image_features, stands in for multi_modal_projector). Rename rules map\n"
    "candidate names (module paths and parameter keys) to canonical ones, in order, each applied to the\n"
    "previous rule's result."
)
EMBEDDINGS = "vision_model.embeddings"
FIRST_LAYER = "vision_model.encoder.layers.0"
# Image features (a VLM's path past the tower, `siglip_scratch.vlm`): the hidden state it selects is read as its
# projector's *input* (a selection has no module of its own); the projector's output is the image tokens.
VISION_FEATURE = "vision_feature"
PROJECTOR = "multi_modal_projector"
INPUT_SITES = {VISION_FEATURE: PROJECTOR}  # site -> the site whose module's input it is
FEATURE_SITES = (VISION_FEATURE, PROJECTOR)


def site_names(config: SiglipVisionConfig, depth: Depth = "coarse", path: FeaturePath | None = None) -> list[str]:
    """Canonical sites in the order their outputs are produced (a sub-layer before its layer).

    With a VLM's feature ``path``: the tower's sites up to the deepest layer the image features depend on,
    ``post_layernorm`` only where the family applies it, no head, then `VISION_FEATURE`, Gemma 3's soft-embedding
    norm (fine depth) and `PROJECTOR`."""
    layers = config.num_hidden_layers if path is None else path.last_layer + 1
    names = ["vision_model.embeddings"]
    for i in range(layers):
        layer = f"vision_model.encoder.layers.{i}"
        if depth == "fine":
            names += [f"{layer}.{s}" for s in SUBLAYER_SITES]
        names.append(layer)
    if path is None or path.post_layernorm:
        names.append("vision_model.post_layernorm")
    if path is None:
        return names + (["vision_model.head"] if config.vision_use_head else [])
    names.append(VISION_FEATURE)
    if depth == "fine" and path.family == "gemma3":
        names.append(f"{PROJECTOR}.mm_soft_emb_norm")
    return [*names, PROJECTOR]


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


def image_features(output: Any, like: torch.Size | None = None) -> torch.Tensor | None:
    """A VLM candidate's image features: a tensor, or ``image_features`` (a key or an attribute); with the
    reference's ``[B, T, D]`` shape (``like``), also the other forms ports return them in: flattened ``[B·T, D]``
    (as a language model splices them), or one ``[T, D]`` tensor per image (transformers 5's own tuple)."""
    found = output
    if not isinstance(output, torch.Tensor):
        found = output.get("image_features") if isinstance(output, Mapping) else getattr(output, "image_features", None)
    if like is None or len(like) != 3:
        return found if isinstance(found, torch.Tensor) else None
    B, T, D = like
    if (
        isinstance(found, (list, tuple))
        and len(found) == B
        and all(isinstance(t, torch.Tensor) and tuple(t.shape) == (T, D) for t in found)
    ):
        return torch.stack(list(found))
    if isinstance(found, torch.Tensor) and tuple(found.shape) == (B * T, D):
        return found.view(B, T, D)
    return found if isinstance(found, torch.Tensor) else None


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


def teacher_input(site: str, ref_in: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """The teacher-forcing rule, in one place: the reference's recorded input to ``site``, or None where a site
    is never teacher-forced.

    The embeddings site is never forced: its input is the model input, which both sides already share, and what
    a candidate's embeddings module takes (pixels, patches before the position add) is its own business. A site
    the reference recorded no input for is not forced either.
    """
    if ref_in is None or site == EMBEDDINGS or site not in ref_in:
        return None
    return ref_in[site]


def teacher_forced(
    site: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ref_in: Mapping[str, torch.Tensor] | None,
    dtype: torch.dtype | None = None,
    module: nn.Module | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A forward pre-hook's replacement ``(args, kwargs)`` under teacher forcing (see `teacher_input`), or None.

    The module gets a fresh *copy* of the reference's tensor, so a module that writes into its input
    (``x += …``, ``x.mul_(…)``) changes its own copy, never the recorded reference. The copy is in ``dtype``
    (the float64 oracle), else in the dtype the module computes in: its parameters' (a port kept in float64, a
    norm kept in float32), else the dtype of the tensor it was about to get.
    """
    given = teacher_input(site, ref_in)
    if given is None:
        return None
    if dtype is None and module is not None:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    current = input_tensor(args, kwargs)
    if site in FEATURE_SITES and current is not None and current.shape != given.shape:
        return None  # a projector fed another token count (a CLS token assumed): nothing to force; judged as it is
    if dtype is None and current is not None and current.is_floating_point():
        dtype = current.dtype
    return replace_first_tensor(args, kwargs, given.to(dtype=dtype or given.dtype, copy=True))


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
    for site, owner in INPUT_SITES.items():  # read at its owner's input: the same module
        if site in wanted_set and owner in found:
            found[site] = found[owner]
    # In production order: an input site's pre-hook must run before its owner's (teacher forcing replaces it).
    return {n: found[n] for n in wanted if n in found}


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
            if name in INPUT_SITES:  # its value is the module's input, as it arrives (before any forcing)
                if on_output is not None:

                    def read(mod, args, kwargs, _name=name):
                        on_output(_name, input_tensor(args, kwargs))

                    handles.append(module.register_forward_pre_hook(read, with_kwargs=True))
                continue
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
