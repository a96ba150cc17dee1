"""SigLIP towers written in the styles public ViT code uses, none of them ours (the real-ports issue).

One configurable port, lucidrains-like names (``to_patch_embedding``, ``pos_embedding``, ``layers.{i}``,
``norm``, ``pool``), with a ``style`` per way people write it:

- ``inplace``: residual adds written in place (``x += self.attn(self.norm1(x))``);
- ``inline_attn``: attention computed inline in the block's forward (``to_q``/``to_k``/``to_v``/``to_out`` live
  in the block; there is no attention module);
- ``linear_patch``: a ``Linear`` over flattened patches, then ``x += self.pos_embedding`` (a ``[1, N, D]``
  table), both filled by ``load_hf_state_dict``;
- ``fused_qkv``: one ``qkv`` Linear (filled by the loader), the rest by name;
- ``einsum``: attention as einsums;
- ``float64``: the whole model computed in float64, the result cast back to the input's dtype;
- ``mha``: ``nn.MultiheadAttention`` in every layer (q;k;v packed in ``in_proj``, filled by the loader);
- ``coarse_norm``: a stand-in for another runtime's honest but less accurate LayerNorm (MLX's is ×3.4–4.6
  transformers' float32 error at every norm): float32 LayerNorm outputs keep three fewer mantissa bits.

``convert_state`` maps the canonical tensors to the port's own names *independently of the harness* (the tests
load it that way to compute the truth); the harness must find everything itself. ``bug`` plants one: ``eps`` (a
LayerNorm eps of 1e-5 in ``layer``'s ``norm2``), ``scale`` (attention logits scaled by 1/head_dim in ``layer``),
``gelu`` (the exact GELU in ``layer``'s MLP) or ``column_major`` (the patch grid flattened column by column, before
layer 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .handwritten_port import Pool

STYLES = ("plain", "inplace", "inline_attn", "linear_patch", "fused_qkv", "einsum", "float64", "mha", "coarse_norm")


class CoarseLayerNorm(nn.LayerNorm):
    """torch's LayerNorm, its float32 output rounded to 20 mantissa bits (round to nearest): uniformly several times the
    rounding error, noise-like, as a runtime with a less careful kernel has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if y.dtype != torch.float32:
            return y
        bits = y.contiguous().view(torch.int32)
        return ((bits + 4) & ~7).view(torch.float32)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, einsum: bool) -> torch.Tensor:
    B, N, D = q.shape
    q, k, v = (t.view(B, N, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    if einsum:
        w = torch.einsum("bhid,bhjd->bhij", q, k) * scale
        out = torch.einsum("bhij,bhjd->bhid", w.softmax(dim=-1), v)
    else:
        out = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    return out.transpose(1, 2).reshape(B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool, einsum: bool):
        super().__init__()
        self.heads, self.fused, self.einsum = heads, fused, einsum
        self.scale = (dim // heads) ** -0.5
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1) if self.fused else (self.to_q(x), self.to_k(x), self.to_v(x))
        return self.proj(_attend(q, k, v, self.heads, self.scale, self.einsum))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.approximate = "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float, style: str):
        super().__init__()
        self.style, self.heads = style, heads
        norm = CoarseLayerNorm if style == "coarse_norm" else nn.LayerNorm
        self.norm1 = norm(dim, eps=eps)
        if style == "inline_attn":
            self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
            self.scale = (dim // heads) ** -0.5
        elif style == "mha":
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            self.attn = Attention(dim, heads, fused=style == "fused_qkv", einsum=style == "einsum")
        self.norm2 = norm(dim, eps=eps)
        self.ff = FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "inline_attn":
            h = self.norm1(x)
            x = x + self.to_out(_attend(self.to_q(h), self.to_k(h), self.to_v(h), self.heads, self.scale, False))
            return x + self.ff(self.norm2(x))
        if self.style == "mha":
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.ff(self.norm2(x))
        if self.style == "inplace":
            x += self.attn(self.norm1(x))
            x += self.ff(self.norm2(x))
            return x
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class PeoplePort(nn.Module):
    def __init__(self, cfg: dict, style: str, bug: str | None = None, layer: int = 0):
        super().__init__()
        assert style in STYLES, style
        dim, heads, hidden = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
        eps, self.patch, channels = cfg["layer_norm_eps"], cfg["patch_size"], cfg["num_channels"]
        n = (cfg["image_size"] // self.patch) ** 2
        self.style = style
        if style == "linear_patch":
            self.to_patch_embedding = nn.Linear(channels * self.patch * self.patch, dim)
            self.pos_embedding = nn.Parameter(torch.zeros(1, n, dim))
        else:
            self.to_patch_embedding = nn.Conv2d(channels, dim, self.patch, self.patch)
            self.pos_embedding = nn.Parameter(torch.zeros(n, dim))
        self.layers = nn.ModuleList(
            Block(dim, heads, hidden, eps, "plain" if style in ("linear_patch", "float64") else style)
            for _ in range(cfg["num_hidden_layers"])
        )
        self.norm = (CoarseLayerNorm if style == "coarse_norm" else nn.LayerNorm)(dim, eps=eps)
        self.pool = Pool(dim, heads, hidden, eps)
        if bug == "eps":
            self.layers[layer].norm2.eps = 1e-5
        elif bug == "scale":
            target = self.layers[layer] if style == "inline_attn" else self.layers[layer].attn
            target.scale = 1.0 / (dim // heads)
        elif bug == "gelu":
            self.layers[layer].ff.approximate = "none"
        elif bug not in (None, "column_major"):
            raise ValueError(bug)
        self.column_major = bug == "column_major"  # patches read down the columns (a slip from NHWC code)

    def load_hf_state_dict(self, sd) -> None:
        """What renaming cannot express: a conv kernel as a Linear over (c, ph, pw) patches, a [1, N, D] table,
        a fused qkv. Everything else is left to the harness's name inference."""
        v = "vision_model."
        with torch.no_grad():
            if self.style == "linear_patch":
                w = sd[v + "embeddings.patch_embedding.weight"]
                self.to_patch_embedding.weight.copy_(w.reshape(w.shape[0], -1))
                self.to_patch_embedding.bias.copy_(sd[v + "embeddings.patch_embedding.bias"])
                self.pos_embedding.copy_(sd[v + "embeddings.position_embedding.weight"][None])
            if self.style in ("fused_qkv", "mha"):
                for i, layer in enumerate(self.layers):
                    a = f"{v}encoder.layers.{i}.self_attn."
                    if self.style == "mha":  # nn.MultiheadAttention packs q;k;v into in_proj
                        layer.attn.in_proj_weight.copy_(torch.cat([sd[f"{a}{p}_proj.weight"] for p in "qkv"]))
                        layer.attn.in_proj_bias.copy_(torch.cat([sd[f"{a}{p}_proj.bias"] for p in "qkv"]))
                        continue
                    layer.attn.qkv.weight.copy_(torch.cat([sd[f"{a}{p}_proj.weight"] for p in "qkv"]))
                    layer.attn.qkv.bias.copy_(torch.cat([sd[f"{a}{p}_proj.bias"] for p in "qkv"]))

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = pixel_values.dtype
        if self.style == "float64":
            self.double()
            pixel_values = pixel_values.double()
        if self.style == "linear_patch":
            B, C, H, W = pixel_values.shape
            p = self.patch
            patches = pixel_values.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
            x = self.to_patch_embedding(patches.reshape(B, (H // p) * (W // p), C * p * p))
            x += self.pos_embedding
        else:
            grid = self.to_patch_embedding(pixel_values)
            grid = grid.transpose(-1, -2) if self.column_major else grid
            x = grid.flatten(2).transpose(1, 2) + self.pos_embedding
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        pooled = self.pool(x)
        return {"last_hidden_state": x.to(dtype), "pooler_output": pooled.to(dtype)}


def convert_state(state: dict[str, torch.Tensor], style: str, layers: int) -> dict[str, torch.Tensor]:
    """The canonical tensors under the port's names, written out by hand (the tests' independent loading)."""
    v, out = "vision_model.", {}
    w = state[v + "embeddings.patch_embedding.weight"]
    pos = state[v + "embeddings.position_embedding.weight"]
    out["to_patch_embedding.weight"] = w.reshape(w.shape[0], -1) if style == "linear_patch" else w
    out["to_patch_embedding.bias"] = state[v + "embeddings.patch_embedding.bias"]
    out["pos_embedding"] = pos[None] if style == "linear_patch" else pos
    for i in range(layers):
        s, t = f"{v}encoder.layers.{i}.", f"layers.{i}."
        attn = t if style == "inline_attn" else t + "attn."
        for part in ("weight", "bias"):
            out[f"{t}norm1.{part}"] = state[f"{s}layer_norm1.{part}"]
            out[f"{t}norm2.{part}"] = state[f"{s}layer_norm2.{part}"]
            out[f"{t}ff.w1.{part}"] = state[f"{s}mlp.fc1.{part}"]
            out[f"{t}ff.w2.{part}"] = state[f"{s}mlp.fc2.{part}"]
            if style == "mha":
                out[f"{attn}in_proj_{part}"] = torch.cat([state[f"{s}self_attn.{p}_proj.{part}"] for p in "qkv"])
                out[f"{attn}out_proj.{part}"] = state[f"{s}self_attn.out_proj.{part}"]
                continue
            if style == "fused_qkv":
                out[f"{attn}qkv.{part}"] = torch.cat([state[f"{s}self_attn.{p}_proj.{part}"] for p in "qkv"])
            else:
                for p in "qkv":
                    out[f"{attn}to_{p}.{part}"] = state[f"{s}self_attn.{p}_proj.{part}"]
            out[f"{attn}{'to_out' if style == 'inline_attn' else 'proj'}.{part}"] = state[
                f"{s}self_attn.out_proj.{part}"
            ]
    h = v + "head."
    out["pool.probe"] = state[h + "probe"]
    out["pool.mha.in_proj_weight"] = state[h + "attention.in_proj_weight"]
    out["pool.mha.in_proj_bias"] = state[h + "attention.in_proj_bias"]
    out["pool.mha.out_proj.weight"] = state[h + "attention.out_proj.weight"]
    out["pool.mha.out_proj.bias"] = state[h + "attention.out_proj.bias"]
    for part in ("weight", "bias"):
        out[f"norm.{part}"] = state[f"{v}post_layernorm.{part}"]
        out[f"pool.ln.{part}"] = state[f"{h}layernorm.{part}"]
        out[f"pool.ffn.up.{part}"] = state[f"{h}mlp.fc1.{part}"]
        out[f"pool.ffn.down.{part}"] = state[f"{h}mlp.fc2.{part}"]
    return out


def _miscompiling(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """A torch.compile backend standing in for a miscompile: the compiled graph's float outputs come out ×1.001."""

    def run(*args):
        outs = gm(*args)
        return type(outs)(o * 1.001 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in outs)

    return run


def build(style: str, bug: str | None = None, layer: int = 0):
    """A factory for ``compare(candidate=…)``: the harness calls it with the config dict. ``plain_compiled`` is the
    plain port under ``torch.compile`` (inductor), or with ``bug="compiled_scale"`` under a miscompiling backend."""

    def factory(cfg: dict) -> PeoplePort:
        if style == "plain_compiled":
            backend = _miscompiling if bug == "compiled_scale" else "inductor"
            return torch.compile(PeoplePort(cfg, "plain"), backend=backend)
        return PeoplePort(cfg, style, bug, layer)

    factory.__qualname__ = f"PeoplePort[{style}{', ' + bug + f' in layer {layer}' if bug else ''}]"
    return factory


__all__ = ["STYLES", "CoarseLayerNorm", "PeoplePort", "build", "convert_state"]
