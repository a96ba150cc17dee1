"""The table machinery: rows (source-key templates -> canonical keys), the transforms between layouts, and
applying a family's table to a store (the families' own tables are in `formats/`).

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

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from siglip_scratch.checkpoint import TensorInfo
from siglip_scratch.errors import CheckpointError

from .stores import Store

__all__ = [
    "DENSE",
    "SQUEEZE0",
    "Planned",
    "Row",
    "Transform",
    "apply_table",
    "cat",
    "chunk",
    "dense",
    "grid_to_table",
    "heads_bias",
    "hwio_to_oihw",
    "layer_count",
    "layer_rows",
    "loader",
    "one",
    "out_kernel",
    "qkv_kernel",
    "rank_shape",
    "squeeze0",
]

Transform = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Row:
    target: str
    sources: tuple[str, ...]
    transform: Transform | None  # None: the single source as it is (eligible for a raw byte copy)
    layered: bool = False  # templates contain {} for the layer index
    head: bool = False  # part of the MAP head


def one(f: Callable[[torch.Tensor], torch.Tensor]) -> Transform:
    return lambda xs: f(xs[0])


def cat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(xs), dim=0)


def chunk(i: int, n: int) -> Transform:
    return lambda xs: xs[0].chunk(n, dim=0)[i]


def dense(x: torch.Tensor) -> torch.Tensor:  # (in, out) -> (out, in)
    return x.t()


def hwio_to_oihw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(3, 2, 0, 1)


def qkv_kernel(x: torch.Tensor) -> torch.Tensor:  # (D, heads, head_dim) -> (D_out, D_in)
    return x.reshape(x.shape[0], -1).t()


def heads_bias(x: torch.Tensor) -> torch.Tensor:  # (heads, head_dim) -> (D,)
    return x.reshape(-1)


def out_kernel(x: torch.Tensor) -> torch.Tensor:  # (heads, head_dim, D) -> (D_out, D_in)
    return x.reshape(-1, x.shape[-1]).t()


def squeeze0(x: torch.Tensor) -> torch.Tensor:  # (1, N, D) -> (N, D)
    return x.reshape(x.shape[-2], x.shape[-1])


SQUEEZE0 = one(squeeze0)
DENSE = one(dense)


def layer_rows(src_prefix: str, rows: Sequence[tuple[str, str, Transform | None]]) -> list[Row]:
    return [Row(f"vision_model.encoder.layers.{{}}.{t}", (src_prefix + s,), f, layered=True) for t, s, f in rows]


def grid_to_table(x: torch.Tensor) -> torch.Tensor:  # (n, n, D) -> (n·n, D), row-major
    return x.reshape(-1, x.shape[-1])


@dataclass
class Planned:
    """One output tensor: its key, shape and source dtype; a raw byte range when it can be copied."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    raw: TensorInfo | None
    where: str
    sources: tuple[str, ...] = ()  # the source keys it is made from (for --verify)


def loader(store: Store, key: str) -> Callable[[], torch.Tensor]:
    return lambda: store.load(key)


def apply_table(
    rows: Sequence[Row], store: Store, root: str, keys: Sequence[str], *, use_head: bool
) -> tuple[list[Planned], set[str]]:
    layers = layer_count(keys, root)
    has_head = any(root + s in set(keys) for r in rows if r.head for s in r.sources)
    key_set = set(keys)
    planned: list[Planned] = []
    used: set[str] = set()
    missing: list[str] = []
    for row in rows:
        if row.head and not has_head:
            continue
        for i in range(layers) if row.layered else [None]:
            target = row.target.format(i) if i is not None else row.target
            sources = [root + (s.format(i) if i is not None else s) for s in row.sources]
            absent = [s for s in sources if s not in key_set]
            if absent:
                missing += absent
                continue
            used.update(sources)
            if row.head and not use_head:
                continue
            planned.append(_planned_row(store, target, sources, row))
    if missing:
        raise CheckpointError(
            f"{len(missing)} expected tensor(s) missing: {', '.join(sorted(set(missing))[:8])}",
            str(store.files[0]),
            "the checkpoint is incomplete or not a SigLIP vision tower",
        )
    return planned, used


def _planned_row(store: Store, target: str, sources: list[str], row: Row) -> Planned:
    if row.transform is None:
        (src,) = sources
        return Planned(
            target, store.shape(src), store.dtype(src), loader(store, src), store.raw(src), store.where(src), (src,)
        )
    transform = row.transform
    metas = [torch.empty(store.shape(s), dtype=store.dtype(s), device="meta") for s in sources]
    try:
        out = transform(metas)
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:  # torch's shape errors on meta tensors
        raise CheckpointError(
            f"tensor shapes do not fit the layout ({exc})".splitlines()[0],
            " + ".join(store.where(s) for s in sources),
            "the checkpoint is not the layout it looks like",
        ) from None
    return Planned(
        target,
        tuple(out.shape),
        out.dtype,
        lambda: transform([store.load(s) for s in sources]),
        None,
        " + ".join(store.where(s) for s in sources),
        tuple(sources),
    )


def layer_count(keys: Sequence[str], root: str) -> int:
    pattern = re.compile(re.escape(root) + r"(?:blocks\.|Transformer/encoderblock_)(\d+)[./]")
    idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not idx:
        raise CheckpointError("no transformer blocks found", root or "checkpoint", "is this a vision tower?")
    if idx != set(range(max(idx) + 1)):
        gaps = sorted(set(range(max(idx) + 1)) - idx)
        raise CheckpointError(f"transformer blocks {gaps} are missing", root or "checkpoint", "the file is incomplete")
    return max(idx) + 1


def rank_shape(store: Store, key: str, rank: int) -> tuple[int, ...]:
    shape = store.shape(key)
    if len(shape) != rank:
        raise CheckpointError(f"expected a rank-{rank} tensor, got shape {list(shape)}", store.where(key), None)
    return shape
