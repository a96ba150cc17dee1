"""The SigLIP 2 NaFlex vision tower, from scratch (``transformers.Siglip2VisionModel``'s keys and arithmetic).

What differs from the fixed-resolution tower (`model.py`, whose encoder layers, MLP and MAP head this reuses):

- the input is already patchified: ``pixel_values`` [B, N, C·p·p], one row per patch, row-major over each
  image's own grid of ``spatial_shapes[i] = (h, w)`` patches, padded to N (``pixel_attention_mask`` [B, N]
  says which rows are real);
- the patch embedding is a ``Linear`` over a flattened patch (``embeddings.patch_embedding.weight`` [D, C·p·p]);
- the learned position table (a square grid of ``num_patches``) is resized per image to (h, w) with
  bilinear, antialiased, ``align_corners=False`` weights; padding rows take position (0, 0);
- every attention (each layer, and the MAP head's probe) ignores padded patches.

``arithmetic`` picks which transformers' floating-point operations to reproduce bit for bit, because the
two versions compute the same values differently:

- ``"5"`` (default): the resize as one matmul with the separable antialiased weights (float32); no mask
  when nothing is padded, else a boolean mask for sdpa / an additive one for eager, and an additive mask
  for the head;
- ``"4.57"``: the resize as ``F.interpolate(..., antialias=True)`` per image (float32 on CPU); an additive
  mask always, in every attention and the head.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import Siglip2VisionConfig
from .errors import InputError
from .model import (
    AttnImplementation,
    SiglipEncoder,
    SiglipMultiheadAttentionPoolingHead,
    SiglipVisionModelOutput,
)

__all__ = ["ARITHMETICS", "Arithmetic", "Siglip2VisionEmbeddings", "Siglip2VisionTransformer"]

Arithmetic = Literal["5", "4.57"]
ARITHMETICS = ("5", "4.57")


class Siglip2VisionEmbeddings(nn.Module):
    def __init__(self, config: Siglip2VisionConfig, arithmetic: Arithmetic = "5"):
        super().__init__()
        self.grid = config.position_grid
        self.arithmetic = arithmetic
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        return patches + self.resized_positions(spatial_shapes, pixel_values.shape[1])

    def resized_positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """[B, length, D]: the position grid resized to each image's (h, w), row-major, padded with (0, 0)."""
        table = self.position_embedding.weight
        if self.arithmetic == "4.57":
            return _resize_by_interpolate(table, self.grid, spatial_shapes, length)
        return _resize_by_weights(table, self.grid, spatial_shapes, length)


