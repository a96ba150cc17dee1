"""The SigLIP vision encoder, from scratch.

Module paths mirror the hub checkpoints (``vision_model.encoder.layers.3.self_attn.q_proj``), so a
hub state dict loads with ``strict=True`` and no renaming. Every site the parity harness compares is
a plain submodule whose forward takes the hidden states first and returns a tensor.

The forward performs the same floating-point operations in the same order as
``transformers.SiglipVisionModel``, which is what makes float32 CPU outputs bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import SiglipVisionConfig
from .errors import InputError

__all__ = [
    "AttnImplementation",
    "SiglipAttention",
    "SiglipEncoder",
    "SiglipEncoderLayer",
    "SiglipMLP",
    "SiglipMultiheadAttentionPoolingHead",
    "SiglipVisionEmbeddings",
    "SiglipVisionModelOutput",
    "SiglipVisionTransformer",
]

AttnImplementation = Literal["sdpa", "eager"]
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class SiglipVisionModelOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def interpolated_positions(self, height: int, width: int) -> torch.Tensor:
        """The position table resized to the patch grid of a ``height`` x ``width`` image.

        Same method as transformers: bicubic, ``align_corners=False``, on the square table; skipped
        when the image is square and already has the table's patch count.
        """
        table = self.position_embedding.weight
        n, dim = table.shape
        new_h, new_w = height // self.patch_size, width // self.patch_size
        if new_h * new_w == n and height == width:
            return table.unsqueeze(0)
        side = int(n**0.5)
        grid = table.unsqueeze(0).reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).view(1, -1, dim)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``position_ids`` ([N], default 0…N−1): the table rows to add, for a tower that picks its own
        (transformers 4.57's Idefics3 buckets them, `vlm.bucketed_position_ids`)."""
        _, _, height, width = pixel_values.shape
        patches = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
        if position_ids is not None:
            return embeddings + self.position_embedding(position_ids).unsqueeze(0)
        if interpolate_pos_encoding:
            return embeddings + self.interpolated_positions(height, width)
        return embeddings + self.position_embedding.weight.unsqueeze(0)


class SiglipAttention(nn.Module):
    """Multi-head self-attention with a backend switch (``sdpa`` or ``eager``)."""

    def __init__(self, config: SiglipVisionConfig, attn_implementation: AttnImplementation = "sdpa"):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = attn_implementation
        d = config.hidden_size
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` (SigLIP 2 NaFlex): [B, 1, N, N], boolean (True = attend) for sdpa or additive
        (0 / dtype min) for either; None for fixed-resolution SigLIP, which has no padding."""
        B, N, D = hidden_states.shape
        heads = (B, N, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(heads).transpose(1, 2)  # [B, heads, N, head_dim]
        k = self.k_proj(hidden_states).view(heads).transpose(1, 2)
        v = self.v_proj(hidden_states).view(heads).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if self.attn_implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=self.scale)
        else:
            weights = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            if attention_mask is not None:
                weights = weights + attention_mask
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            weights = F.dropout(weights, p=dropout, training=self.training)
            out = torch.matmul(weights, v)
        out = out.transpose(1, 2).contiguous().reshape(B, N, D).contiguous()
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        # "gelu_pytorch_tanh" is the tanh approximation SigLIP was trained with; "gelu" is exact erf.
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig, attn_implementation: AttnImplementation = "sdpa"):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config, attn_implementation)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.layer_norm1(hidden_states)
        attended = self.self_attn(normed) if attention_mask is None else self.self_attn(normed, attention_mask)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig, attn_implementation: AttnImplementation = "sdpa"):
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(config, attn_implementation) for _ in range(config.num_hidden_layers)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_hidden_states: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            # The mask only when there is one: a fixed-resolution layer is called as it always was.
            hidden_states = layer(hidden_states) if attention_mask is None else layer(hidden_states, attention_mask)
            if states is not None:
                states.append(hidden_states)
        return hidden_states, (tuple(states) if states is not None else None)


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """MAP head: one learned probe attends over all patches, then a residual MLP.

    ``attention`` holds ``in_proj_weight`` [3D, D] (q;k;v stacked in that order),
    ``in_proj_bias`` [3D] and ``out_proj``, the layout of ``nn.MultiheadAttention``. The math below
    is the order of operations of ``F.multi_head_attention_forward`` for cross-attention with
    ``need_weights=True`` (what transformers calls), sequence-first, so results are bit-identical.
    """

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.probe = nn.Parameter(torch.empty(1, 1, d))
        self.attention = _PoolingAttention(d, config.num_attention_heads)
        self.layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` (SigLIP 2 NaFlex): additive [B·heads, 1, N] over the patches, or None."""
        B = hidden_states.shape[0]
        probe = self.probe.repeat(B, 1, 1)
        if attention_mask is None:
            pooled = self.attention(probe, hidden_states)
        else:
            pooled = self.attention(probe, hidden_states, attention_mask)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class _PoolingAttention(nn.Module):
    """``nn.MultiheadAttention(dim, num_heads, batch_first=True)(query, kv, kv, need_weights=True)[0]``,
    written out. It mirrors torch's ``F.multi_head_attention_forward`` for that call: the packed
    projection ``_in_projection_packed`` (q alone, k and v from one GEMM when key is value), the
    ``q * sqrt(1 / head_dim)`` then ``bmm`` order of the need_weights path, softmax, ``bmm`` with v and
    ``out_proj``. `tests/test_model_vs_transformers.py::test_pooling_attention_mirrors_torch` fails if a
    torch upgrade changes that arithmetic."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, kv: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = query.shape
        S = kv.shape[1]
        H = self.num_heads
        hd = D // H
        q_in, kv_in = query.transpose(0, 1), kv.transpose(0, 1)  # batch-first -> sequence-first
        w_q, w_kv = self.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.in_proj_bias.split([D, 2 * D])
        q = F.linear(q_in, w_q, b_q)
        # [S, B, 2D] -> [2, S, B, D], k and v contiguous like torch's _in_projection_packed
        kv_proj = F.linear(kv_in, w_kv, b_kv).unflatten(-1, (2, D)).unsqueeze(0).transpose(0, -2)
        k, v = kv_proj.squeeze(-2).contiguous()
        q = q.view(L, B * H, hd).transpose(0, 1)
        k = k.view(S, B * H, hd).transpose(0, 1)
        v = v.view(S, B * H, hd).transpose(0, 1)
        q_scaled = q * math.sqrt(1.0 / float(hd))
        if attn_mask is not None:  # torch adds the mask inside the GEMM (baddbmm), not after it
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(L * B, D)
        out = self.out_proj(out).view(L, B, D)
        return out.transpose(1, 0)


