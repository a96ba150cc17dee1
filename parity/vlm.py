"""The image-features reference: transformers' own VLM computing ``get_image_features``, built around our tensors.

The VLM class (``PaliGemmaModel``, ``LlavaModel``, ``Gemma3Model``, ``LlavaOnevisionModel``,
``Idefics3Model``, ``SmolVLMModel``) is built on the meta device from the checkpoint's own ``config.json``;
its language model is deleted before anything is assigned, so no language-model weight is read or
allocated. The tower and the projector get the shared tensors (assigned, not copied), exactly as
`reference.build_reference` does for the tower alone.

Sites (canonical names, see `sites.site_names`): the tower's own up to the deepest layer the features depend
on, ``vision_model.post_layernorm`` where the family applies it, then ``vision_feature`` (the projector's
*input*: the selected, concatenated, maybe trimmed hidden state) and ``multi_modal_projector`` (its output,
the image tokens). Gemma 3's ``multi_modal_projector.mm_soft_emb_norm`` is a fine site.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siglip_scratch.checkpoint import index_checkpoint, load_tensors
from siglip_scratch.config import SiglipVisionConfig
from siglip_scratch.errors import ConfigError, InputError
from siglip_scratch.files import read_json
from siglip_scratch.hub import download_vision_checkpoint
from siglip_scratch.vlm import VLM_PRESETS, FeaturePath, feature_path, projector_key, synthetic_projector, vlm_preset

from .reference import rebuild_position_ids
from .weights import Weights

__all__ = [
    "VlmSpec",
    "build_features_reference",
    "features_canonical",
    "projector_tensors",
    "read_vlm_spec",
    "with_image_features",
]


@dataclass(frozen=True)
class VlmSpec:
    """A VLM's image-features path: its ``config.json`` (what transformers builds) and the rule read from it."""

    config: dict[str, Any]
    path: FeaturePath
    source: str

    @property
    def class_name(self) -> str:
        return {
            "paligemma": "PaliGemmaModel",
            "gemma3": "Gemma3Model",
            "llava": "LlavaModel",
            "llava_next": "LlavaNextModel",
            "llava_onevision": "LlavaOnevisionModel",
            "idefics3": "Idefics3Model",
            "smolvlm": "SmolVLMModel",
        }[self.path.model_type]


def read_vlm_spec(folder: str | Path, vision: SiglipVisionConfig) -> VlmSpec:
    """The spec of a VLM folder (its ``config.json``); a one-line error for a tower-only folder."""
    config_file = Path(folder) / "config.json"
    data = read_json(config_file, what="config.json", error=ConfigError)
    if "vision_config" not in data:
        raise InputError(
            "--image-features needs a VLM checkpoint (its config.json has no vision_config)",
            str(config_file),
            "give the VLM's own folder (or convert it with --with-projector); leave --image-features out for a tower",
        )
    return VlmSpec(data, feature_path(data, vision, source=str(config_file)), str(folder))


def projector_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The projector's tensors of a VLM folder, canonical ``multi_modal_projector.…`` keys (mapped, not copied)."""
    infos = index_checkpoint(folder, vision_only=True, also=lambda key: projector_key(key) is not None)
    found = {name: info for key, info in infos.items() if (name := projector_key(key)) is not None}
    if not found:
        raise InputError(
            "no projector tensors (multi_modal_projector.… or connector.…) in this checkpoint",
            str(folder),
            "convert with siglip-convert --with-projector, or give the VLM's own folder",
        )
    return load_tensors(found)


def features_canonical(name: str) -> str:
    """A VLM reference's module/parameter name → canonical (``vision_model.…``, ``multi_modal_projector.…``)."""
    for prefix in ("vision_tower.vision_model", "vision_tower", "vision_model"):
        if name == prefix or name.startswith(prefix + "."):
            return "vision_model" + name[len(prefix) :]
    for prefix in ("multi_modal_projector", "connector"):
        if name == prefix or name.startswith(prefix + "."):
            return "multi_modal_projector" + name[len(prefix) :]
    return name


class FeaturesReference(nn.Module):
    """transformers' VLM base model (language model deleted); ``forward(pixel_values)`` calls its own
    ``get_image_features`` with the family's arguments. Module names are canonical through `canonical`."""

    def __init__(self, vlm: nn.Module, spec: VlmSpec):
        super().__init__()
        self.vlm, self.spec = vlm, spec

    @staticmethod
    def canonical(name: str) -> str:
        return features_canonical(name[len("vlm.") :] if name.startswith("vlm.") else ("" if name == "vlm" else name))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        model_type = self.spec.path.model_type
        kwargs: dict[str, Any] = {}
        B, _, H, W = pixel_values.shape
        if model_type in ("llava_next", "llava_onevision"):
            # One crop per image (no anyres tiling): what reaches the projector is then each image's own tokens.
            kwargs["image_sizes"] = torch.tensor([[H, W]] * B)
            if model_type == "llava_onevision":
                kwargs["batch_num_images"] = torch.tensor([B])
        if model_type in ("idefics3", "smolvlm"):
            pixel_values = pixel_values[:, None]  # [B, images per sample, C, H, W]
        # The image features are the projector's output, [B, tokens, D_text]: get_image_features stops there (what
        # it does after it, 4.57's PaliGemma ÷√D_text, LLaVA-NeXT/-OneVision's split and newline packing, is past
        # the last site and needs a patch count per image this one-crop input does not have).
        captured: list[torch.Tensor] = []

        def stop(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            captured.append(out)
            raise _AtProjector

        projector = getattr(self.vlm, "multi_modal_projector", None) or self.vlm.connector
        handle = projector.register_forward_hook(stop)  # after the harness's hooks, which run first
        try:
            self.vlm.get_image_features(pixel_values, **kwargs)
        except _AtProjector:
            pass
        finally:
            handle.remove()
        if not captured:
            raise InputError(
                f"{self.spec.class_name}.get_image_features never ran its projector", "reference", "report this"
            )
        return captured[0]


class _AtProjector(Exception):
    """Raised by the reference's last hook: the image features are in hand."""


def _gemma_rms_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``Gemma3RMSNorm.forward`` (its own ``_norm``), except that float64 stays float64: it casts to
    float32 by design, which would make the float64 oracle's truth at this site only float32 (an honest port in
    float64 would then fail). Any other dtype takes transformers' path unchanged."""
    if x.dtype != torch.float64:
        return type(self).forward(self, x)
    return (self._norm(x) * (1.0 + self.weight)).type_as(x)


