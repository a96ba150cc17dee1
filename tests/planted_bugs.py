"""Single planted bugs in copies of our encoder, for testing that the harness blames the right site.

Each factory takes the layer to plant at (where that means something) and returns ``plant(model)``,
which changes the model in its forward (never its weights: the harness assigns the checkpoint's
tensors by name, which would undo a changed weight). ``SITE[name](k)`` is the fine-depth site the bug
must be blamed on in isolated mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from siglip_scratch import SiglipVisionModel

Plant = Callable[[SiglipVisionModel], None]
L = "vision_model.encoder.layers"


def _layer(model: SiglipVisionModel, k: int) -> nn.Module:
    return model.vision_model.encoder.layers[k]


def missing_residual(k: int) -> Plant:
    def plant(model: SiglipVisionModel) -> None:
        layer = _layer(model, k)

        def forward(h):
            h = h + layer.self_attn(layer.layer_norm1(h))
            return layer.mlp(layer.layer_norm2(h))  # the second residual is gone

        layer.forward = forward

    return plant


def erf_gelu(k: int) -> Plant:
    def plant(model: SiglipVisionModel) -> None:
        _layer(model, k).mlp.approximate = "none"

    return plant


def layer_norm_eps(k: int, eps: float = 1e-5) -> Plant:
    """Both LayerNorms of layer ``k`` with eps 1e-5 instead of 1e-6."""

    def plant(model: SiglipVisionModel) -> None:
        _layer(model, k).layer_norm1.eps = eps
        _layer(model, k).layer_norm2.eps = eps

    return plant


def all_layer_norm_eps(eps: float = 1e-5) -> Plant:
    def plant(model: SiglipVisionModel) -> None:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps

    return plant


def _attention(attn: nn.Module, x: torch.Tensor, *, heads: int, scale: float, swap_qk: bool = False) -> torch.Tensor:
    B, N, D = x.shape
    shape = (B, N, heads, D // heads)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if swap_qk:
        q, k = k, q
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attn.out_proj(out.transpose(1, 2).reshape(B, N, D))


def _replace_attention(k: int, **kwargs) -> Plant:
    def plant(model: SiglipVisionModel) -> None:
        attn = _layer(model, k).self_attn
        heads = kwargs.get("heads", attn.num_heads)
        scale = kwargs.get("scale", lambda hd: hd**-0.5)((attn.num_heads * attn.head_dim) // heads)
        attn.forward = lambda x: _attention(attn, x, heads=heads, scale=scale, swap_qk=kwargs.get("swap_qk", False))

    return plant


def q_k_swapped(k: int) -> Plant:
    return _replace_attention(k, swap_qk=True)


def scale_one_over_d(k: int) -> Plant:
    """Attention scale 1/d instead of 1/√d."""
    return _replace_attention(k, scale=lambda hd: hd**-1.0)


def wrong_heads(k: int, heads: int) -> Plant:
    """The layer's attention split into ``heads`` heads (e.g. 8 instead of 12), scale from that head_dim."""
    return _replace_attention(k, heads=heads)


def erf_gelu_in_head() -> Plant:
    """Exact (erf) GELU in the MAP head's MLP instead of the tanh approximation."""

    def plant(model: SiglipVisionModel) -> None:
        model.vision_model.head.mlp.approximate = "none"

    return plant


def head_dim_scaling() -> Plant:
    """Attention scale 1/d in every layer."""

    def plant(model: SiglipVisionModel) -> None:
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.scale = layer.self_attn.head_dim**-1.0

    return plant


# name -> (factory(k, num_heads) -> plant, fine-depth site blamed in isolated mode for layer k)
MATRIX: dict[str, tuple[Callable[[int, int], Plant], Callable[[int], str]]] = {
    "missing residual": (lambda k, h: missing_residual(k), lambda k: f"{L}.{k}"),
    "erf GELU in one MLP": (lambda k, h: erf_gelu(k), lambda k: f"{L}.{k}.mlp"),
    "LayerNorm eps 1e-5": (lambda k, h: layer_norm_eps(k), lambda k: f"{L}.{k}.layer_norm1"),
    "q/k swapped": (lambda k, h: q_k_swapped(k), lambda k: f"{L}.{k}.self_attn"),
    "attention scale 1/d": (lambda k, h: scale_one_over_d(k), lambda k: f"{L}.{k}.self_attn"),
    "wrong head count": (
        lambda k, h: wrong_heads(k, h * 2 // 3 if h % 3 == 0 else h // 2),
        lambda k: f"{L}.{k}.self_attn",
    ),
    "exact GELU in the head": (lambda k, h: erf_gelu_in_head(), lambda k: "vision_model.head"),
}

__all__ = [
    "MATRIX",
    "all_layer_norm_eps",
    "erf_gelu",
    "erf_gelu_in_head",
    "head_dim_scaling",
    "layer_norm_eps",
    "missing_residual",
    "q_k_swapped",
    "scale_one_over_d",
    "wrong_heads",
]
