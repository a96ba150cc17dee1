"""A SigLIP tower written by hand the way a porter would, with none of the hub's names.

``ln1``/``attn.q,k,v,out``/``ln2``/``ffn.up,down`` in ``blocks``, a ``patchify`` conv and a ``pos``
table added inline (no embeddings module), ``ln_f``, a pooling head on ``nn.MultiheadAttention``,
and a forward that returns a dict. Nothing here knows about siglip_scratch: the harness must infer
how it maps (tests/test_infer.py). ``swap_qk`` plants a bug (q and k exchanged in one layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.swap_qk = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.heads, D // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.swap_qk:
            q, k = k, q
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)
        return self.out((w @ v).transpose(1, 2).reshape(B, N, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class Pool(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.probe.expand(x.shape[0], -1, -1)
        h = self.mha(q, x, x, need_weights=False)[0]
        return (h + self.ffn(self.ln(h)))[:, 0]


class HandWrittenViT(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim, heads, hidden = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
        eps, patch = cfg["layer_norm_eps"], cfg["patch_size"]
        self.patchify = nn.Conv2d(cfg["num_channels"], dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros((cfg["image_size"] // patch) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, eps) for _ in range(cfg["num_hidden_layers"]))
        self.ln_f = nn.LayerNorm(dim, eps=eps)
        self.pool = Pool(dim, heads, hidden, eps)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patchify(pixel_values).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return {"last_hidden_state": x, "pooler_output": self.pool(x)}


def build(cfg: dict) -> HandWrittenViT:
    return HandWrittenViT(cfg)


def build_swapped_qk_in_layer_2(cfg: dict) -> HandWrittenViT:
    model = HandWrittenViT(cfg)
    model.blocks[2].attn.swap_qk = True
    return model