def build_features_reference(
    spec: VlmSpec, vision: SiglipVisionConfig, state: Mapping[str, torch.Tensor], *, attn_implementation: str = "sdpa"
) -> FeaturesReference:
    """transformers' VLM for ``spec`` whose tower and projector parameters *are* ``state``'s tensors (canonical
    keys); the language model is never built beyond meta and is deleted."""
    import transformers

    data = {k: v for k, v in spec.config.items() if k not in ("architectures", "transformers_version")}
    # The tower as our config reads it (one source of truth for both sides: a head-less PaliGemma tower too).
    data["vision_config"] = {**(data.get("vision_config") or {}), **vision.to_dict()}
    model_type = data.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **data)
    # The tower's attention as asked; the language model's is left alone (it is never run, and some refuse sdpa).
    hf_config.vision_config._attn_implementation = attn_implementation
    cls = getattr(transformers, spec.class_name)
    with torch.device("meta"):
        vlm = cls(hf_config)
    for lm in ("language_model", "text_model"):
        if hasattr(vlm, lm):
            delattr(vlm, lm)
    # LLaVA-NeXT/-OneVision's image_newline is appended after the projector, past the last site: never judged,
    # so it is not read; zeros stand in for it.
    like = next(iter(state.values()))
    after = {n: like.new_zeros(p.shape) for n, p in vlm.named_parameters() if n == "image_newline"}
    expected = {n: features_canonical(n) for n, _ in vlm.named_parameters() if n not in after}
    missing = sorted(c for c in expected.values() if c not in state)
    unexpected = sorted(set(state) - set(expected.values()))
    if missing or unexpected:
        raise InputError(
            f"the {spec.class_name} reference does not take these weights: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}",
            spec.source,
            "the checkpoint's tower or projector does not match its config.json",
        )
    result = vlm.load_state_dict({**{n: state[c] for n, c in expected.items()}, **after}, strict=False, assign=True)
    left = sorted(set(result.missing_keys) - {n for n, _ in vlm.named_buffers()}) + sorted(result.unexpected_keys)
    if left:
        raise InputError(f"reference left keys unloaded: {left[:5]}", spec.class_name, "report this")
    rebuild_position_ids(vlm, next(iter(state.values())).device, spec.class_name)
    if "image_newline" in after:  # a constant here, not a parameter: no oracle unit owns it
        del vlm._parameters["image_newline"]
        vlm.register_buffer("image_newline", after["image_newline"], persistent=False)
    for module in vlm.modules():
        if type(module).__name__ == "Gemma3RMSNorm":
            module.forward = types.MethodType(_gemma_rms_norm, module)
    return FeaturesReference(vlm, spec).eval()


def with_image_features(
    w: Weights, *, preset: str | None = None, seed: int = 0, model: str | None = None, revision: str | None = None
) -> Weights:
    """``w`` with the VLM's projector tensors and feature path: read from its folder (in ``w``'s dtype and device),
    or, for synthetic weights of a preset with a VLM preset (`siglip_scratch.vlm.VLM_PRESETS`), drawn
    deterministically at its shapes."""
    like = next(iter(w.state_dict.values()))
    if w.synthetic and preset is not None:
        data = vlm_preset(preset, w.config)
        spec = VlmSpec(data, feature_path(data, w.config, source=f"preset {preset}"), f"preset {preset}")
        projector = synthetic_projector(spec.path, w.config, data, seed=seed, dtype=like.dtype)
    elif w.folder is not None:
        if model is not None:  # a hub VLM: the shards that hold its projector too (cached ones are not fetched again)
            download_vision_checkpoint(model, revision=revision, also=lambda key: projector_key(key) is not None)
        spec = read_vlm_spec(w.folder, w.config)
        projector = projector_tensors(w.folder)
    else:
        raise InputError(
            "--image-features needs a VLM checkpoint (--weights VLM_FOLDER, --model VLM_ID) or a VLM preset",
            w.source,
            f"VLM presets: {', '.join(sorted(VLM_PRESETS))}",
        )
    projector = {k: v.to(device=like.device, dtype=like.dtype) for k, v in projector.items()}
    return dataclasses.replace(w, state_dict={**w.state_dict, **projector}, features=spec)
