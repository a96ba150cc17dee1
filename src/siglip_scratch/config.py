"""`SiglipVisionConfig`: Hugging Face's field names and defaults, frozen, validated.

`from_dict` reads every config shape the hub uses for a SigLIP vision tower:

- a `SiglipVisionConfig` (``model_type: siglip_vision_model``), flat;
- a full `SiglipConfig` (``model_type: siglip``) whose ``vision_config`` often holds only
  ``patch_size`` -- the defaults below are load-bearing, they are what the hub relies on;
- a VLM config with a ``vision_config`` (PaliGemma, Gemma 3, LLaVA, LLaVA-NeXT, LLaVA-OneVision): that
  ``vision_config``, read with the same defaults transformers uses (``vision_use_head`` absent means a
  head, as transformers reads it).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import read_json

__all__ = [
    "NAFLEX_PRESETS",
    "PRESETS",
    "SIGLIP2_PRESETS",
    "SUPPORTED_ACTIVATIONS",
    "TINY_CONFIG",
    "AnyVisionConfig",
    "Siglip2VisionConfig",
    "SiglipVisionConfig",
    "get_preset",
    "load_config",
    "siglip_generation",
]

# hidden_act values we implement, and what transformers maps them to.
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")

_INT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
)
_FLOAT_FIELDS = ("layer_norm_eps", "attention_dropout")


def _validate(cfg: Any, int_fields: tuple[str, ...]) -> None:
    """The checks both configs share; floats are normalised to float in place (frozen dataclasses)."""
    for name in int_fields:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field {name} must be an integer, got {value!r}", name, "fix the config value")
        if value < 1:
            raise ConfigError(f"config field {name} must be >= 1, got {value}", name, "fix the config value")
    for name in _FLOAT_FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field {name} must be a number, got {value!r}", name, "fix the config value")
        object.__setattr__(cfg, name, float(value))
    if not isinstance(cfg.vision_use_head, bool):
        raise ConfigError(
            f"config field vision_use_head must be true or false, got {cfg.vision_use_head!r}",
            "vision_use_head",
            "fix the config value",
        )
    if not isinstance(cfg.hidden_act, str) or cfg.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"unsupported hidden_act {cfg.hidden_act!r}", "hidden_act", f"use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}",
            "hidden_size/num_attention_heads",
            "pick a head count that divides the hidden size",
        )
    if not (0.0 <= cfg.attention_dropout < 1.0):
        raise ConfigError(
            f"attention_dropout must be in [0, 1), got {cfg.attention_dropout}", "attention_dropout", None
        )
    if not (cfg.layer_norm_eps > 0.0 and math.isfinite(cfg.layer_norm_eps)):
        raise ConfigError(f"layer_norm_eps must be > 0, got {cfg.layer_norm_eps}", "layer_norm_eps", None)


# VLMs whose SigLIP-shaped tower has no MAP head in transformers (the tower class defines none).
NO_HEAD_TOWERS = ("idefics3", "smolvlm")


class _ConfigFile:
    """What both configs do with files: read a config.json, write a complete one, copy with changes.
    Subclasses set ``_ARCHITECTURE`` and ``_MODEL_TYPE`` (what transformers' class of the same name expects)."""

    _ARCHITECTURE = ""
    _MODEL_TYPE = ""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Any:
        """Read ``config.json`` from a folder, or a config JSON file given directly."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        data = read_json(
            file, what="config.json", error=ConfigError, missing_fix="pass a model folder or a config JSON file"
        )
        return cls.from_dict(data, source=str(file))  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """A complete ``config.json`` for the matching transformers class (4.57 and 5.x read it)."""
        out: dict[str, Any] = {"architectures": [self._ARCHITECTURE], "model_type": self._MODEL_TYPE}
        out.update(dataclasses.asdict(self))  # type: ignore[call-overload]
        return out

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        file = Path(folder) / "config.json"
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return file

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class SiglipVisionConfig(_ConfigFile):
    """The SigLIP vision tower's shape. Field names and defaults are Hugging Face's."""

    _ARCHITECTURE = "SiglipVisionModel"
    _MODEL_TYPE = "siglip_vision_model"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True

    def __post_init__(self) -> None:
        _validate(self, _INT_FIELDS)
        if self.image_size < self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is smaller than patch_size {self.patch_size}",
                "image_size/patch_size",
                "the image must hold at least one patch",
            )

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the position table."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    # -- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> SiglipVisionConfig:
        """Read a SiglipVisionConfig, a SiglipConfig or a PaliGemma config dict.

        Keys that do not shape the vision tower are ignored; a vision key of the wrong type
        raises `ConfigError` naming the key.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}", source, None)
        model_type = data.get("model_type")
        vision_type = (
            data.get("vision_config", {}).get("model_type") if isinstance(data.get("vision_config"), dict) else None
        )
        if model_type in ("siglip2", "siglip2_vision_model") or vision_type == "siglip2_vision_model":
            raise ConfigError(
                f"this is SigLIP 2 NaFlex (model_type {model_type}): a linear patch embedding over flattened "
                "patches and a position grid resized per image, not the fixed-resolution tower",
                source,
                "load it with Siglip2VisionModel / Siglip2VisionConfig (or load_config, which picks the class)",
            )
        if model_type == "siglip_text_model":
            raise ConfigError("this is a SigLIP text-tower config, not a vision config", source, None)
        if "vision_config" in data:
            vision = data["vision_config"]
            if vision is None:
                vision = {}
            if not isinstance(vision, dict):
                raise ConfigError("vision_config must be a JSON object", f"{source}: vision_config", None)
            if model_type in NO_HEAD_TOWERS:
                # Their tower class has no MAP head at all (no config field for it).
                vision = {**vision, "vision_use_head": False}
            where = f"{source}: vision_config"
        else:
            vision = data
            where = source
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in vision:
                continue
            value = vision[f.name]
            if f.name in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ConfigError(
                        f"{f.name} {value!r} is not square", f"{where}: {f.name}", "only square sizes are supported"
                    )
                value = value[0]
            values[f.name] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(exc.what, f"{where}: {exc.where}", exc.fix) from None


