"""Image features: what a VLM's language model receives from a SigLIP tower.

Between the tower and the language model a VLM does two things, each a site the parity harness judges:

- ``vision_feature``: it *selects* a hidden state (PaliGemma, Gemma 3, Idefics3/SmolVLM: the tower's
  ``last_hidden_state``, i.e. after ``post_layernorm``; LLaVA, LLaVA-NeXT, LLaVA-OneVision:
  ``hidden_states[vision_feature_layer]``, no ``post_layernorm``, several layers concatenated on the
  feature axis, the first token dropped by the ``"default"`` strategy);
- ``multi_modal_projector``: it *projects* that to the language model's width (PaliGemma: one Linear;
  LLaVA: Linear, activation, Linear; Gemma 3: 2-D average pooling, an RMSNorm with ``1 + w``, a matmul;
  Idefics3/SmolVLM: pixel shuffle, then a Linear without bias).

`FeaturePath` reads the rule from a VLM's ``config.json`` (the transformers class defaults where a field
is absent, as ``save_pretrained`` leaves them out). `SiglipImageFeatures` is our from-scratch
implementation: the tower of `model.py` plus the projectors below, with module paths ``vision_model.…``
and ``multi_modal_projector.…``. PaliGemma's image features are the projector's output, *before* the
language model's embedding scale (transformers 4.57's ``get_image_features`` divides by
``√text_hidden_size`` and Gemma multiplies it back; 5.x does neither).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config import SiglipVisionConfig
from .errors import CheckpointError, ConfigError
from .model import AttnImplementation, SiglipVisionTransformer

__all__ = [
    "FAMILIES",
    "PROJECTOR_PREFIXES",
    "VLM_PRESETS",
    "FeaturePath",
    "SiglipImageFeatures",
    "bucketed_position_ids",
    "build_projector",
    "feature_path",
    "hub_layout",
    "pixel_shuffle",
    "projector_key",
    "synthetic_projector",
    "vlm_key",
    "vlm_preset",
]

# model_type -> (family, class defaults of the fields that select and project)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "paligemma": ("paligemma", {}),
    "gemma3": ("gemma3", {"mm_tokens_per_image": 256}),
    "llava": ("llava", {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}),
    "llava_next": ("llava", {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}),
    "llava_onevision": ("llava", {"vision_feature_layer": -1, "vision_feature_select_strategy": "full"}),
    "idefics3": ("idefics3", {"scale_factor": 2}),
    "smolvlm": ("idefics3", {"scale_factor": 2}),
}
LLAVA_PROJECTOR = {"projector_hidden_act": "gelu", "multimodal_projector_bias": True}
# How a VLM stores its projector: 4.57 and the hub (multi_modal_projector.…), 5.x (model.multi_modal_projector.…),
# Idefics3/SmolVLM (connector.… / model.connector.…). All read as canonical ``multi_modal_projector.…``.
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.", "model.connector.", "connector.")


def projector_key(key: str) -> str | None:
    """A VLM checkpoint key's canonical projector name (``multi_modal_projector.…``), or None if not the projector's."""
    prefix = next((p for p in PROJECTOR_PREFIXES if key.startswith(p)), None)
    return None if prefix is None else "multi_modal_projector." + key[len(prefix) :]


def vlm_key(key: str) -> str | None:
    """A VLM checkpoint key that ``--with-projector`` keeps beside the tower, canonically named: the projector's
    (`projector_key`), and LLaVA-NeXT/-OneVision's ``image_newline`` (the token appended after each image's
    features); None for anything else."""
    if key in ("image_newline", "model.image_newline"):
        return "image_newline"
    return projector_key(key)


def hub_layout(path: FeaturePath, canonical: str) -> str:
    """Where a canonical tower or projector key goes in the VLM's hub layout (what transformers 4.57 writes and
    every version reads): ``vision_tower.vision_model.…`` and ``multi_modal_projector.…``; Idefics3/SmolVLM:
    ``model.vision_model.…`` and ``model.connector.…``."""
    idefics = path.family == "idefics3"
    if canonical == "image_newline":
        return canonical
    if canonical.startswith("multi_modal_projector."):
        return ("model.connector." if idefics else "multi_modal_projector.") + canonical[
            len("multi_modal_projector.") :
        ]
    assert canonical.startswith("vision_model."), canonical
    return ("model." if idefics else "vision_tower.") + canonical


# The VLM around a tower preset (`config.PRESETS`, same hub id): what its config.json says besides the tower, for
# deterministic synthetic image features at the real shapes (``--preset ID --image-features``, ``make parity``).
VLM_PRESETS: dict[str, dict[str, Any]] = {
    "google/paligemma-3b-pt-224": {
        "model_type": "paligemma",
        "projection_dim": 2048,
        "vision_config": {"projection_dim": 2048},
        "text_config": {
            "model_type": "gemma",
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_hidden_layers": 18,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "vocab_size": 257216,
        },
    },
    "google/gemma-3-4b-it": {
        "model_type": "gemma3",
        "mm_tokens_per_image": 256,
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "vocab_size": 262208,
        },
    },
    "HuggingFaceTB/SmolVLM-256M-Instruct": {
        "model_type": "smolvlm",
        "scale_factor": 4,
        "text_config": {
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49280,
        },
    },
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": {
        "model_type": "llava_onevision",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 152000,
        },
    },
}


def vlm_preset(preset: str, vision: SiglipVisionConfig) -> dict[str, Any]:
    """The VLM config dict of a preset (its ``config.json`` as far as the image features need it)."""
    if preset not in VLM_PRESETS:
        raise ConfigError(
            f"{preset!r} has no VLM preset (image features are preset for {', '.join(sorted(VLM_PRESETS))})",
            "--preset",
            "give a VLM checkpoint with --weights/--model, or one of those presets",
        )
    data = VLM_PRESETS[preset]
    return {**data, "vision_config": {**vision.to_dict(), **data.get("vision_config", {})}}


def synthetic_projector(
    path: FeaturePath, vision: SiglipVisionConfig, data: Mapping[str, Any], *, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Deterministic projector weights at a preset's shapes (canonical ``multi_modal_projector.…`` keys): matrices
    ``N(0, 1/fan_in)``, biases ``N(0, 0.02²)``, Gemma 3's norm weight ``N(0, 0.1²)`` (scale ``1 + w``)."""
    d, text = vision.hidden_size, path.text_hidden_size
    if path.family == "paligemma":
        out = int((data.get("vision_config") or {}).get("projection_dim") or data.get("projection_dim") or text)
        shapes = {"linear.weight": (out, d), "linear.bias": (out,)}
    elif path.family == "llava":
        shapes = {"linear_1.weight": (text, d * len(path.layers)), "linear_2.weight": (text, text)}
        if path.extra.get("multimodal_projector_bias", True):
            shapes |= {"linear_1.bias": (text,), "linear_2.bias": (text,)}
    elif path.family == "gemma3":
        shapes = {"mm_input_projection_weight": (d, text), "mm_soft_emb_norm.weight": (d,)}
    else:
        s = int(path.extra["scale_factor"])
        shapes = {"modality_projection.proj.weight": (text, d * s * s)}
    g = torch.Generator().manual_seed(seed + 1_000_003)
    out_state = {}
    for key, shape in sorted(shapes.items()):
        t = torch.randn(shape, generator=g)
        if key.endswith("bias"):
            t = t * 0.02
        elif key.endswith("norm.weight"):
            t = t * 0.1
        else:
            t = t / math.sqrt(shape[0] if key == "mm_input_projection_weight" else shape[-1])
        out_state["multi_modal_projector." + key] = t.to(dtype)
    return out_state


