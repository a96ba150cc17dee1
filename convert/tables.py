"""Key tables: source-key templates -> canonical keys, and the transforms between layouts.

A row is ``(target template, source templates, transform)``; ``{}`` is the layer index. A target
is produced from its sources by the transform; a source may feed several targets (a fused qkv
feeds q, k and v). The converter checks that every source key is used and every target produced.

Layouts (one comment per change, as both sides see it):

- big_vision conv kernel HWIO ``(p, p, C, D)`` -> torch OIHW ``(D, C, p, p)``.
- big_vision NaFlex: the patch embedding is a Dense over a flattened patch, kernel ``(p·p·C, D)`` (the
  patch's values in (row, column, channel) order, as the NaFlex processors flatten it) -> ``(D, p·p·C)``;
  the position table is a grid ``(n, n, D)`` -> ``(n·n, D)`` row-major.
- big_vision q/k/v kernel ``(D, heads, head_dim)`` -> ``(D, D)`` then transposed to torch's
  ``(out, in)``; their biases ``(heads, head_dim)`` -> ``(D,)``.
- big_vision attention out kernel ``(heads, head_dim, D)`` -> ``(D, D)`` (in, out) -> transposed.
- big_vision Dense kernels ``(in, out)`` -> torch Linear ``(out, in)``.
- MAP head: q;k;v stacked along dim 0 into ``in_proj_weight (3D, D)`` / ``in_proj_bias (3D,)``.
- timm ``attn.qkv`` ``(3D, D)`` is q;k;v stacked along dim 0; ``pos_embed (1, N, D)`` -> ``(N, D)``;
  ``attn_pool.kv (2D, D)`` is k;v stacked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["BIG_VISION_NAFLEX_TABLE", "BIG_VISION_TABLE", "TIMM_TABLE", "Row", "Transform"]

Transform = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Row:
    target: str
    sources: tuple[str, ...]
    transform: Transform | None  # None: the single source as it is (eligible for a raw byte copy)
    layered: bool = False  # templates contain {} for the layer index
    head: bool = False  # part of the MAP head


def _one(f: Callable[[torch.Tensor], torch.Tensor]) -> Transform:
    return lambda xs: f(xs[0])


def _cat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(xs), dim=0)


def _chunk(i: int, n: int) -> Transform:
    return lambda xs: xs[0].chunk(n, dim=0)[i]


def _dense(x: torch.Tensor) -> torch.Tensor:  # (in, out) -> (out, in)
    return x.t()


def _hwio_to_oihw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(3, 2, 0, 1)


def _qkv_kernel(x: torch.Tensor) -> torch.Tensor:  # (D, heads, head_dim) -> (D_out, D_in)
    return x.reshape(x.shape[0], -1).t()


def _heads_bias(x: torch.Tensor) -> torch.Tensor:  # (heads, head_dim) -> (D,)
    return x.reshape(-1)


def _out_kernel(x: torch.Tensor) -> torch.Tensor:  # (heads, head_dim, D) -> (D_out, D_in)
    return x.reshape(-1, x.shape[-1]).t()


def _squeeze0(x: torch.Tensor) -> torch.Tensor:  # (1, N, D) -> (N, D)
    return x.reshape(x.shape[-2], x.shape[-1])


SQUEEZE0 = _one(_squeeze0)
DENSE = _one(_dense)


def _layer_rows(src_prefix: str, rows: Sequence[tuple[str, str, Transform | None]]) -> list[Row]:
    return [Row(f"vision_model.encoder.layers.{{}}.{t}", (src_prefix + s,), f, layered=True) for t, s, f in rows]


# -- big_vision .npz (paths relative to the tower root: "img/" or "params/img/") -------------------
_BV_BLOCK = "Transformer/encoderblock_{}/"
_BV_ATTN = "MultiHeadDotProductAttention_0/"

BIG_VISION_TABLE: list[Row] = [
    Row("vision_model.embeddings.patch_embedding.weight", ("embedding/kernel",), _one(_hwio_to_oihw)),
    Row("vision_model.embeddings.patch_embedding.bias", ("embedding/bias",), None),
    Row("vision_model.embeddings.position_embedding.weight", ("pos_embedding",), SQUEEZE0),
    *_layer_rows(
        _BV_BLOCK,
        [
            ("layer_norm1.weight", "LayerNorm_0/scale", None),
            ("layer_norm1.bias", "LayerNorm_0/bias", None),
            ("self_attn.q_proj.weight", _BV_ATTN + "query/kernel", _one(_qkv_kernel)),
            ("self_attn.q_proj.bias", _BV_ATTN + "query/bias", _one(_heads_bias)),
            ("self_attn.k_proj.weight", _BV_ATTN + "key/kernel", _one(_qkv_kernel)),
            ("self_attn.k_proj.bias", _BV_ATTN + "key/bias", _one(_heads_bias)),
            ("self_attn.v_proj.weight", _BV_ATTN + "value/kernel", _one(_qkv_kernel)),
            ("self_attn.v_proj.bias", _BV_ATTN + "value/bias", _one(_heads_bias)),
            ("self_attn.out_proj.weight", _BV_ATTN + "out/kernel", _one(_out_kernel)),
            ("self_attn.out_proj.bias", _BV_ATTN + "out/bias", None),
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
        tuple(f"MAPHead_0/{_BV_ATTN}{n}/kernel" for n in ("query", "key", "value")),
        lambda xs: torch.cat([_qkv_kernel(x) for x in xs], dim=0),
        head=True,
    ),
    Row(
        "vision_model.head.attention.in_proj_bias",
        tuple(f"MAPHead_0/{_BV_ATTN}{n}/bias" for n in ("query", "key", "value")),
        lambda xs: torch.cat([_heads_bias(x) for x in xs], dim=0),
        head=True,
    ),
    Row(
        "vision_model.head.attention.out_proj.weight",
        (f"MAPHead_0/{_BV_ATTN}out/kernel",),
        _one(_out_kernel),
        head=True,
    ),
    Row("vision_model.head.attention.out_proj.bias", (f"MAPHead_0/{_BV_ATTN}out/bias",), None, head=True),
    Row("vision_model.head.layernorm.weight", ("MAPHead_0/LayerNorm_0/scale",), None, head=True),
    Row("vision_model.head.layernorm.bias", ("MAPHead_0/LayerNorm_0/bias",), None, head=True),
    Row("vision_model.head.mlp.fc1.weight", ("MAPHead_0/MlpBlock_0/Dense_0/kernel",), DENSE, head=True),
    Row("vision_model.head.mlp.fc1.bias", ("MAPHead_0/MlpBlock_0/Dense_0/bias",), None, head=True),
    Row("vision_model.head.mlp.fc2.weight", ("MAPHead_0/MlpBlock_0/Dense_1/kernel",), DENSE, head=True),
    Row("vision_model.head.mlp.fc2.bias", ("MAPHead_0/MlpBlock_0/Dense_1/bias",), None, head=True),
]

# -- timm / open_clip (keys relative to the trunk: "", "trunk." or "visual.trunk.") ---------------
TIMM_TABLE: list[Row] = [
    Row("vision_model.embeddings.patch_embedding.weight", ("patch_embed.proj.weight",), None),
    Row("vision_model.embeddings.patch_embedding.bias", ("patch_embed.proj.bias",), None),
    Row("vision_model.embeddings.position_embedding.weight", ("pos_embed",), SQUEEZE0),
    *_layer_rows(
        "blocks.{}.",
        [
            ("layer_norm1.weight", "norm1.weight", None),
            ("layer_norm1.bias", "norm1.bias", None),
            ("self_attn.q_proj.weight", "attn.qkv.weight", _chunk(0, 3)),
            ("self_attn.q_proj.bias", "attn.qkv.bias", _chunk(0, 3)),
            ("self_attn.k_proj.weight", "attn.qkv.weight", _chunk(1, 3)),
            ("self_attn.k_proj.bias", "attn.qkv.bias", _chunk(1, 3)),
            ("self_attn.v_proj.weight", "attn.qkv.weight", _chunk(2, 3)),
            ("self_attn.v_proj.bias", "attn.qkv.bias", _chunk(2, 3)),
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
    Row("vision_model.head.attention.in_proj_weight", ("attn_pool.q.weight", "attn_pool.kv.weight"), _cat, head=True),
    Row("vision_model.head.attention.in_proj_bias", ("attn_pool.q.bias", "attn_pool.kv.bias"), _cat, head=True),
    Row("vision_model.head.attention.out_proj.weight", ("attn_pool.proj.weight",), None, head=True),
    Row("vision_model.head.attention.out_proj.bias", ("attn_pool.proj.bias",), None, head=True),
    Row("vision_model.head.layernorm.weight", ("attn_pool.norm.weight",), None, head=True),
    Row("vision_model.head.layernorm.bias", ("attn_pool.norm.bias",), None, head=True),
    Row("vision_model.head.mlp.fc1.weight", ("attn_pool.mlp.fc1.weight",), None, head=True),
    Row("vision_model.head.mlp.fc1.bias", ("attn_pool.mlp.fc1.bias",), None, head=True),
    Row("vision_model.head.mlp.fc2.weight", ("attn_pool.mlp.fc2.weight",), None, head=True),
    Row("vision_model.head.mlp.fc2.bias", ("attn_pool.mlp.fc2.bias",), None, head=True),
]


def _grid_to_table(x: torch.Tensor) -> torch.Tensor:  # (n, n, D) -> (n·n, D), row-major
    return x.reshape(-1, x.shape[-1])


# big_vision NaFlex (naflex_vit.py): the encoder and the MAP head are laid out as above; only the stem differs.
BIG_VISION_NAFLEX_TABLE: list[Row] = [
    Row("vision_model.embeddings.patch_embedding.weight", ("embedding/kernel",), DENSE),
    Row("vision_model.embeddings.patch_embedding.bias", ("embedding/bias",), None),
    Row("vision_model.embeddings.position_embedding.weight", ("pos_embedding",), _one(_grid_to_table)),
    *(r for r in BIG_VISION_TABLE if not r.target.startswith("vision_model.embeddings.")),
]
