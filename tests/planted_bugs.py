"""Single planted bugs in copies of our encoder, for testing that the harness blames the right site."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from siglip_scratch import SiglipVisionModel


def missing_residual(k: int) -> Callable[[SiglipVisionModel], None]:
    def plant(model: SiglipVisionModel) -> None:
        layer = model.vision_model.encoder.layers[k]

        def forward(h):
            h = h + layer.self_attn(layer.layer_norm1(h))
            return layer.mlp(layer.layer_norm2(h))  # the second residual is gone

        layer.forward = forward

    return plant


def erf_gelu(k: int) -> Callable[[SiglipVisionModel], None]:
    def plant(model: SiglipVisionModel) -> None:
        model.vision_model.encoder.layers[k].mlp.approximate = "none"

    return plant


def layer_norm_eps(eps: float) -> Callable[[SiglipVisionModel], None]:
    def plant(model: SiglipVisionModel) -> None:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps

    return plant


def q_k_swapped(k: int) -> Callable[[SiglipVisionModel], None]:
    # In the forward, not by swapping modules: the harness loads weights by name, which would undo it.
    def plant(model: SiglipVisionModel) -> None:
        attn = model.vision_model.encoder.layers[k].self_attn

        def forward(x):
            B, N, D = x.shape
            heads = (B, N, attn.num_heads, attn.head_dim)
            q = attn.k_proj(x).view(heads).transpose(1, 2)
            k_ = attn.q_proj(x).view(heads).transpose(1, 2)
            v = attn.v_proj(x).view(heads).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k_, v, scale=attn.scale)
            return attn.out_proj(out.transpose(1, 2).reshape(B, N, D))

        attn.forward = forward

    return plant


def head_dim_scaling() -> Callable[[SiglipVisionModel], None]:
    def plant(model: SiglipVisionModel) -> None:
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.scale = layer.self_attn.head_dim**-1.0  # 1/d instead of 1/sqrt(d)

    return plant


def tanh_in_head() -> Callable[[SiglipVisionModel], None]:
    def plant(model: SiglipVisionModel) -> None:
        model.vision_model.head.mlp.approximate = "none"

    return plant


__all__ = ["erf_gelu", "head_dim_scaling", "layer_norm_eps", "missing_residual", "q_k_swapped", "tanh_in_head"]
