"""`SiglipVisionModel`: the encoder with loading, saving and synthetic weights.

Loading never initialises weights that are about to be overwritten: the module tree is built on
the meta device, the checkpoint's tensors are checked (every key, every shape) and then assigned.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import check_state_shapes, index_checkpoint, load_tensors, map_vision_keys
from .config import Siglip2VisionConfig, SiglipVisionConfig, load_config
from .errors import ConfigError, InputError, SourceError
from .files import read_json
from .model import (
    ATTN_IMPLEMENTATIONS,
    AttnImplementation,
    SiglipAttention,
    SiglipVisionModelOutput,
    SiglipVisionTransformer,
    _PoolingAttention,
)
from .naflex import Arithmetic, Siglip2VisionTransformer

__all__ = [
    "REGIMES",
    "TRAINED_REGIME",
    "Siglip2VisionModel",
    "SiglipVisionModel",
    "expected_shapes",
    "load_vision_state_dict",
    "model_class_for",
    "synthetic_state_dict",
]

SAFETENSORS_METADATA = {"format": "pt"}


def _check_attn(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise InputError(
            f"unknown attn_implementation {name!r}", "attn_implementation", f"use one of {ATTN_IMPLEMENTATIONS}"
        )


class _VisionTower(nn.Module):
    """What both towers share: the hub's ``vision_model`` wrapper, construction on meta, strict loading,
    synthetic weights and saving. Subclasses set ``config_class`` and build ``self.vision_model``."""

    config_class: type = SiglipVisionConfig

    @property
    def attn_implementation(self) -> str:
        return next(m.attn_implementation for m in self.modules() if isinstance(m, SiglipAttention))

    def set_attn_implementation(self, name: AttnImplementation) -> _VisionTower:
        _check_attn(name)
        for m in self.modules():
            if isinstance(m, SiglipAttention):
                m.attn_implementation = name
        return self

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def _empty(cls, config: Any, attn_implementation: AttnImplementation) -> _VisionTower:
        with torch.device("meta"):
            return cls(config, attn_implementation)

    @classmethod
    def from_state_dict(
        cls,
        config: Any,
        state_dict: Mapping[str, torch.Tensor],
        *,
        attn_implementation: AttnImplementation = "sdpa",
        source: str = "state_dict",
    ) -> _VisionTower:
        """Build the model around the given tensors (shared, not copied). Keys may be in any layout
        `map_vision_keys` knows; every key and shape is checked first."""
        _check_config(cls, config)
        mapping, _dropped, unmatched = map_vision_keys(state_dict)
        found = {k: tuple(state_dict[src].shape) for k, src in mapping.items()}
        found.update({k: tuple(state_dict[k].shape) for k in unmatched})
        check_state_shapes(expected_shapes(config), found, source)
        model = cls._empty(config, attn_implementation)
        model.load_state_dict({k: state_dict[src] for k, src in mapping.items()}, strict=True, assign=True)
        return model.eval()

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: AttnImplementation = "sdpa",
        regime: str = "iid",
    ) -> _VisionTower:
        """Deterministic synthetic weights where every parameter matters (see `synthetic_state_dict`;
        ``regime="trained"`` gives activations with a trained tower's statistics)."""
        state = synthetic_state_dict(config, seed=seed, dtype=dtype, device=device, regime=regime)
        return cls.from_state_dict(config, state, attn_implementation=attn_implementation, source=f"seed {seed}")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        attn_implementation: AttnImplementation = "sdpa",
        config: Any = None,
        revision: str | None = None,
    ) -> _VisionTower:
        """Load a checkpoint strictly.

        Args:
            path: a folder with ``config.json`` and ``model.safetensors`` (or a sharded index), a
                ``.safetensors`` file with ``config.json`` beside it, or a hub repo id (resolved
                through huggingface_hub and its cache; ``HF_HUB_OFFLINE=1`` is honoured).
                Full SiglipModel / Siglip2Model and VLM checkpoints work: other towers are ignored.
            dtype: cast floating tensors to this dtype (default: keep the file's).
            config: use this config instead of the checkpoint's ``config.json``.
        Raises:
            CheckpointError: keys missing or unexpected, or shapes wrong (sorted lists attached).
        """
        config, tensors, source = load_vision_state_dict(
            path, config=config, revision=revision, config_class=cls.config_class
        )
        if dtype is not None:
            tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
        model = cls.from_state_dict(config, tensors, attn_implementation=attn_implementation, source=source)
        return model.to(device)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (``vision_model.`` keys, metadata
        ``{"format": "pt"}``, the tensor data 64-byte aligned as the converter writes it, so a reloaded model computes
        what this one does, batch 1 included). Files are written to temporaries and renamed into place."""
        from .checkpoint import save_safetensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        config_text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        for name, write in (
            ("model.safetensors", lambda p: save_safetensors(state, p, SAFETENSORS_METADATA)),
            ("config.json", lambda p: Path(p).write_text(config_text, encoding="utf-8")),
        ):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, folder / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return folder


class SiglipVisionModel(_VisionTower):
    """SigLIP vision tower with the hub's module layout (``vision_model.…``).

    ``forward(pixel_values)`` returns `SiglipVisionModelOutput` with ``last_hidden_state`` [B, N, D],
    ``pooler_output`` [B, D] (None without the MAP head) and, on request, ``hidden_states``:
    the embeddings and each layer's output, before ``post_layernorm``.
    """

    config_class = SiglipVisionConfig

    def __init__(self, config: SiglipVisionConfig, attn_implementation: AttnImplementation = "sdpa"):
        super().__init__()
        _check_attn(attn_implementation)
        _check_config(type(self), config)
        self.config = config
        self.vision_model = SiglipVisionTransformer(config, attn_implementation)
        if not _on_meta(self):
            _init_unset_parameters(self)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> SiglipVisionModelOutput:
        return self.vision_model(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
        )


class Siglip2VisionModel(_VisionTower):
    """SigLIP 2 NaFlex vision tower with the hub's module layout (``vision_model.…``), mirroring
    ``transformers.Siglip2VisionModel``. ``forward(pixel_values, pixel_attention_mask, spatial_shapes)``
    takes what `Siglip2ImageProcessor` produces; ``arithmetic`` ("5" or "4.57") picks which transformers'
    floating-point operations it reproduces bit for bit (see `naflex.py`)."""

    config_class = Siglip2VisionConfig

    def __init__(
        self,
        config: Siglip2VisionConfig,
        attn_implementation: AttnImplementation = "sdpa",
        arithmetic: Arithmetic = "5",
    ):
        super().__init__()
        _check_attn(attn_implementation)
        _check_config(type(self), config)
        self.config = config
        self.vision_model = Siglip2VisionTransformer(config, attn_implementation)
        self.set_arithmetic(arithmetic)
        if not _on_meta(self):
            _init_unset_parameters(self)

    @property
    def arithmetic(self) -> str:
        return self.vision_model.arithmetic

    def set_arithmetic(self, arithmetic: Arithmetic) -> Siglip2VisionModel:
        self.vision_model.set_arithmetic(arithmetic)
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        output_hidden_states: bool = False,
    ) -> SiglipVisionModelOutput:
        return self.vision_model(pixel_values, pixel_attention_mask, spatial_shapes, output_hidden_states)


def _check_config(cls: type, config: Any) -> None:
    if not isinstance(config, cls.config_class):
        other = "Siglip2VisionModel" if isinstance(config, Siglip2VisionConfig) else "SiglipVisionModel"
        raise InputError(
            f"{cls.__name__} takes a {cls.config_class.__name__}, got {type(config).__name__}",
            "config",
            f"use {other} for this config (load_config picks the config class from a config.json)",
        )


def model_class_for(config: Any) -> type[_VisionTower]:
    """The tower class for a config: `Siglip2VisionModel` for NaFlex, else `SiglipVisionModel`."""
    return Siglip2VisionModel if isinstance(config, Siglip2VisionConfig) else SiglipVisionModel


def load_vision_state_dict(
    path: str | os.PathLike[str],
    *,
    config: Any = None,
    revision: str | None = None,
    config_class: type | None = SiglipVisionConfig,
) -> tuple[Any, dict[str, torch.Tensor], str]:
    """Read a checkpoint's vision tower strictly, without building a model.

    Returns:
        (config, tensors under canonical ``vision_model.`` keys, the weights path as a string).
        Only vision tensors are read; every key and shape is checked against the config first.
    """
    folder, weights = _resolve(path, revision)
    if config is None and config_class is None:  # whichever tower the config.json describes
        file = folder / "config.json"
        config = load_config(
            read_json(file, what="config.json", error=ConfigError, missing_fix="pass a model folder"), source=str(file)
        )
    elif config is None:
        config = config_class.from_pretrained(folder)
    infos = index_checkpoint(weights, vision_only=True)
    mapping, _dropped, unmatched = map_vision_keys(infos)
    found = {k: infos[src].shape for k, src in mapping.items()}
    found.update({k: infos[k].shape for k in unmatched})
    check_state_shapes(expected_shapes(config), found, str(weights))
    return config, load_tensors({k: infos[src] for k, src in mapping.items()}), str(weights)


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _init_unset_parameters(model: nn.Module) -> None:
    # nn.Linear/LayerNorm/Conv2d/Embedding initialise themselves; the two raw Parameters do not.
    for m in model.modules():
        if isinstance(m, _PoolingAttention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
        elif hasattr(m, "probe"):
            nn.init.normal_(m.probe)


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model for ``config`` and its shape (computed once per config, on meta)."""
    return dict(_expected_shapes(config))


