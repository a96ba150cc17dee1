"""A VLM's image features written by hand, as a porter would: a SigLIP tower and a LLaVA- or PaliGemma-style
projector with none of the hub's names, the feature selection read from the VLM's config.json.

    siglip-parity --weights MY_VLM_FOLDER --image-features --candidate examples/llava_port.py:build

The harness infers how its parameters and modules map (no rename map). Nothing here imports siglip_scratch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.norm1(x)
        q, k, v = (w(h).view(B, N, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)
        x = x + self.wo((att @ v).transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Tower(nn.Module):
    def __init__(self, v: dict):
        super().__init__()
        dim, patch = v["hidden_size"], v["patch_size"]
        self.patchify = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Embedding((v["image_size"] // patch) ** 2, dim)
        eps = v.get("layer_norm_eps", 1e-6)
        heads, hidden = v["num_attention_heads"], v["intermediate_size"]
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, eps) for _ in range(v["num_hidden_layers"]))
        self.final_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = self.patchify(pixels).flatten(2).transpose(1, 2)
        x = x + self.pos.weight[None]
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states


class ImageEncoder(nn.Module):
    """LLaVA: ``hidden_states[vision_feature_layer]`` (the first token dropped by the "default" strategy), no final
    norm, Linear-GELU-Linear. PaliGemma: the final norm of the last layer, one Linear."""

    def __init__(self, config: dict):
        super().__init__()
        v, text = config["vision_config"], config["text_config"]["hidden_size"]
        self.llava = config["model_type"].startswith("llava")
        self.layer = config.get("vision_feature_layer", -2)
        self.drop_first = config.get("vision_feature_select_strategy", "default") == "default"
        self.tower = Tower(v)
        dim = v["hidden_size"]
        if self.llava:
            self.proj_in, self.proj_out = nn.Linear(dim, text), nn.Linear(text, text)
        else:
            self.proj = nn.Linear(dim, v.get("projection_dim", 2048))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        states = self.tower(pixels)
        if not self.llava:
            return self.proj(self.tower.final_norm(states[-1]))
        feature = states[self.layer]
        if self.drop_first:
            feature = feature[:, 1:]
        return self.proj_out(F.gelu(self.proj_in(feature)))


def build(config: dict) -> ImageEncoder:
    """The factory the harness calls with the VLM's config.json."""
    if not config["model_type"].startswith(("llava", "paligemma")):
        raise ValueError(f"this example ports LLaVA and PaliGemma, not {config['model_type']}")
    return ImageEncoder(config)
