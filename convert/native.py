"""Source-native forwards for ``--verify``: the source checkpoint computed in its *own* layout.

The converter maps source tensors to hub keys through a table (`tables.py`); a wrong row (q and k
swapped, a kernel permuted the wrong way) produces a folder that loads and runs, and agrees with
itself. So ``--verify`` does not compare the output with itself: it computes the tower from the
source tensors by their source names, the way the source framework does (big_vision's einsums over
``(D, heads, head_dim)`` kernels and HWIO convolutions; timm's fused ``qkv`` split by its reshape), and
records each leaf module's input and output under our module path. Each of our leaf modules is then
run on the native input and must reproduce the native output (float64 on both sides).

Nothing here imports the converter's tables: the semantics are written again, from the source
framework's point of view.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from siglip_scratch.config import SiglipVisionConfig

__all__ = ["NATIVE_FORWARDS", "Leaf"]

Get = Callable[[str], torch.Tensor]  # source key (relative to the tower root) -> float64 tensor


@dataclass
class Leaf:
    """One of our leaf modules as the source computes it: its inputs and output, and the source keys
    that hold its weights (for the error message)."""

    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    sources: tuple[str, ...]


def _gelu(x: torch.Tensor, hidden_act: str = "gelu_pytorch_tanh") -> torch.Tensor:
    """flax ``nn.gelu`` (big_vision's default) is the tanh approximation; timm runs what the output
    config says (``--hidden-act``)."""
    if hidden_act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * scale + bias


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, heads, Lq, hd] x [B, heads, Lk, hd] -> [B, heads, Lq, hd], softmax(q·k / √hd) v."""
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


# -- big_vision (models/vit.py): NHWC images, DenseGeneral kernels --------------------------------------
def big_vision(get: Get, config: SiglipVisionConfig, pixels: torch.Tensor) -> dict[str, Leaf]:
    leaves: dict[str, Leaf] = {}
    x_nhwc = pixels.permute(0, 2, 3, 1)
    B, H, W, C = x_nhwc.shape
    p = config.patch_size
    kernel = get("embedding/kernel")  # HWIO (p, p, C, D)
    patches = x_nhwc.reshape(B, H // p, p, W // p, p, C)  # [B, h, i, w, j, C]
    conv = torch.einsum("bhiwjc,ijcd->bhwd", patches, kernel) + get("embedding/bias")
    leaves["vision_model.embeddings.patch_embedding"] = Leaf(
        (pixels,), conv.permute(0, 3, 1, 2), ("embedding/kernel", "embedding/bias")
    )
    x = conv.reshape(B, -1, conv.shape[-1]) + get("pos_embedding")[0]
    leaves["vision_model.embeddings"] = Leaf((pixels,), x, ("embedding/kernel", "pos_embedding"))
    return _big_vision_encoder(get, config, x, leaves)


def big_vision_naflex(get: Get, config: Any, pixels: torch.Tensor) -> dict[str, Leaf]:
    """naflex_vit.py: a Dense stem over flattened patches ([B, N, p·p·C], (row, column, channel) order)
    plus the (n, n, D) position grid resized to the image's patch grid. ``pixels`` is one n x n grid of
    patches (no padding), so the resize is the identity and the grid is read row-major as it is stored;
    the resize itself is checked against transformers elsewhere (tests/test_naflex.py)."""
    leaves: dict[str, Leaf] = {}
    B, N, _ = pixels.shape
    grid = get("pos_embedding")  # (n, n, D)
    n = grid.shape[0]
    assert N == n * n, "big_vision_naflex is run on one full n x n grid of patches"
    tokens = pixels @ get("embedding/kernel") + get("embedding/bias")  # Dense: kernel (p·p·C, D)
    leaves["vision_model.embeddings.patch_embedding"] = Leaf((pixels,), tokens, ("embedding/kernel", "embedding/bias"))
    x = tokens + grid.reshape(n * n, -1)[None]
    shapes = torch.tensor([[n, n]] * B)
    leaves["vision_model.embeddings"] = Leaf((pixels, shapes), x, ("embedding/kernel", "pos_embedding"))
    return _big_vision_encoder(get, config, x, leaves)


def _big_vision_encoder(get: Get, config: Any, x: torch.Tensor, leaves: dict[str, Leaf]) -> dict[str, Leaf]:
    """The encoder blocks, final norm and MAP head, from big_vision's own key names and einsums."""
    eps = config.layer_norm_eps
    B = x.shape[0]

    def norm(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        out = _layer_norm(h, get(src + "scale"), get(src + "bias"), eps)
        leaves[site] = Leaf((h,), out, (src + "scale", src + "bias"))
        return out

    def dense(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        out = h @ get(src + "kernel") + get(src + "bias")  # kernel (in, out)
        leaves[site] = Leaf((h,), out, (src + "kernel", src + "bias"))
        return out

    def mlp(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        return dense(f"{site}.fc2", src + "Dense_1/", _gelu(dense(f"{site}.fc1", src + "Dense_0/", h)))

    def project(site: str, src: str, h: torch.Tensor) -> torch.Tensor:  # DenseGeneral to (heads, hd)
        out = torch.einsum("bnd,dhk->bnhk", h, get(src + "kernel")) + get(src + "bias")
        leaves[site] = Leaf((h,), out.reshape(*h.shape[:2], -1), (src + "kernel", src + "bias"))
        return out.transpose(1, 2)  # [B, heads, N, hd]

    for i in range(config.num_hidden_layers):
        site, src = f"vision_model.encoder.layers.{i}.", f"Transformer/encoderblock_{i}/"
        a = src + "MultiHeadDotProductAttention_0/"
        y = norm(site + "layer_norm1", src + "LayerNorm_0/", x)
        q, k, v = (
            project(site + f"self_attn.{n}_proj", a + f"{m}/", y)
            for n, m in zip("qkv", ("query", "key", "value"), strict=True)
        )
        merged = _attend(q, k, v).transpose(1, 2)  # [B, N, heads, hd]
        out = torch.einsum("bnhk,hkd->bnd", merged, get(a + "out/kernel")) + get(a + "out/bias")
        leaves[site + "self_attn.out_proj"] = Leaf(
            (merged.reshape(*merged.shape[:2], -1),), out, (a + "out/kernel", a + "out/bias")
        )
        x = x + out
        x = x + mlp(site + "mlp", src + "MlpBlock_0/", norm(site + "layer_norm2", src + "LayerNorm_1/", x))
    x = norm("vision_model.post_layernorm", "Transformer/encoder_norm/", x)

    if not config.vision_use_head:
        return leaves
    h = "MAPHead_0/"
    a = h + "MultiHeadDotProductAttention_0/"
    probe = get(h + "probe").expand(B, -1, -1)  # (1, 1, D) -> (B, 1, D)
    heads = {}
    for m, inp in (("query", probe), ("key", x), ("value", x)):
        heads[m] = (torch.einsum("bnd,dhk->bnhk", inp, get(a + f"{m}/kernel")) + get(a + f"{m}/bias")).transpose(1, 2)
    merged = _attend(heads["query"], heads["key"], heads["value"]).transpose(1, 2)
    pooled = torch.einsum("bnhk,hkd->bnd", merged, get(a + "out/kernel")) + get(a + "out/bias")
    leaves["vision_model.head.attention"] = Leaf(
        (probe, x), pooled, tuple(a + f"{m}/{t}" for m in ("query", "key", "value", "out") for t in ("kernel", "bias"))
    )
    y = norm("vision_model.head.layernorm", h + "LayerNorm_0/", pooled)
    mlp("vision_model.head.mlp", h + "MlpBlock_0/", y)
    return leaves


# -- timm (VisionTransformer with AttentionPoolLatent) -------------------------------------------------
def timm(get: Get, config: SiglipVisionConfig, pixels: torch.Tensor) -> dict[str, Leaf]:
    leaves: dict[str, Leaf] = {}
    eps = config.layer_norm_eps
    heads = config.num_attention_heads

    def linear(site: str | None, src: str, h: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, get(src + "weight"), get(src + "bias"))
        if site is not None:
            leaves[site] = Leaf((h,), out, (src + "weight", src + "bias"))
        return out

    def norm(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        out = _layer_norm(h, get(src + "weight"), get(src + "bias"), eps)
        leaves[site] = Leaf((h,), out, (src + "weight", src + "bias"))
        return out

    def mlp(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        return linear(f"{site}.fc2", src + "fc2.", _gelu(linear(f"{site}.fc1", src + "fc1.", h), config.hidden_act))

    conv = F.conv2d(pixels, get("patch_embed.proj.weight"), get("patch_embed.proj.bias"), stride=config.patch_size)
    leaves["vision_model.embeddings.patch_embedding"] = Leaf(
        (pixels,), conv, ("patch_embed.proj.weight", "patch_embed.proj.bias")
    )
    x = conv.flatten(2).transpose(1, 2) + get("pos_embed")  # pos_embed (1, N, D)
    leaves["vision_model.embeddings"] = Leaf((pixels,), x, ("patch_embed.proj.weight", "pos_embed"))
    B, N, D = x.shape
    for i in range(config.num_hidden_layers):
        site, src = f"vision_model.encoder.layers.{i}.", f"blocks.{i}."
        y = norm(site + "layer_norm1", src + "norm1.", x)
        qkv = linear(None, src + "attn.qkv.", y).reshape(B, N, 3, heads, D // heads)
        for j, n in enumerate("qkv"):  # timm: qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
            leaves[site + f"self_attn.{n}_proj"] = Leaf(
                (y,), qkv[:, :, j].reshape(B, N, D), (src + "attn.qkv.weight", src + "attn.qkv.bias")
            )
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        merged = _attend(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + linear(site + "self_attn.out_proj", src + "attn.proj.", merged)
        x = x + mlp(site + "mlp", src + "mlp.", norm(site + "layer_norm2", src + "norm2.", x))
    x = norm("vision_model.post_layernorm", "norm.", x)

    if not config.vision_use_head:
        return leaves
    latent = get("attn_pool.latent").expand(B, -1, -1)
    q = linear(None, "attn_pool.q.", latent).reshape(B, 1, heads, D // heads).transpose(1, 2)
    k, v = linear(None, "attn_pool.kv.", x).reshape(B, N, 2, heads, D // heads).permute(2, 0, 3, 1, 4)
    merged = _attend(q, k, v).transpose(1, 2).reshape(B, 1, D)
    pooled = linear(None, "attn_pool.proj.", merged)
    leaves["vision_model.head.attention"] = Leaf(
        (latent, x), pooled, tuple(f"attn_pool.{m}.{t}" for m in ("q", "kv", "proj") for t in ("weight", "bias"))
    )
    mlp("vision_model.head.mlp", "attn_pool.mlp.", norm("vision_model.head.layernorm", "attn_pool.norm.", pooled))
    return leaves


NATIVE_FORWARDS: dict[str, Callable[[Get, Any, torch.Tensor], dict[str, Leaf]]] = {
    "big_vision": big_vision,
    "big_vision_naflex": big_vision_naflex,
    "timm": timm,
}
