"""timm and open_clip SigLIP ViTs (``VisionTransformer`` with ``AttentionPoolLatent``; open_clip's
``visual.trunk.``): their key table (a fused ``qkv``, a (1, N, D) position table), the config a timm
``save_for_hf`` config.json states or the shapes imply, and timm's own forward."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from siglip_scratch.config import SiglipVisionConfig
from siglip_scratch.errors import CheckpointError, ConfigError, InputError
from siglip_scratch.files import read_json

from ..native import Get, Leaf, attend, gelu, layer_norm
from ..stores import Store
from ..tables import SQUEEZE0, Row, apply_table, cat, chunk, layer_count, layer_rows, rank_shape
from .base import Format, Layout, config_from_grid

__all__ = ["KNOWN_HEADS", "TABLE", "TIMM", "infer_config", "native_forward"]

# Hidden size -> heads for known SigLIP towers; timm state dicts do not record the head count.
KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}

# Keys relative to the trunk: "", "trunk." or "visual.trunk.".
TABLE: list[Row] = [
    Row("vision_model.embeddings.patch_embedding.weight", ("patch_embed.proj.weight",), None),
    Row("vision_model.embeddings.patch_embedding.bias", ("patch_embed.proj.bias",), None),
    Row("vision_model.embeddings.position_embedding.weight", ("pos_embed",), SQUEEZE0),
    *layer_rows(
        "blocks.{}.",
        [
            ("layer_norm1.weight", "norm1.weight", None),
            ("layer_norm1.bias", "norm1.bias", None),
            ("self_attn.q_proj.weight", "attn.qkv.weight", chunk(0, 3)),
            ("self_attn.q_proj.bias", "attn.qkv.bias", chunk(0, 3)),
            ("self_attn.k_proj.weight", "attn.qkv.weight", chunk(1, 3)),
            ("self_attn.k_proj.bias", "attn.qkv.bias", chunk(1, 3)),
            ("self_attn.v_proj.weight", "attn.qkv.weight", chunk(2, 3)),
            ("self_attn.v_proj.bias", "attn.qkv.bias", chunk(2, 3)),
            ("self_attn.out_proj.weight", "attn.proj.weight", None),
            ("self_attn.out_proj.bias", "attn.proj.bias", None),
            ("layer_norm2.weight", "norm2.weight", None),
            ("layer_norm2.bias", "norm2.bias", None),
            ("mlp.fc1.weight", "mlp.fc1.weight", None),
            ("mlp.fc1.bias", "mlp.fc1.bias", None),
            ("mlp.fc2.weight", "mlp.fc2.weight", None),
            ("mlp.fc2.bias", "mlp.fc2.bias", None),
        ],
    ),
    Row("vision_model.post_layernorm.weight", ("norm.weight",), None),
    Row("vision_model.post_layernorm.bias", ("norm.bias",), None),
    Row("vision_model.head.probe", ("attn_pool.latent",), None, head=True),
    Row("vision_model.head.attention.in_proj_weight", ("attn_pool.q.weight", "attn_pool.kv.weight"), cat, head=True),
    Row("vision_model.head.attention.in_proj_bias", ("attn_pool.q.bias", "attn_pool.kv.bias"), cat, head=True),
    Row("vision_model.head.attention.out_proj.weight", ("attn_pool.proj.weight",), None, head=True),
    Row("vision_model.head.attention.out_proj.bias", ("attn_pool.proj.bias",), None, head=True),
    Row("vision_model.head.layernorm.weight", ("attn_pool.norm.weight",), None, head=True),
    Row("vision_model.head.layernorm.bias", ("attn_pool.norm.bias",), None, head=True),
    Row("vision_model.head.mlp.fc1.weight", ("attn_pool.mlp.fc1.weight",), None, head=True),
    Row("vision_model.head.mlp.fc1.bias", ("attn_pool.mlp.fc1.bias",), None, head=True),
    Row("vision_model.head.mlp.fc2.weight", ("attn_pool.mlp.fc2.weight",), None, head=True),
    Row("vision_model.head.mlp.fc2.bias", ("attn_pool.mlp.fc2.bias",), None, head=True),
]


def looks_timm(keys: Sequence[str]) -> bool:
    return any(k.endswith("patch_embed.proj.weight") for k in keys)


# timm's act_layer names (a save_for_hf config.json's model_args) -> transformers' hidden_act
TIMM_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def timm_config(folder: Path) -> dict[str, Any] | None:
    """A timm ``save_for_hf`` config.json beside the weights (it names an ``architecture``), else None."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    data = read_json(file, what="config", error=InputError, fix="fix or replace config.json")
    return data if isinstance(data, dict) and isinstance(data.get("architecture"), str) else None


def timm_act_layer(timm_config: dict[str, Any] | None, where: str) -> str | None:
    """The activation a timm config builds the model with: ``model_args.act_layer``, else timm's
    default for its SigLIP ViTs ("gelu", exact). None without a config (a bare state dict says
    nothing about its activation)."""
    if timm_config is None:
        return None
    args = timm_config.get("model_args") if isinstance(timm_config.get("model_args"), dict) else {}
    act = args.get("act_layer", "gelu")
    if act not in TIMM_ACTIVATIONS:
        raise ConfigError(
            f"timm act_layer {act!r} has no SigLIP equivalent",
            f"{where}: model_args.act_layer",
            "use gelu or gelu_tanh",
        )
    return act