class SiglipVisionTransformer(nn.Module):
    """The tower itself; `SiglipVisionModel` holds it as ``vision_model`` like the hub does."""

    def __init__(self, config: SiglipVisionConfig, attn_implementation: AttnImplementation = "sdpa"):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config, attn_implementation)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = SiglipMultiheadAttentionPoolingHead(config) if config.vision_use_head else None

    def check_pixel_values(self, pixel_values: object, interpolate_pos_encoding: bool) -> None:
        """Raise `InputError` naming the shape and the fix for a tensor the model cannot take."""
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(
                f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}",
                "pixel_values",
                "run images through SiglipImageProcessor",
            )
        shape = tuple(pixel_values.shape)
        if pixel_values.dim() != 4:
            raise InputError(
                f"pixel_values must be [batch, channels, height, width], got shape {shape}",
                "pixel_values",
                "add a batch dimension with .unsqueeze(0)" if pixel_values.dim() == 3 else None,
            )
        if not pixel_values.is_floating_point():
            raise InputError(
                f"pixel_values must be floating point, got {pixel_values.dtype}",
                "pixel_values",
                "rescale and normalize the images (SiglipImageProcessor does)",
            )
        B, C, H, W = shape
        if B == 0:
            raise InputError("empty batch", f"pixel_values shape {shape}", "pass at least one image")
        if C != cfg.num_channels:
            raise InputError(
                f"expected {cfg.num_channels} channels, got {C}",
                f"pixel_values shape {shape}",
                "convert images to RGB; channels come second ([B, C, H, W])",
            )
        if H < cfg.patch_size or W < cfg.patch_size:
            raise InputError(
                f"image {H}x{W} is smaller than one {cfg.patch_size}x{cfg.patch_size} patch",
                f"pixel_values shape {shape}",
                None,
            )
        if not interpolate_pos_encoding and (H // cfg.patch_size, W // cfg.patch_size) != (
            cfg.grid_size,
            cfg.grid_size,
        ):
            raise InputError(
                f"image size {H}x{W} does not match the position table ({cfg.image_size}x{cfg.image_size})",
                f"pixel_values shape {shape}",
                f"resize to {cfg.image_size}x{cfg.image_size} or pass interpolate_pos_encoding=True",
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> SiglipVisionModelOutput:
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states, states = self.encoder(hidden_states, output_hidden_states=output_hidden_states)
        last_hidden_state = self.post_layernorm(hidden_states)
        pooled = self.head(last_hidden_state) if self.head is not None else None
        return SiglipVisionModelOutput(last_hidden_state, pooled, states)
