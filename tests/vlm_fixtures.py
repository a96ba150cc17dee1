"""VLMs for the image-features tests, built and saved by transformers itself (never a hand-made layout).

Each family at a tiny, structure-true config (3 tower layers, so a feature layer can be off by one either way;
a 4×4 patch grid; a language model 48 wide, so the vision and text widths differ). The tower gets our
trained-regime synthetic weights (massive-activation channels, sharp attention) and the projector random
weights at its fan-in scale: transformers' own init would leave Gemma 3's projector at zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from siglip_scratch import SiglipVisionConfig
from siglip_scratch.modeling import synthetic_state_dict

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
TEXT = dict(
    hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=12
)
FAMILIES = ["PaliGemma", "PaliGemma 2", "Gemma 3", "LLaVA", "LLaVA-NeXT", "LLaVA-OneVision", "SmolVLM", "Idefics3"]


def build_vlm(kind: str, T: Any) -> torch.nn.Module:
    """transformers' own VLM class for ``kind`` (eval mode), tower and projector weights set as described above."""
    vision = {**VISION, "model_type": "siglip_vision_model"}
    text = {**TEXT, "vocab_size": 300}
    if kind == "PaliGemma":
        model = T.PaliGemmaForConditionalGeneration(
            T.PaliGemmaConfig(vision_config=vision, text_config={**text, "model_type": "gemma"})
        )
    elif kind == "PaliGemma 2":
        model = T.PaliGemmaForConditionalGeneration(
            T.PaliGemmaConfig(vision_config=vision, text_config={**text, "model_type": "gemma2"})
        )
    elif kind == "Gemma 3":
        model = T.Gemma3ForConditionalGeneration(
            T.Gemma3Config(
                vision_config={**vision, "vision_use_head": False},
                text_config={**text, "model_type": "gemma3_text"},
                mm_tokens_per_image=4,
            )
        )
    elif kind == "LLaVA":
        model = T.LlavaForConditionalGeneration(
            T.LlavaConfig(vision_config=vision, text_config={**text, "model_type": "llama"})
        )
    elif kind == "LLaVA-NeXT":
        model = T.LlavaNextForConditionalGeneration(
            T.LlavaNextConfig(
                vision_config=vision,
                text_config={**text, "model_type": "llama"},
                image_grid_pinpoints=[[32, 32], [32, 64]],
            )
        )
    elif kind == "LLaVA-OneVision":
        model = T.LlavaOnevisionForConditionalGeneration(
            T.LlavaOnevisionConfig(vision_config=vision, text_config={**text, "model_type": "qwen2"})
        )
    elif kind in ("SmolVLM", "Idefics3"):
        cls = "SmolVLM" if kind == "SmolVLM" else "Idefics3"
        config = getattr(T, f"{cls}Config")(
            vision_config=dict(VISION), text_config={**text, "model_type": "llama"}, scale_factor=2
        )
        model = getattr(T, f"{cls}ForConditionalGeneration")(config)
    else:
        raise AssertionError(kind)
    _set_weights(model, kind)
    return model.eval()


def _tower(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for n, m in model.named_modules() if n.split(".")[-1] in ("vision_tower", "vision_model"))


def _set_weights(model: torch.nn.Module, kind: str) -> None:
    vision = model.config.vision_config.to_dict()
    cfg = SiglipVisionConfig.from_dict({"vision_config": vision, "model_type": model.config.model_type})
    state = synthetic_state_dict(cfg, seed=7, regime="trained")
    tower = _tower(model)
    wrapped = any(n.startswith("vision_model.") for n, _ in tower.named_parameters())
    mapped = {(k if wrapped else k[len("vision_model.") :]): v for k, v in state.items()}
    result = tower.load_state_dict(mapped, strict=False)
    # Only the head may be absent (a tower class without one); everything the tower has must be set.
    assert not result.missing_keys, (kind, result.missing_keys)
    assert all(".head." in k or k.startswith("head.") for k in result.unexpected_keys), (kind, result.unexpected_keys)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in ("multi_modal_projector", "connector")):
                continue
            if "norm" in name:  # Gemma's RMSNorm stores w with the scale 1 + w
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[0] if "mm_input_projection_weight" in name else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def save_vlm(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def projector_output(model: torch.nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The truth without the harness: the full VLM's own ``get_image_features`` on ``x``, read at its projector."""
    base = model.model
    projector = getattr(base, "multi_modal_projector", None) or base.connector
    got: list[torch.Tensor] = []

    def stop(module: Any, args: Any, out: torch.Tensor) -> None:
        got.append(out)
        raise _Done  # what follows the projector (LLaVA-NeXT's unpadding and packing) is not what is compared

    handle = projector.register_forward_hook(stop)
    B, _, H, W = x.shape
    kwargs: dict[str, Any] = {}
    if kind == "LLaVA-OneVision":
        kwargs = {"image_sizes": torch.tensor([[H, W]] * B), "batch_num_images": torch.tensor([B])}
    if kind == "LLaVA-NeXT":
        # anyres: each image is its base view plus crops; a 32×32 image is a base and one crop, so a batch of two
        # views is one image, and the projector sees both views.
        kwargs = {"image_sizes": torch.tensor([[32, 32]] * (B // 2))}
    try:
        with torch.inference_mode():
            base.get_image_features(x[:, None] if kind in ("SmolVLM", "Idefics3") else x, **kwargs)
    except _Done:
        pass
    finally:
        handle.remove()
    return got[0]


class _Done(Exception):
    pass