@dataclass(frozen=True)
class FeaturePath:
    """How one VLM turns its tower's hidden states into the image features its language model receives.

    ``layers`` are indices into ``hidden_states`` as transformers numbers them (0: the embeddings' output,
    ``i``: layer ``i − 1``'s output), made non-negative; ``post_layernorm`` says whether the selected state
    is the tower's final norm output (only ever with the last layer)."""

    model_type: str
    family: str  # paligemma | gemma3 | llava | idefics3
    layers: tuple[int, ...]
    strategy: str = "full"  # "default" drops the first token (a CLS token SigLIP does not have)
    post_layernorm: bool = False
    text_hidden_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # act, bias, mm_tokens_per_image, scale_factor

    @property
    def last_layer(self) -> int:
        """The deepest encoder layer (0-based) the features depend on; -1: only the embeddings."""
        return max(self.layers) - 1

    def uses(self, key: str) -> bool:
        """Whether the image features depend on the canonical weight ``key`` (not: the head, the tower layers past
        the deepest one selected, ``post_layernorm`` where the family does not apply it)."""
        if key.startswith("vision_model.head."):
            return False
        if key.startswith("vision_model.post_layernorm."):
            return self.post_layernorm
        prefix = "vision_model.encoder.layers."
        if key.startswith(prefix):
            return int(key[len(prefix) :].split(".")[0]) <= self.last_layer
        return True

    def describe(self) -> str:
        if self.post_layernorm:
            chosen = "last_hidden_state (after post_layernorm)"
        else:
            chosen = " + ".join(f"hidden_states[{i}]" for i in self.layers) + " (no post_layernorm)"
        drop = ", first token dropped" if self.strategy == "default" else ""
        return f"{self.model_type}: {chosen}{drop}, then the {self.family} projector"