@functools.lru_cache(maxsize=64)
def _expected_shapes(config: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = model_class_for(config)(config)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def synthetic_state_dict(
    config: Any,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    regime: str = "iid",
) -> dict[str, torch.Tensor]:
    """Deterministic weights at the real shapes, for tests and offline parity.

    Drawn with numpy's PCG64 (a stream stable across numpy and torch versions) in module order, in
    float32, then cast. Every parameter matters: biases are non-zero and LayerNorm scales are
    ``1 + 0.1·N(0,1)``; matrices are ``N(0, 1/fan_in)`` so activations stay O(1) through 27 layers.

    ``regime="trained"`` then reshapes them into a trained tower's regime (see `TRAINED_REGIME`): a few
    massive residual-stream activations, sharp attention, LayerNorm gains with outliers, growing layers.
    ``"iid"`` (the default here) is the plain draw.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}: use one of {', '.join(REGIMES)}")
    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.device("meta"):
        model = model_class_for(config)(config)

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        return torch.from_numpy(x + np.float32(mean) if mean else x)

    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for p_name, p in module.named_parameters(recurse=False):
            shape = tuple(p.shape)
            if isinstance(module, nn.LayerNorm):
                t = normal(shape, 0.1, 1.0) if p_name == "weight" else normal(shape, 0.05)
            elif p_name.endswith("bias"):
                t = normal(shape, 0.02)
            elif isinstance(module, nn.Embedding):
                t = normal(shape, shape[1] ** -0.5)
            elif p_name == "probe":
                t = normal(shape, 1.0)
            else:  # Linear, Conv2d, the head's packed in_proj_weight: fan_in is everything but dim 0
                t = normal(shape, int(np.prod(shape[1:])) ** -0.5)
            out[prefix + p_name] = t
    if regime == "trained":
        _trained_regime(out, config, rng)
    return {k: t.to(device=device, dtype=dtype) for k, t in out.items()}


REGIMES = ("iid", "trained")
# What `regime="trained"` imposes, from published analyses of trained ViT / SigLIP activations (docs/PARITY.md,
# "Synthetic weights in a trained model's regime"): residual-stream entries of a few hundred in two fixed channels
# at two fixed tokens (massive activations, Sun et al. 2024, their ViT and CLIP figures; high-norm tokens, Darcet
# et al. 2024), q and k scaled so attention logits reach the tens (trained SigLIP towers: max logits 30–45),
# LayerNorm gains that damp the massive channels and amplify a few others, and layers whose updates grow with depth.
TRAINED_REGIME = {
    "massive_value": 300.0,  # |x| of the planted residual-stream entries (hundreds, as measured in trained towers)
    "massive_count": 2,  # (token, channel) pairs
    "qk_scale": 2.4,  # each of q and k: logits ×5.8, from ~5 to 30–45
    "damped_gain": 0.05,  # LayerNorm gain on the massive channels
    "outlier_gain": 6.0,  # LayerNorm gain on a few other channels
    "outlier_count": 4,
    "growth": 1.0,  # layer i's out_proj and fc2 scaled by 1 + growth·i/L
}


def _trained_regime(state: dict[str, torch.Tensor], config: Any, rng: np.random.Generator) -> None:
    """Reshape an i.i.d. draw in place into a trained tower's regime (see `TRAINED_REGIME`)."""
    r = TRAINED_REGIME
    d, layers = config.hidden_size, config.num_hidden_layers
    pos = state["vision_model.embeddings.position_embedding.weight"]  # [N, D]
    n_massive, n_outlier = int(r["massive_count"]), int(r["outlier_count"])
    channels = rng.choice(d, n_massive + n_outlier, replace=False)
    massive, outliers = channels[:n_massive], channels[n_massive:]
    tokens = rng.choice(pos.shape[0], n_massive, replace=False)
    for i, (t, c) in enumerate(zip(tokens, massive, strict=True)):
        pos[int(t), int(c)] = r["massive_value"] * (1 if i % 2 == 0 else -1)
    for key, t in state.items():
        if key.endswith(("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight", "head.layernorm.weight")):
            t[torch.from_numpy(massive)] = r["damped_gain"]
            t[torch.from_numpy(outliers)] *= r["outlier_gain"]
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj"):
            state[f"{p}self_attn.{name}.weight"] *= r["qk_scale"]
            state[f"{p}self_attn.{name}.bias"] *= r["qk_scale"]
        grow = 1.0 + r["growth"] * i / max(layers - 1, 1)
        for name in ("self_attn.out_proj", "mlp.fc2"):
            state[f"{p}{name}.weight"] *= grow


def _resolve(path: str | os.PathLike[str], revision: str | None) -> tuple[Path, Path]:
    """(folder holding config.json, weights file or folder) for a local path or hub id."""
    p = Path(path)
    if p.is_dir():
        return p, p
    if p.is_file():
        if p.suffix != ".safetensors" and not p.name.endswith(".index.json"):
            raise SourceError(
                "expected a .safetensors file or a model folder",
                str(p),
                "convert other formats with siglip-convert first",
            )
        return p.parent, p
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/")) and not os.path.exists(text):
        from .hub import download_vision_checkpoint

        folder = download_vision_checkpoint(text, revision=revision)
        return folder, folder
    raise SourceError("no such file or folder", text, "pass a model folder, a .safetensors file or a hub repo id")
