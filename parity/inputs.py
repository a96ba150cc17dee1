"""What a comparison feeds both models: a pixel tensor (fixed-resolution SigLIP) or NaFlex inputs.

SigLIP 2 NaFlex takes three tensors (flattened patches, which rows are real, each image's patch grid),
and its [B, N, D] site outputs carry padding rows that mean nothing: every measurement takes the real
rows only (`select`), so a candidate may write anything into padding, but padding that leaks into a
real row (an attention that ignores the mask) changes real rows and fails.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from siglip_scratch.config import AnyVisionConfig, Siglip2VisionConfig
from siglip_scratch.errors import InputError
from siglip_scratch.processor import Siglip2ImageProcessor, SiglipImageProcessor

__all__ = [
    "ModelInputs",
    "NaflexInputs",
    "call",
    "default_processor",
    "forward_candidate",
    "make_pixels",
    "naflex_images",
    "naflex_inputs",
    "select",
]

# Aspect ratios (height, width) of the seeded images a NaFlex comparison uses when none are given: wide,
# tall, small, square, very wide; a batch of b takes the first b (cycling).
NAFLEX_SIZES = ((180, 320), (300, 120), (40, 56), (224, 224), (60, 400), (333, 250))


@dataclass
class NaflexInputs:
    pixel_values: torch.Tensor  # [B, N, C·p·p]
    pixel_attention_mask: torch.Tensor  # [B, N], 1 = a real patch
    spatial_shapes: torch.Tensor  # [B, 2] patch rows, columns

    @classmethod
    def from_processor(cls, out: dict[str, torch.Tensor]) -> NaflexInputs:
        return cls(out["pixel_values"], out["pixel_attention_mask"], out["spatial_shapes"])

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.pixel_values,
            "pixel_attention_mask": self.pixel_attention_mask,
            "spatial_shapes": self.spatial_shapes,
        }

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> NaflexInputs:
        return NaflexInputs(
            self.pixel_values.to(device=device, dtype=dtype),
            self.pixel_attention_mask.to(device=device),
            self.spatial_shapes.to(device=device),
        )

    @property
    def shape(self) -> torch.Size:
        return self.pixel_values.shape

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The real rows of a [B, N, …] site tensor, as [rows, …]; other tensors (the pooled head) as they are."""
        B, N = self.pixel_attention_mask.shape
        if t.dim() >= 3 and tuple(t.shape[:2]) == (B, N):
            return t[self.pixel_attention_mask.to(t.device).bool()]
        return t


ModelInputs = torch.Tensor | NaflexInputs


def call(model: Any, inputs: ModelInputs) -> Any:
    """Run a model on the comparison's inputs (keyword arguments for NaFlex, as transformers takes them)."""
    return model(**inputs.kwargs()) if isinstance(inputs, NaflexInputs) else model(inputs)


def select(inputs: ModelInputs, t: torch.Tensor) -> torch.Tensor:
    return inputs.select(t) if isinstance(inputs, NaflexInputs) else t


def naflex_images(batch: int, seed: int) -> list[Image.Image]:
    """``batch`` seeded RGB images of different aspect ratios (see `NAFLEX_SIZES`)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*NAFLEX_SIZES[i % len(NAFLEX_SIZES)], 3), dtype=np.uint8))
        for i in range(batch)
    ]


def naflex_inputs(processor: Siglip2ImageProcessor, images: list[Any]) -> NaflexInputs:
    return NaflexInputs.from_processor(processor(images))


def default_processor(config: AnyVisionConfig) -> SiglipImageProcessor | Siglip2ImageProcessor:
    """The processor for a config when the source names none: SigLIP's at its resolution, or NaFlex's with as
    many patches as the position grid (as the hub checkpoints ship it: a non-square image's grid is then
    smaller than the table on one side, so the resize shrinks it and antialias matters)."""
    if isinstance(config, Siglip2VisionConfig):
        return Siglip2ImageProcessor(patch_size=config.patch_size, max_num_patches=config.num_patches)
    return SiglipImageProcessor.for_config(config)


def make_pixels(
    config: AnyVisionConfig,
    *,
    images: Sequence[str | os.PathLike[str]] | None = None,
    batch: int = 2,
    seed: int = 0,
    processor: SiglipImageProcessor | Siglip2ImageProcessor | None = None,
) -> ModelInputs:
    """Images through the processor, else ``batch`` seeded uniform[-1, 1] images (float32). For SigLIP 2
    NaFlex: `NaflexInputs`, from the images or from ``batch`` seeded images of different aspect ratios
    (a padded batch in which every image has its own patch grid)."""
    if batch < 1 and not images:
        raise InputError(f"batch must be >= 1, got {batch}", "--batch", None)
    if isinstance(config, Siglip2VisionConfig):
        if not isinstance(processor, Siglip2ImageProcessor):
            processor = default_processor(config)
        return naflex_inputs(processor, list(images) if images else naflex_images(batch, seed))
    if images:
        return (processor or default_processor(config))(list(images))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.num_channels, config.image_size, config.image_size, generator=g) * 2 - 1


def forward_candidate(candidate: nn.Module, pixel_values: Any) -> Any:
    """``candidate(pixel_values)`` (NaFlex: ``candidate(pixel_values=…, pixel_attention_mask=…, spatial_shapes=…)``);
    the candidate is user code, so anything it raises becomes a one-line `InputError` (our own
    `InputError`s, e.g. from hooks, pass through)."""
    try:
        return call(candidate, pixel_values)
    except InputError:
        raise
    except Exception as exc:  # the user's forward may raise anything
        raise InputError(
            f"candidate forward raised {type(exc).__name__}: {exc}".splitlines()[0],
            f"pixel_values shape {list(pixel_values.shape)}",
            "run the candidate on this input by itself to debug it",
        ) from None