def feature_path(data: Mapping[str, Any], vision: SiglipVisionConfig, *, source: str = "config") -> FeaturePath:
    """The feature path of a VLM config dict (its ``config.json``); `ConfigError` for a model type that has none."""
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model_type {model_type!r} is not a VLM with a SigLIP tower whose image features we know",
            f"{source}: model_type",
            f"image features are defined for {', '.join(sorted(FAMILIES))}",
        )
    family, defaults = FAMILIES[model_type]
    values = {**defaults, **{k: data[k] for k in defaults if data.get(k) is not None}}
    text = data.get("text_config") or {}
    text_hidden = int(text.get("hidden_size") or 0) if isinstance(text, Mapping) else 0
    n = vision.num_hidden_layers
    if family != "llava":
        extra = {k: values[k] for k in ("mm_tokens_per_image", "scale_factor") if k in values}
        return FeaturePath(model_type, family, (n,), "full", True, text_hidden, extra)
    layer, strategy = values["vision_feature_layer"], values["vision_feature_select_strategy"]
    chosen = [layer] if isinstance(layer, int) else list(layer)
    if not chosen or not all(isinstance(i, int) and -(n + 1) <= i <= n for i in chosen):
        raise ConfigError(
            f"vision_feature_layer {layer!r} does not index the {n + 1} hidden states of a {n}-layer tower",
            f"{source}: vision_feature_layer",
            None,
        )
    if strategy not in ("default", "full"):
        raise ConfigError(
            f"vision_feature_select_strategy {strategy!r} is neither 'default' nor 'full'",
            f"{source}: vision_feature_select_strategy",
            None,
        )
    extra = {k: data.get(k, v) for k, v in LLAVA_PROJECTOR.items()}
    layers = tuple(i if i >= 0 else n + 1 + i for i in chosen)
    return FeaturePath(model_type, family, layers, strategy, False, text_hidden, extra)


# -- the projectors ---------------------------------------------------------------------------------------
class PaliGemmaProjector(nn.Module):
    def __init__(self, vision_hidden: int, out: int):
        super().__init__()
        self.linear = nn.Linear(vision_hidden, out, bias=True)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


_ACTS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


