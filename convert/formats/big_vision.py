"""big_vision ``.npz`` (``models/vit.py``: SigLIP towers, PaliGemma's ``img/``; per-block or scanned): its key
table, config inference and native forward (NHWC images, DenseGeneral kernels, big_vision's einsums)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.config import SiglipVisionConfig
from siglip_scratch.errors import CheckpointError

from ..native import Get, Leaf, attend, gelu, layer_norm
from ..stores import NpzStore, Store
from ..tables import (
    DENSE,
    SQUEEZE0,
    Row,
    apply_table,
    heads_bias,
    hwio_to_oihw,
    layer_count,
    layer_rows,
    one,
    out_kernel,
    qkv_kernel,
    rank_shape,
)
from .base import Format, Layout, config_from_grid

__all__ = ["BIG_VISION", "TABLE", "big_vision_encoder", "native_forward", "npz_layout"]

# Paths relative to the tower root: "img/" or "params/img/".
BLOCK = "Transformer/encoderblock_{}/"
ATTN = "MultiHeadDotProductAttention_0/"

TABLE: list[Row] = [
    Row("vision_model.embeddings.patch_embedding.weight", ("embedding/kernel",), one(hwio_to_oihw)),
    Row("vision_model.embeddings.patch_embedding.bias", ("embedding/bias",), None),
    Row("vision_model.embeddings.position_embedding.weight", ("pos_embedding",), SQUEEZE0),
    *layer_rows(
        BLOCK,
        [
            ("layer_norm1.weight", "LayerNorm_0/scale", None),
            ("layer_norm1.bias", "LayerNorm_0/bias", None),
            ("self_attn.q_proj.weight", ATTN + "query/kernel", one(qkv_kernel)),
            ("self_attn.q_proj.bias", ATTN + "query/bias", one(heads_bias)),
            ("self_attn.k_proj.weight", ATTN + "key/kernel", one(qkv_kernel)),
            ("self_attn.k_proj.bias", ATTN + "key/bias", one(heads_bias)),
            ("self_attn.v_proj.weight", ATTN + "value/kernel", one(qkv_kernel)),
            ("self_attn.v_proj.bias", ATTN + "value/bias", one(heads_bias)),
            ("self_attn.out_proj.weight", ATTN + "out/kernel", one(out_kernel)),
            ("self_attn.out_proj.bias", ATTN + "out/bias", None),
            ("layer_norm2.weight", "LayerNorm_1/scale", None),
            ("layer_norm2.bias", "LayerNorm_1/bias", None),
            ("mlp.fc1.weight", "MlpBlock_0/Dense_0/kernel", DENSE),
            ("mlp.fc1.bias", "MlpBlock_0/Dense_0/bias", None),
            ("mlp.fc2.weight", "MlpBlock_0/Dense_1/kernel", DENSE),
            ("mlp.fc2.bias", "MlpBlock_0/Dense_1/bias", None),
        ],
    ),
    Row("vision_model.post_layernorm.weight", ("Transformer/encoder_norm/scale",), None),
    Row("vision_model.post_layernorm.bias", ("Transformer/encoder_norm/bias",), None),
    Row("vision_model.head.probe", ("MAPHead_0/probe",), None, head=True),
    Row(
        "vision_model.head.attention.in_proj_weight",
        tuple(f"MAPHead_0/{ATTN}{n}/kernel" for n in ("query", "key", "value")),
        lambda xs: torch.cat([qkv_kernel(x) for x in xs], dim=0),
        head=True,
    ),
    Row(
        "vision_model.head.attention.in_proj_bias",
        tuple(f"MAPHead_0/{ATTN}{n}/bias" for n in ("query", "key", "value")),
        lambda xs: torch.cat([heads_bias(x) for x in xs], dim=0),
        head=True,
    ),
    Row(
        "vision_model.head.attention.out_proj.weight",
        (f"MAPHead_0/{ATTN}out/kernel",),
        one(out_kernel),
        head=True,
    ),
    Row("vision_model.head.attention.out_proj.bias", (f"MAPHead_0/{ATTN}out/bias",), None, head=True),
    Row("vision_model.head.layernorm.weight", ("MAPHead_0/LayerNorm_0/scale",), None, head=True),
    Row("vision_model.head.layernorm.bias", ("MAPHead_0/LayerNorm_0/bias",), None, head=True),
    Row("vision_model.head.mlp.fc1.weight", ("MAPHead_0/MlpBlock_0/Dense_0/kernel",), DENSE, head=True),
    Row("vision_model.head.mlp.fc1.bias", ("MAPHead_0/MlpBlock_0/Dense_0/bias",), None, head=True),
    Row("vision_model.head.mlp.fc2.weight", ("MAPHead_0/MlpBlock_0/Dense_1/kernel",), DENSE, head=True),
    Row("vision_model.head.mlp.fc2.bias", ("MAPHead_0/MlpBlock_0/Dense_1/bias",), None, head=True),
]


def npz_layout(keys: Sequence[str], where: str) -> tuple[str, str, list[str], list[str]]:
    roots = [r for r in ("params/img/", "img/") if any(k.startswith(r) for k in keys)]
    if not roots:
        raise CheckpointError(
            "no image tower (img/…) in this .npz", where, "pass a big_vision SigLIP or PaliGemma checkpoint"
        )
    root = roots[0]
    paligemma = any(k.startswith(("params/llm/", "llm/")) for k in keys)
    drops = [k for k in keys if not k.startswith(root) or k.startswith(root + "head/")]
    layout = "big_vision " + ("PaliGemma" if paligemma else "two-tower SigLIP") + f" ({root}…)"
    if any("/encoderblock/" in k for k in keys):
        layout += ", scanned blocks"
    notes = []
    if any(k.startswith(root + "head/") for k in keys):
        notes.append(f"dropped {root}head/ (a projection outside the vision tower)")
    other = {k.split("/")[0] if not k.startswith("params/") else "/".join(k.split("/")[:2]) for k in drops}
    other.discard(root.rstrip("/"))
    if other:
        notes.append(f"dropped other towers: {', '.join(sorted(other))}")
    return layout, root, drops, notes


def infer_config(store: Store, root: str, notes: list[str]) -> SiglipVisionConfig:
    """The config from the kernels' shapes: HWIO stem (p, p, C, D), (1, N, D) positions, (D, heads, head_dim) q."""
    keys = set(store.keys())
    p, _, c, d = rank_shape(store, root + "embedding/kernel", 4)
    return config_from_grid(
        d=d,
        c=c,
        p=p,
        n=rank_shape(store, root + "pos_embedding", 3)[1],
        heads=rank_shape(store, root + "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", 3)[1],
        inter=rank_shape(store, root + "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", 2)[1],
        layers=layer_count(list(keys), root),
        head=root + "MAPHead_0/probe" in keys,
        stated_size=None,
        notes=notes,
    )


