"""The reference: ``transformers.SiglipVisionModel`` built around *our* tensors (no copy).

transformers 4.57 wraps the tower (``vision_model.embeddings…``); 5.6 and later are flat
(``embeddings…``). `canonical_name` maps both to hub-layout names, so nothing downstream
special-cases a version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from siglip_scratch.config import AnyVisionConfig, Siglip2VisionConfig
from siglip_scratch.errors import InputError

from .inputs import ModelInputs, call
from .sites import first_tensor, hooks, input_tensor, named_sites

__all__ = [
    "build_reference",
    "canonical_name",
    "naflex_arithmetic",
    "rebuild_position_ids",
    "record_reference",
    "reference_namer",
    "reference_prefix",
    "transformers_version",
]


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise InputError(
            "the parity reference needs transformers, which is not installed",
            "transformers",
            'pip install "siglip-scratch[parity]"',
        ) from None
    return transformers


def transformers_version() -> str:
    return _import_transformers().__version__


def naflex_arithmetic() -> str:
    """Which transformers' arithmetic our models reproduce where versions differ: "5" or "4.57" (NaFlex's
    `Siglip2VisionModel`, Idefics3's bucketed positions in `SiglipImageFeatures`)."""
    return "5" if int(transformers_version().split(".")[0]) >= 5 else "4.57"


def reference_prefix(model: nn.Module) -> str:
    """The prefix to strip from the reference's module names to get canonical names minus
    ``vision_model.``: ``"vision_model."`` for the 4.57 wrapper, ``""`` for the flat layout."""
    return "vision_model." if hasattr(model, "vision_model") else ""


def canonical_name(name: str, prefix: str) -> str:
    """Reference module/parameter name -> hub-layout name (``vision_model.…``)."""
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    return "vision_model." + name if name else "vision_model"


def reference_namer(model: nn.Module) -> Callable[[str], str]:
    """The reference's module name → canonical name: a reference that names its own (the image-features
    reference's ``canonical``), else `canonical_name` with the layout's prefix."""
    own = getattr(model, "canonical", None)
    if callable(own):
        return own
    prefix = reference_prefix(model)
    return lambda name: canonical_name(name, prefix)


def build_reference(
    config: AnyVisionConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A ``transformers.SiglipVisionModel`` (``Siglip2VisionModel`` for a NaFlex config) in eval mode whose
    parameters *are* the given tensors.

    Args:
        state_dict: canonical (``vision_model.…``) keys; tensors are assigned, not copied, so the
            reference and our model share storage.
    """
    transformers = _import_transformers()
    fields = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    naflex = isinstance(config, Siglip2VisionConfig)
    cls_name = "Siglip2VisionModel" if naflex else "SiglipVisionModel"
    hf_config = getattr(transformers, cls_name.replace("Model", "Config"))(**fields)
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(hf_config)
    prefix = reference_prefix(model)
    expected = {k for k, _ in model.named_parameters()}
    mapped = {}
    for key, tensor in state_dict.items():
        name = key[len("vision_model.") :]
        mapped[prefix + name] = tensor
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        raise InputError(
            f"reference does not take these weights: missing {missing[:5]}, unexpected {unexpected[:5]}",
            f"transformers.{cls_name}",
            "report this: the reference layout changed",
        )
    # strict=False only because non-persistent buffers (position_ids) are rebuilt below; every
    # parameter must still be filled, and the result is checked, not dropped.
    result = model.load_state_dict(mapped, strict=False, assign=True)
    left = sorted(set(result.missing_keys) - {n for n, _ in model.named_buffers()}) + sorted(result.unexpected_keys)
    if left:
        raise InputError(f"reference left keys unloaded: {left[:5]}", f"transformers.{cls_name}", "report this")
    rebuild_position_ids(model, next(iter(state_dict.values())).device, f"transformers.{cls_name}")
    return model.eval()


def rebuild_position_ids(model: nn.Module, device: torch.device, owner: str) -> None:
    """Non-persistent buffers (``position_ids``) were created on meta and are never in a checkpoint: rebuild
    them for real. Any other buffer still on meta is our bug."""
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if buf_name != "position_ids":
                    raise InputError(f"unexpected meta buffer {mod_name}.{buf_name}", owner, "report this")
                setattr(module, buf_name, torch.arange(buf.shape[-1], device=device).expand((1, -1)))


def record_reference(
    reference: nn.Module, names: Sequence[str], inputs: ModelInputs
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the reference once on ``inputs`` and record, per site, its input (the tensor teacher forcing
    replaces) and its output. Returns ``(inputs, outputs)`` keyed by canonical site name."""
    ref_sites = named_sites(reference, reference_namer(reference), names)
    ref_in: dict[str, torch.Tensor] = {}
    ref_out: dict[str, torch.Tensor] = {}

    def record_in(site: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = input_tensor(args, kwargs)  # the same slot teacher forcing replaces
        if t is not None:
            ref_in[site] = t

    def record_out(site: str, output: Any) -> None:
        t = first_tensor(output)
        if t is not None:
            ref_out[site] = t

    with torch.inference_mode(), hooks(ref_sites, on_input=record_in, on_output=record_out):
        call(reference, inputs)
    missing_ref = [n for n in names if n not in ref_out]
    if missing_ref:
        raise InputError(f"reference did not produce sites {missing_ref}", "reference", "report this")
    return ref_in, ref_out