class LlavaProjector(nn.Module):
    def __init__(self, in_features: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        if act not in _ACTS:
            raise ConfigError(f"projector_hidden_act {act!r} is not one we implement", "projector_hidden_act", None)
        self.act_name = act
        self.linear_1 = nn.Linear(in_features, text_hidden, bias=bias)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(_ACTS[self.act_name](self.linear_1(image_features)))


class Gemma3RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by ``1 + weight`` (the weight is stored zero-centred)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Gemma3Projector(nn.Module):
    """Average-pool the patch grid to ``mm_tokens_per_image`` tokens, RMSNorm, project (weight stored
    ``[vision_hidden, text_hidden]``, applied as ``x @ W``: not an ``nn.Linear`` layout)."""

    def __init__(self, vision: SiglipVisionConfig, text_hidden: int, tokens: int):
        super().__init__()
        side = math.isqrt(tokens)
        if side * side != tokens or vision.grid_size % side:
            raise ConfigError(
                f"mm_tokens_per_image {tokens} is not a square that divides the {vision.grid_size}² patch grid",
                "mm_tokens_per_image",
                None,
            )
        self.grid, self.kernel = vision.grid_size, vision.grid_size // side
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision.hidden_size, text_hidden))
        self.mm_soft_emb_norm = Gemma3RMSNorm(vision.hidden_size, vision.layer_norm_eps)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        B, _, D = image_features.shape
        grid = image_features.transpose(1, 2).reshape(B, D, self.grid, self.grid).contiguous()
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        normed = self.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, self.mm_input_projection_weight).type_as(image_features)


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Idefics3's space-to-depth: ``[B, N, D]`` → ``[B, N / s², D·s²]``, each ``s × s`` block of the
    square patch grid concatenated (row of blocks first, then within a block column-major, as transformers)."""
    B, N, D = x.shape
    side = math.isqrt(N)
    x = x.view(B, side, side // scale, D * scale).permute(0, 2, 1, 3)
    x = x.reshape(B, side // scale, side // scale, D * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(B, N // (scale * scale), D * scale * scale)


class _Idefics3Projection(nn.Module):
    def __init__(self, in_features: int, text_hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_features, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Idefics3Connector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, scale: int):
        super().__init__()
        self.scale_factor = scale
        self.modality_projection = _Idefics3Projection(vision_hidden * scale * scale, text_hidden)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(pixel_shuffle(image_features, self.scale_factor))


def bucketed_position_ids(side: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """transformers 4.57's Idefics3/SmolVLM position ids for a full ``side × side`` patch grid: each patch's
    fractional coordinate ``i / side · (1 − 1e-6)``, in the pixels' dtype, bucketed against ``k / side``. Float
    rounding puts some patches in the bucket before their own, so these are not 0…N−1."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    coords = torch.arange(side, device=device, dtype=dtype) / side * (1 - 1e-6)
    bucket = torch.bucketize(coords, boundaries, right=True)
    return (bucket[:, None] * side + bucket).flatten()