def _resize_by_weights(table: torch.Tensor, grid: int, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
    """Bilinear antialiased resize as a linear map: per output patch, the outer product of its row's and its
    column's triangle-filter weights over the source grid, applied to the flattened table (float32)."""
    size = spatial_shapes.float()[:, None]  # [B, 1, 2] = (h, w)
    index = torch.arange(length, device=spatial_shapes.device, dtype=torch.float32)[None, :, None]  # [1, L, 1]
    row = torch.div(index, size[..., 1:], rounding_mode="floor")
    rc = torch.cat([row, index - row * size[..., 1:]], dim=-1)  # [B, L, 2] (row, col) of each output patch
    rc = rc * (index < size.prod(-1, keepdim=True))  # padding rows: position (0, 0)
    step = grid / size  # source cells per output cell, per axis
    support = step.clamp(min=1)  # the filter widens when shrinking (antialias)
    centre = (rc + 0.5) * step - 0.5
    source = torch.arange(grid, device=spatial_shapes.device, dtype=torch.float32)
    w = (1 - (source - centre[..., None]).abs_().div_(support[..., None])).clamp_(min=0)  # [B, L, 2, G]
    w = w / w.sum(-1, keepdim=True)
    w = (w[..., 0, :, None] * w[..., 1, None, :]).flatten(-2)  # [B, L, G·G]
    flat = table.reshape(-1, table.shape[-1])
    return (w.to(flat.device) @ flat.float()).to(table.dtype)


def _resize_by_interpolate(table: torch.Tensor, grid: int, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
    """The same resize through ``F.interpolate`` per image (float32 on CPU: no antialias kernel below)."""
    dim = table.shape[-1]
    out = torch.empty(spatial_shapes.shape[0], length, dim, device=table.device, dtype=table.dtype)
    image = table.reshape(grid, grid, dim).permute(2, 0, 1).unsqueeze(0)
    if image.device.type == "cpu":
        image = image.to(torch.float32)
    for i, (h, w) in enumerate(spatial_shapes.tolist()):
        resized = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        resized = resized.reshape(dim, h * w).transpose(0, 1).to(table.dtype)
        out[i, : h * w] = resized
        out[i, h * w :] = resized[0]
    return out


class Siglip2VisionTransformer(nn.Module):
    """The NaFlex tower; `Siglip2VisionModel` holds it as ``vision_model`` like the hub does."""

    def __init__(
        self,
        config: Siglip2VisionConfig,
        attn_implementation: AttnImplementation = "sdpa",
        arithmetic: Arithmetic = "5",
    ):
        super().__init__()
        self.config = config
        self.arithmetic = arithmetic
        self.embeddings = Siglip2VisionEmbeddings(config, arithmetic)
        self.encoder = SiglipEncoder(config, attn_implementation)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = SiglipMultiheadAttentionPoolingHead(config) if config.vision_use_head else None

    def set_arithmetic(self, arithmetic: Arithmetic) -> None:
        if arithmetic not in ARITHMETICS:
            raise InputError(f"unknown arithmetic {arithmetic!r}", "arithmetic", f"use one of {ARITHMETICS}")
        self.arithmetic = self.embeddings.arithmetic = arithmetic

    def masks(
        self, pixel_attention_mask: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the encoder's [B, 1, N, N] mask, the head's [B·heads, 1, N] mask) as transformers builds them."""
        keep = pixel_attention_mask.bool()
        B, N = keep.shape
        if self.arithmetic == "5" and bool(keep.all()):
            return None, None  # nothing padded: transformers 5 passes no mask at all
        additive = torch.zeros(B, N, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
        sdpa = self.encoder.layers[0].self_attn.attn_implementation == "sdpa" if len(self.encoder.layers) else False
        if self.arithmetic == "5" and sdpa:
            encoder_mask = keep[:, None, None, :].expand(B, 1, N, N)
        else:
            encoder_mask = additive[:, None, None, :].expand(B, 1, N, N)
        heads = self.config.num_attention_heads
        head_mask = additive[:, None, None, :].repeat(1, heads, 1, 1).reshape(B * heads, 1, N)
        return encoder_mask, head_mask

    def check_inputs(self, pixel_values: object, pixel_attention_mask: object, spatial_shapes: object) -> None:
        """Raise `InputError` naming the tensor, its shape and the fix for inputs the tower cannot take."""
        cfg = self.config
        fix = "run images through Siglip2ImageProcessor"
        for name, t in (
            ("pixel_values", pixel_values),
            ("pixel_attention_mask", pixel_attention_mask),
            ("spatial_shapes", spatial_shapes),
        ):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}", name, fix)
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != cfg.patch_dim or not pixel_values.is_floating_point():
            raise InputError(
                f"pixel_values must be floating [batch, patches, {cfg.patch_dim}] (flattened {cfg.patch_size}x{cfg.patch_size} "
                f"patches of {cfg.num_channels} channels), got {pixel_values.dtype} {list(pixel_values.shape)}",
                "pixel_values",
                fix,
            )
        B, N, _ = pixel_values.shape
        if B == 0 or N == 0:
            raise InputError(f"empty input {list(pixel_values.shape)}", "pixel_values", fix)
        if tuple(pixel_attention_mask.shape) != (B, N):
            raise InputError(
                f"pixel_attention_mask must be [{B}, {N}], got {list(pixel_attention_mask.shape)}",
                "pixel_attention_mask",
                fix,
            )
        if tuple(spatial_shapes.shape) != (B, 2) or spatial_shapes.is_floating_point():
            raise InputError(
                f"spatial_shapes must be integer [{B}, 2], got {spatial_shapes.dtype} {list(spatial_shapes.shape)}",
                "spatial_shapes",
                fix,
            )
        cells = spatial_shapes.prod(-1)
        real = pixel_attention_mask.bool().sum(-1)
        for i in range(B):
            h, w = spatial_shapes[i].tolist()
            if h < 1 or w < 1 or h * w > N:
                raise InputError(f"image {i}: spatial shape {h}x{w} does not fit {N} patches", "spatial_shapes", fix)
            if int(real[i]) != int(cells[i]):
                raise InputError(
                    f"image {i}: pixel_attention_mask marks {int(real[i])} patches but spatial_shapes says {h}x{w} = {h * w}",
                    "pixel_attention_mask",
                    fix,
                )

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        output_hidden_states: bool = False,
    ) -> SiglipVisionModelOutput:
        self.check_inputs(pixel_values, pixel_attention_mask, spatial_shapes)
        hidden_states = self.embeddings(pixel_values, spatial_shapes)
        encoder_mask, head_mask = self.masks(pixel_attention_mask, hidden_states.dtype)
        hidden_states, states = self.encoder(hidden_states, output_hidden_states, encoder_mask)
        last_hidden_state = self.post_layernorm(hidden_states)
        pooled = self.head(last_hidden_state, head_mask) if self.head is not None else None
        return SiglipVisionModelOutput(last_hidden_state, pooled, states)