@dataclass(frozen=True)
class Siglip2VisionConfig(_ConfigFile):
    """The SigLIP 2 NaFlex vision tower's shape (``transformers.Siglip2VisionConfig``'s names and defaults).

    ``num_patches`` is the size of the learned position table (a square grid, 256 = 16x16); each image's
    grid of patches (``spatial_shapes``) gets that table resized to it. There is no ``image_size``: the
    processor picks each image's size to fit ``max_num_patches``.
    """

    _ARCHITECTURE = "Siglip2VisionModel"
    _MODEL_TYPE = "siglip2_vision_model"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True
    num_patches: int = 256

    def __post_init__(self) -> None:
        _validate(self, (*(f for f in _INT_FIELDS if f != "image_size"), "num_patches"))
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ConfigError(
                f"num_patches {self.num_patches} is not a square (the position table is a square grid)",
                "num_patches",
                "use 256, 576, 1024, …",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_grid(self) -> int:
        """Side of the learned position table."""
        return math.isqrt(self.num_patches)

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch (``num_channels * patch_size**2``): the patch embedding's input."""
        return self.num_channels * self.patch_size**2

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Siglip2VisionConfig:
        """Read a ``Siglip2VisionConfig`` (flat) or a ``Siglip2Config`` (its ``vision_config``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}", source, None)
        if siglip_generation(data) != "siglip2-naflex":
            raise ConfigError(
                f"this is not a SigLIP 2 NaFlex config (model_type {data.get('model_type')!r})",
                source,
                "load fixed-resolution SigLIP / SigLIP 2 with SiglipVisionModel (or load_config, which picks the class)",
            )
        vision, where = data, source
        if isinstance(data.get("vision_config"), dict):
            vision, where = data["vision_config"], f"{source}: vision_config"
        values = {f.name: vision[f.name] for f in fields(cls) if f.name in vision}
        if isinstance(values.get("patch_size"), (list, tuple)):
            ps = values["patch_size"]
            if len(ps) != 2 or ps[0] != ps[1]:
                raise ConfigError(f"patch_size {ps!r} is not square", f"{where}: patch_size", None)
            values["patch_size"] = ps[0]
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(exc.what, f"{where}: {exc.where}", exc.fix) from None


AnyVisionConfig = SiglipVisionConfig | Siglip2VisionConfig


def load_config(data: dict[str, Any], *, source: str = "config") -> AnyVisionConfig:
    """The right config class for a config.json dict: SigLIP 2 NaFlex, or the fixed-resolution tower."""
    if siglip_generation(data) == "siglip2-naflex":
        return Siglip2VisionConfig.from_dict(data, source=source)
    return SiglipVisionConfig.from_dict(data, source=source)


def _base(image_size: int, **kw: Any) -> SiglipVisionConfig:
    return SiglipVisionConfig(image_size=image_size, **kw)


_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)

# Keyed by exact hub id; values from the public config.json files.
PRESETS: dict[str, SiglipVisionConfig] = {
    "google/siglip-base-patch16-224": _base(224),
    "google/siglip-base-patch16-256": _base(256),
    "google/siglip-base-patch16-384": _base(384),
    "google/siglip-base-patch16-512": _base(512),
    "google/siglip-base-patch16-256-multilingual": _base(256),
    "google/siglip-large-patch16-256": _base(256, **_LARGE),
    "google/siglip-large-patch16-384": _base(384, **_LARGE),
    "google/siglip-so400m-patch14-224": _base(224, patch_size=14, **_SO400M),
    "google/siglip-so400m-patch14-384": _base(384, patch_size=14, **_SO400M),
    "google/siglip-so400m-patch16-256-i18n": _base(256, patch_size=16, **_SO400M),
    "google/paligemma-3b-pt-224": _base(224, patch_size=14, vision_use_head=False, **_SO400M),
    "google/paligemma-3b-pt-448": _base(448, patch_size=14, vision_use_head=False, **_SO400M),
    "google/paligemma-3b-pt-896": _base(896, patch_size=14, vision_use_head=False, **_SO400M),
    "google/gemma-3-4b-it": _base(896, patch_size=14, vision_use_head=False, **_SO400M),
    # SmolVLM-256M: a base-512 tower (Idefics3's tower class has no head).
    "HuggingFaceTB/SmolVLM-256M-Instruct": _base(
        512,
        patch_size=16,
        vision_use_head=False,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
    ),
    # LLaVA-OneVision's so400m-384 tower has its last layer deleted (26 of 27) and no head.
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": _base(
        384, patch_size=14, vision_use_head=False, **{**_SO400M, "num_hidden_layers": 26}
    ),
}

# SigLIP 2, fixed resolution: the SigLIP architecture (model_type "siglip", a conv patch embedding and a
# fixed position table), so it runs on this encoder. What differs is the training and the preprocessing:
# these checkpoints resize bilinear, not bicubic (their preprocessor_config.json says resample 2).
_GIANT_OPT = dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16)
SIGLIP2_PRESETS: dict[str, SiglipVisionConfig] = {
    **{f"google/siglip2-base-patch16-{s}": _base(s) for s in (224, 256, 384, 512)},
    **{f"google/siglip2-large-patch16-{s}": _base(s, **_LARGE) for s in (256, 384, 512)},
    **{f"google/siglip2-so400m-patch14-{s}": _base(s, patch_size=14, **_SO400M) for s in (224, 384)},
    **{f"google/siglip2-so400m-patch16-{s}": _base(s, patch_size=16, **_SO400M) for s in (256, 384, 512)},
    **{f"google/siglip2-giant-opt-patch16-{s}": _base(s, patch_size=16, **_GIANT_OPT) for s in (256, 384)},
}
PRESETS.update(SIGLIP2_PRESETS)

# SigLIP 2 NaFlex: a 16x16 learned position grid, resized per image; patch 16.
NAFLEX_PRESETS: dict[str, Siglip2VisionConfig] = {
    "google/siglip2-base-patch16-naflex": Siglip2VisionConfig(),
    "google/siglip2-so400m-patch16-naflex": Siglip2VisionConfig(**_SO400M),
}

# The text tower's vocabulary tells the generations apart when a config.json has one: SigLIP 2 uses
# Gemma's tokenizer (256000), SigLIP English 32000 and multilingual/i18n 250000.
SIGLIP2_VOCAB_SIZE = 256000


def siglip_generation(data: Any) -> str | None:
    """``"siglip2"``, ``"siglip2-naflex"``, ``"siglip"`` or None (cannot tell) for a config.json dict.

    From the config, never from a path: the model type (NaFlex), the text vocabulary (SigLIP 2 uses Gemma's
    256000 tokens), or a known hub id in ``_name_or_path`` (4.x writes it). A vision-only config with none
    of these is None: the two fixed-resolution generations have identical vision configs.
    """
    if not isinstance(data, dict):
        return None
    vision = data.get("vision_config") if isinstance(data.get("vision_config"), dict) else {}
    if (
        data.get("model_type") in ("siglip2", "siglip2_vision_model")
        or vision.get("model_type") == "siglip2_vision_model"
    ):
        return "siglip2-naflex"
    text = data.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return "siglip2" if text["vocab_size"] == SIGLIP2_VOCAB_SIZE else "siglip"
    name = data.get("_name_or_path")
    if isinstance(name, str):
        if name in SIGLIP2_PRESETS:
            return "siglip2"
        if name in PRESETS:
            return "siglip"
    return None


# Structure-true but tiny (2 layers, 4 heads, a 4x4 grid): what tests and smoke runs build in
# milliseconds. Not a checkpoint; kept out of PRESETS, which are keyed by hub ids.
TINY_CONFIG = SiglipVisionConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)


def get_preset(hub_id: str) -> AnyVisionConfig:
    """The config of a known hub checkpoint, by exact id (a `Siglip2VisionConfig` for the NaFlex ones)."""
    if hub_id in NAFLEX_PRESETS:
        return NAFLEX_PRESETS[hub_id]
    try:
        return PRESETS[hub_id]
    except KeyError:
        known = sorted([*PRESETS, *NAFLEX_PRESETS])
        close = difflib.get_close_matches(str(hub_id), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown preset {hub_id!r}", "preset", f"{hint}use one of: {', '.join(known)}") from None