def native_forward(get: Get, config: SiglipVisionConfig, pixels: torch.Tensor) -> dict[str, Leaf]:
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
    return big_vision_encoder(get, config, x, leaves)


def big_vision_encoder(get: Get, config: Any, x: torch.Tensor, leaves: dict[str, Leaf]) -> dict[str, Leaf]:
    """The encoder blocks, final norm and MAP head, from big_vision's own key names and einsums."""
    eps = config.layer_norm_eps
    B = x.shape[0]

    def norm(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        out = layer_norm(h, get(src + "scale"), get(src + "bias"), eps)
        leaves[site] = Leaf((h,), out, (src + "scale", src + "bias"))
        return out

    def dense(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        out = h @ get(src + "kernel") + get(src + "bias")  # kernel (in, out)
        leaves[site] = Leaf((h,), out, (src + "kernel", src + "bias"))
        return out

    def mlp(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        return dense(f"{site}.fc2", src + "Dense_1/", gelu(dense(f"{site}.fc1", src + "Dense_0/", h)))

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
        merged = attend(q, k, v).transpose(1, 2)  # [B, N, heads, hd]
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
    merged = attend(heads["query"], heads["key"], heads["value"]).transpose(1, 2)
    pooled = torch.einsum("bnhk,hkd->bnd", merged, get(a + "out/kernel")) + get(a + "out/bias")
    leaves["vision_model.head.attention"] = Leaf(
        (probe, x), pooled, tuple(a + f"{m}/{t}" for m in ("query", "key", "value", "out") for t in ("kernel", "bias"))
    )
    y = norm("vision_model.head.layernorm", h + "LayerNorm_0/", pooled)
    mlp("vision_model.head.mlp", h + "MlpBlock_0/", y)
    return leaves


def npz_stem(store: Store, keys: Sequence[str]) -> str | None:
    """Which big_vision tower a store holds, by its stem: "dense" (a Dense over flattened patches, a rank-2 kernel:
    SigLIP 2 NaFlex, naflex_vit.py), "conv" (vit.py's HWIO convolution), or None for a store that is no .npz."""
    if not isinstance(store, NpzStore):
        return None
    _, root, _, _ = npz_layout(keys, str(store.files[0]))
    return "dense" if len(store.shape(root + "embedding/kernel")) == 2 else "conv"


class BigVisionFormat(Format):
    family = "big_vision"
    native = staticmethod(native_forward)

    def detects(self, store: Store, keys: Sequence[str]) -> bool:
        return npz_stem(store, keys) == "conv"

    def layout(self, store, keys, *, folder: Path, where, use_head, hidden_act, infer) -> Layout:
        name, root, drops, notes = npz_layout(keys, where)
        planned, used = apply_table(TABLE, store, root, keys, use_head=use_head)
        inferred = infer_config(store, root, notes) if infer else None
        return Layout(name, planned, used, drops, notes, root, inferred)


BIG_VISION = BigVisionFormat()