def timm_image_size(timm_config: dict[str, Any] | None) -> int | None:
    """The square input size a timm config states (``model_args.img_size``, else
    ``pretrained_cfg.input_size``), or None."""
    if timm_config is None:
        return None
    args = timm_config.get("model_args") if isinstance(timm_config.get("model_args"), dict) else {}
    cfg = timm_config.get("pretrained_cfg") if isinstance(timm_config.get("pretrained_cfg"), dict) else {}
    size = args.get("img_size")
    if size is None and isinstance(cfg.get("input_size"), list) and len(cfg["input_size"]) == 3:
        size = cfg["input_size"][1:]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def timm_layout(
    keys: Sequence[str], act_layer: str | None, hidden_act: str | None
) -> tuple[str, str, list[str], list[str]]:
    anchor = next(k for k in keys if k.endswith("patch_embed.proj.weight"))
    root = anchor[: -len("patch_embed.proj.weight")]
    if root not in ("", "trunk.", "visual.trunk.", "module."):
        raise CheckpointError(f"unexpected timm prefix {root!r}", anchor, "strip it before converting")
    layout = {"visual.trunk.": "open_clip SigLIP (visual.trunk.)"}.get(root, "timm SigLIP ViT")
    # Outside the trunk (open_clip's text tower, logit_scale/bias) or not part of a SigLIP tower
    # (timm's classifier `head` and `fc_norm`): dropped and reported.
    drops = [k for k in keys if not k.startswith(root) or k[len(root) :].startswith(("head.", "fc_norm."))]
    notes = []
    if hidden_act is None and act_layer != "gelu_tanh":
        runs = "this timm config builds it with" if act_layer else "timm and open_clip build SigLIP ViTs with"
        notes.append(
            f"{runs} exact GELU, but the checkpoints were trained with the tanh approximation: the output "
            "config keeps hidden_act gelu_pytorch_tanh (as transformers' google/siglip-* configs); pass "
            "--hidden-act gelu to reproduce timm's own forward instead"
        )
    if drops:
        notes.append(f"dropped {len(set(drops))} tensor(s) outside the vision trunk")
    return layout, root, sorted(set(drops)), notes


def infer_config(store: Store, root: str, stated_size: int | None, notes: list[str]) -> SiglipVisionConfig:
    """The config from the shapes (the head count from `KNOWN_HEADS`: a state dict does not record it), with the
    image size a timm config states."""
    keys = set(store.keys())
    d, c, p, _ = rank_shape(store, root + "patch_embed.proj.weight", 4)
    if d not in KNOWN_HEADS:
        raise ConfigError(
            f"cannot infer the head count of a timm model with width {d}",
            "num_attention_heads",
            "pass --config with a SiglipVisionConfig JSON",
        )
    return config_from_grid(
        d=d,
        c=c,
        p=p,
        n=rank_shape(store, root + "pos_embed", 3)[1],
        heads=KNOWN_HEADS[d],
        inter=rank_shape(store, root + "blocks.0.mlp.fc1.weight", 2)[0],
        layers=layer_count(list(keys), root),
        head=root + "attn_pool.latent" in keys,
        stated_size=stated_size,
        notes=notes,
    )


def native_forward(get: Get, config: SiglipVisionConfig, pixels: torch.Tensor) -> dict[str, Leaf]:
    leaves: dict[str, Leaf] = {}
    eps = config.layer_norm_eps
    heads = config.num_attention_heads

    def linear(site: str | None, src: str, h: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, get(src + "weight"), get(src + "bias"))
        if site is not None:
            leaves[site] = Leaf((h,), out, (src + "weight", src + "bias"))
        return out

    def norm(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        out = layer_norm(h, get(src + "weight"), get(src + "bias"), eps)
        leaves[site] = Leaf((h,), out, (src + "weight", src + "bias"))
        return out

    def mlp(site: str, src: str, h: torch.Tensor) -> torch.Tensor:
        return linear(f"{site}.fc2", src + "fc2.", gelu(linear(f"{site}.fc1", src + "fc1.", h), config.hidden_act))

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
        merged = attend(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + linear(site + "self_attn.out_proj", src + "attn.proj.", merged)
        x = x + mlp(site + "mlp", src + "mlp.", norm(site + "layer_norm2", src + "norm2.", x))
    x = norm("vision_model.post_layernorm", "norm.", x)

    if not config.vision_use_head:
        return leaves
    latent = get("attn_pool.latent").expand(B, -1, -1)
    q = linear(None, "attn_pool.q.", latent).reshape(B, 1, heads, D // heads).transpose(1, 2)
    k, v = linear(None, "attn_pool.kv.", x).reshape(B, N, 2, heads, D // heads).permute(2, 0, 3, 1, 4)
    merged = attend(q, k, v).transpose(1, 2).reshape(B, 1, D)
    pooled = linear(None, "attn_pool.proj.", merged)
    leaves["vision_model.head.attention"] = Leaf(
        (latent, x), pooled, tuple(f"attn_pool.{m}.{t}" for m in ("q", "kv", "proj") for t in ("weight", "bias"))
    )
    mlp("vision_model.head.mlp", "attn_pool.mlp.", norm("vision_model.head.layernorm", "attn_pool.norm.", pooled))
    return leaves


class TimmFormat(Format):
    family = "timm"
    native = staticmethod(native_forward)

    def detects(self, store: Store, keys: Sequence[str]) -> bool:
        return looks_timm(keys)

    def layout(self, store, keys, *, folder: Path, where, use_head, hidden_act, infer) -> Layout:
        config = timm_config(folder)
        act_layer = timm_act_layer(config, str(folder / "config.json"))
        name, root, drops, notes = timm_layout(keys, act_layer, hidden_act)
        planned, used = apply_table(TABLE, store, root, keys, use_head=use_head)
        inferred = infer_config(store, root, timm_image_size(config), notes) if infer else None
        return Layout(name, planned, used, drops, notes, root, inferred)


TIMM = TimmFormat()
