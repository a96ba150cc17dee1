"""A SigLIP vision tower written the way timm writes ViTs -- different names, fused qkv.

Used by the README's "Validate your own implementation" walk-through and by the tests:

    siglip-parity --preset google/siglip-base-patch16-224 \
        --candidate examples/timm_like.py:build --rename examples/timm_like_rename.json

Nothing here imports siglip_scratch: it stands for third-party code. Two things connect it to the
harness:

- ``examples/timm_like_rename.json`` maps its module paths (``blocks.3.attn``) to the canonical
  site names (``vision_model.encoder.layers.3.self_attn``);
- ``load_hf_state_dict`` takes the canonical (hub-layout) state dict and does what renaming
  cannot: fuse q/k/v into one ``qkv`` matrix, add the batch axis to the position table, and split
  the MAP head's packed ``in_proj`` into ``q`` and ``kv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolLatent(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H = self.num_heads
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, H, C // H).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, C)
        x = self.proj(x)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class TimmLikeSiglip(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim, heads, hidden = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
        eps, patch = cfg["layer_norm_eps"], cfg["patch_size"]
        grid = cfg["image_size"] // patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg["num_channels"], dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.pos_drop = nn.Dropout(0.0)  # timm applies it right after adding pos_embed
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, eps) for _ in range(cfg["num_hidden_layers"]))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attn_pool = AttentionPoolLatent(dim, heads, hidden, eps) if cfg["vision_use_head"] else None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x, (self.attn_pool(x) if self.attn_pool is not None else None)

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Take hub-layout (``vision_model.…``) tensors; return (missing, unexpected) like torch."""
        p = "vision_model."
        out: dict[str, torch.Tensor] = {
            "patch_embed.proj.weight": sd[p + "embeddings.patch_embedding.weight"],
            "patch_embed.proj.bias": sd[p + "embeddings.patch_embedding.bias"],
            # [N, D] -> [1, N, D]
            "pos_embed": sd[p + "embeddings.position_embedding.weight"].unsqueeze(0),
            "norm.weight": sd[p + "post_layernorm.weight"],
            "norm.bias": sd[p + "post_layernorm.bias"],
        }
        for i in range(len(self.blocks)):
            s, t = f"{p}encoder.layers.{i}.", f"blocks.{i}."
            for part in ("weight", "bias"):
                # three [D, D] (or [D]) projections stacked q;k;v -> one [3D, D] (or [3D])
                out[t + f"attn.qkv.{part}"] = torch.cat([sd[s + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
                out[t + f"attn.proj.{part}"] = sd[s + f"self_attn.out_proj.{part}"]
                out[t + f"norm1.{part}"] = sd[s + f"layer_norm1.{part}"]
                out[t + f"norm2.{part}"] = sd[s + f"layer_norm2.{part}"]
                out[t + f"mlp.fc1.{part}"] = sd[s + f"mlp.fc1.{part}"]
                out[t + f"mlp.fc2.{part}"] = sd[s + f"mlp.fc2.{part}"]
        if self.attn_pool is not None:
            h = p + "head."
            dim = self.norm.weight.shape[0]
            w, b = sd[h + "attention.in_proj_weight"], sd[h + "attention.in_proj_bias"]
            out["attn_pool.latent"] = sd[h + "probe"]
            # packed [3D, D] q;k;v -> q [D, D] and kv [2D, D]
            out["attn_pool.q.weight"], out["attn_pool.kv.weight"] = w[:dim], w[dim:]
            out["attn_pool.q.bias"], out["attn_pool.kv.bias"] = b[:dim], b[dim:]
            for part in ("weight", "bias"):
                out[f"attn_pool.proj.{part}"] = sd[h + f"attention.out_proj.{part}"]
                out[f"attn_pool.norm.{part}"] = sd[h + f"layernorm.{part}"]
                out[f"attn_pool.mlp.fc1.{part}"] = sd[h + f"mlp.fc1.{part}"]
                out[f"attn_pool.mlp.fc2.{part}"] = sd[h + f"mlp.fc2.{part}"]
        # Not strict: what did not fit is returned for the harness to report, not dropped.
        result = self.load_state_dict(out, strict=False)
        used = {k for k in sd if not k.startswith(p + "head.") or self.attn_pool is not None}
        return sorted(result.missing_keys), sorted((set(sd) - used) | set(result.unexpected_keys))


def build(config: dict) -> TimmLikeSiglip:
    """The factory ``--candidate examples/timm_like.py:build`` calls with the config dict."""
    return TimmLikeSiglip(config)