def build_projector(path: FeaturePath, vision: SiglipVisionConfig, shapes: Mapping[str, tuple[int, ...]]) -> nn.Module:
    """The family's projector at the checkpoint's shapes (``shapes``: its ``multi_modal_projector.…`` keys,
    prefix stripped), on the current default device."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(
                f"the {path.model_type} projector needs multi_modal_projector.{key}, which the checkpoint lacks",
                f"multi_modal_projector.{key}",
                "convert with --with-projector, or judge the tower alone (without --image-features)",
            )
        return tuple(shapes[key])

    d = vision.hidden_size
    if path.family == "paligemma":
        return PaliGemmaProjector(d, shape("linear.weight")[0])
    if path.family == "llava":
        out, in_features = shape("linear_1.weight")
        return LlavaProjector(in_features, out, path.extra["projector_hidden_act"], "linear_1.bias" in shapes)
    if path.family == "gemma3":
        text = shape("mm_input_projection_weight")[1]
        return Gemma3Projector(vision, text, int(path.extra["mm_tokens_per_image"]))
    if path.family == "idefics3":
        return Idefics3Connector(d, shape("modality_projection.proj.weight")[0], int(path.extra["scale_factor"]))
    raise AssertionError(path.family)


class SiglipImageFeatures(nn.Module):
    """Our tower plus the VLM's feature selection and projector: ``forward(pixel_values)`` returns the image
    features ``[B, tokens, text_hidden]`` the language model receives."""

    def __init__(
        self,
        vision: SiglipVisionConfig,
        path: FeaturePath,
        shapes: Mapping[str, tuple[int, ...]],
        attn_implementation: AttnImplementation = "sdpa",
    ):
        super().__init__()
        self.config, self.path = vision, path
        self.vision_model = SiglipVisionTransformer(vision, attn_implementation)
        self.multi_modal_projector = build_projector(path, vision, shapes)

    @classmethod
    def from_state_dict(
        cls,
        vision: SiglipVisionConfig,
        path: FeaturePath,
        state_dict: Mapping[str, torch.Tensor],
        *,
        attn_implementation: AttnImplementation = "sdpa",
    ) -> SiglipImageFeatures:
        """Built on meta around ``state_dict`` (canonical ``vision_model.…`` and ``multi_modal_projector.…``
        keys; tensors shared, not copied). Every key and shape is checked."""
        shapes = {
            k[len("multi_modal_projector.") :]: tuple(v.shape)
            for k, v in state_dict.items()
            if k.startswith("multi_modal_projector.")
        }
        with torch.device("meta"):
            model = cls(vision, path, shapes, attn_implementation)
        tower = model.vision_model
        # The head and the layers past the deepest selected one never reach the features: they may be absent,
        # and are then dropped (nothing can run them by accident).
        layers = tower.encoder.layers
        if not any(k.startswith(f"vision_model.encoder.layers.{path.last_layer + 1}.") for k in state_dict):
            del layers[path.last_layer + 1 :]
        if tower.head is not None and "vision_model.head.probe" not in state_dict:
            tower.head = None
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        given = {k: tuple(v.shape) for k, v in state_dict.items()}
        missing = sorted(set(want) - set(given))
        unexpected = sorted(set(given) - set(want))
        wrong = sorted(k for k in want if k in given and given[k] != want[k])
        if missing or unexpected or wrong:
            detail = f"missing {missing[:4]}" if missing else f"unexpected {unexpected[:4]}" if unexpected else ""
            detail = detail or "; ".join(f"{k}: {given[k]} vs {want[k]}" for k in wrong[:3])
            raise CheckpointError(f"image-features weights do not fit the model: {detail}", "state_dict", None)
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        for name, buf in model.named_buffers():
            assert not buf.is_meta, f"buffer {name} left on meta"
        return model.eval()

    # Which transformers' arithmetic to reproduce where versions differ: "5", or "4.57", whose Idefics3/SmolVLM tower
    # buckets its position ids (`bucketed_position_ids`) where 5.x uses 0…N−1 for a full-size image.
    arithmetic: str = "5"

    def set_arithmetic(self, arithmetic: str) -> SiglipImageFeatures:
        if arithmetic not in ("5", "4.57"):
            raise ConfigError(f"unknown arithmetic {arithmetic!r}", "arithmetic", 'use "5" or "4.57"')
        self.arithmetic = arithmetic
        return self

    def vision_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The hidden state the VLM selects (the projector's input)."""
        tower, path = self.vision_model, self.path
        tower.check_pixel_values(pixel_values, False)
        ids = None
        if path.family == "idefics3" and self.arithmetic == "4.57":
            ids = bucketed_position_ids(self.config.grid_size, pixel_values.dtype, pixel_values.device)
        hidden = tower.embeddings(pixel_values, position_ids=ids)
        states = [hidden]
        for layer in tower.encoder.layers[: path.last_layer + 1]:
            hidden = layer(hidden)
            states.append(hidden)
        chosen = [tower.post_layernorm(states[i]) if path.post_layernorm else states[i] for i in path.layers]
        if path.strategy == "default":
            chosen = [s[:, 1:] for s in chosen]
        return chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_feature(pixel_values))
