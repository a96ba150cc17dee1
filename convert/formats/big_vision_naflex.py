"""big_vision SigLIP 2 NaFlex ``.npz`` (``naflex_vit.py``): a Dense stem over flattened patches and an (n, n, D)
position grid; the encoder and MAP head are big_vision's (`big_vision.py`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from siglip_scratch.config import Siglip2VisionConfig
from siglip_scratch.errors import CheckpointError, ConfigError
from siglip_scratch.modeling import Siglip2VisionModel

from ..native import Get, Leaf
from ..stores import Store
from ..tables import DENSE, Row, apply_table, grid_to_table, layer_count, one, rank_shape
from .base import Format, Layout
from .big_vision import TABLE as BIG_VISION_TABLE
from .big_vision import big_vision_encoder, npz_layout, npz_stem

__all__ = ["BIG_VISION_NAFLEX", "TABLE", "native_forward"]

# big_vision NaFlex (naflex_vit.py): the encoder and the MAP head are laid out as above; only the stem differs.
TABLE: list[Row] = [
    Row("vision_model.embeddings.patch_embedding.weight", ("embedding/kernel",), DENSE),
    Row("vision_model.embeddings.patch_embedding.bias", ("embedding/bias",), None),
    Row("vision_model.embeddings.position_embedding.weight", ("pos_embedding",), one(grid_to_table)),
    *(r for r in BIG_VISION_TABLE if not r.target.startswith("vision_model.embeddings.")),
]


def infer_config(store: Store, root: str, notes: list[str]) -> Siglip2VisionConfig:
    """A big_vision NaFlex tower's config from its shapes: the Dense stem's input is p·p·3 (RGB), the
    position grid is n x n."""
    keys = set(store.keys())
    patch_dim, d = rank_shape(store, root + "embedding/kernel", 2)
    n, n2, _ = rank_shape(store, root + "pos_embedding", 3)
    p = math.isqrt(patch_dim // 3)
    if p * p * 3 != patch_dim or n != n2:
        raise ConfigError(
            f"NaFlex stem input {patch_dim} is not p·p·3, or the position grid {n}x{n2} is not square",
            store.where(root + "embedding/kernel"),
            "pass --config with a Siglip2VisionConfig JSON",
        )
    notes.append(f"SigLIP 2 NaFlex: patch {p} (a {patch_dim}-wide Dense stem), a {n}x{n} position grid")
    return Siglip2VisionConfig(
        hidden_size=d,
        intermediate_size=rank_shape(store, root + "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", 2)[1],
        num_hidden_layers=layer_count(list(keys), root),
        num_attention_heads=rank_shape(
            store, root + "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", 3
        )[1],
        patch_size=p,
        num_patches=n * n,
        vision_use_head=root + "MAPHead_0/probe" in keys,
    )


def native_forward(get: Get, config: Any, pixels: torch.Tensor) -> dict[str, Leaf]:
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
    return big_vision_encoder(get, config, x, leaves)


class BigVisionNaflexFormat(Format):
    family = "big_vision_naflex"
    native = staticmethod(native_forward)

    def detects(self, store: Store, keys: Sequence[str]) -> bool:
        return npz_stem(store, keys) == "dense"

    def layout(self, store, keys, *, folder: Path, where, use_head, hidden_act, infer) -> Layout:
        name, root, drops, notes = npz_layout(keys, where)
        extra = sorted(k for k in keys if k.startswith((root + "patchln_pre/", root + "patchln_post/")))
        if extra:
            raise CheckpointError(
                f"this NaFlex ViT normalises its patches ({extra[0]}), which transformers' Siglip2VisionModel "
                "has no layer for",
                where,
                "only SigLIP 2 NaFlex checkpoints (no patchln_pre/patchln_post) convert",
            )
        planned, used = apply_table(TABLE, store, root, keys, use_head=use_head)
        inferred = infer_config(store, root, notes) if infer else None
        return Layout(name.replace("SigLIP", "SigLIP 2 NaFlex"), planned, used, drops, notes, root, inferred)

    def probe(self, folder: Path, generator: torch.Generator) -> tuple[torch.nn.Module, Any, torch.Tensor]:
        """One full grid of flattened patches (see `native_forward`)."""
        model = Siglip2VisionModel.from_pretrained(folder, dtype=torch.float64).eval()
        cfg = model.config
        return (
            model,
            cfg,
            torch.rand(1, cfg.num_patches, cfg.patch_dim, generator=generator, dtype=torch.float64) * 2 - 1,
        )


BIG_VISION_NAFLEX = BigVisionNaflexFormat()
