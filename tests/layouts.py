"""Build checkpoints in foreign layouts from a canonical (``vision_model.…``) state dict.

These are the inverses of convert/tables.py, written independently (layouts stated once each), so a
round trip through the converter must give back the canonical tensors bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from siglip_scratch import SiglipVisionConfig

V = "vision_model."


def text_tower(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "text_model.embeddings.token_embedding.weight": torch.randn(32, 16, generator=g),
        "text_model.final_layer_norm.weight": torch.randn(16, generator=g),
        "text_model.head.weight": torch.randn(16, 16, generator=g),
        "logit_scale": torch.randn(1, generator=g),
        "logit_bias": torch.randn(1, generator=g),
    }


def _np(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        # numpy has no bfloat16: JAX checkpoints store it as 2-byte void.
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("V2")
    return t.to(getattr(torch, dtype)).contiguous().numpy()


def to_big_vision(
    state: dict[str, torch.Tensor],
    config: SiglipVisionConfig,
    *,
    root: str = "img/",
    scanned: bool = False,
    dtype: str = "float32",
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    D, H = config.hidden_size, config.num_attention_heads
    hd = D // H
    naflex = hasattr(config, "num_patches") and not hasattr(config, "image_size")  # a Siglip2VisionConfig
    table = state[V + "embeddings.position_embedding.weight"]
    out: dict[str, torch.Tensor] = {
        # naflex_vit.py: a Dense stem (p·p·C, D) and an (n, n, D) grid; vit.py: HWIO conv, (1, N, D) table
        "embedding/kernel": state[V + "embeddings.patch_embedding.weight"].t()
        if naflex
        else state[V + "embeddings.patch_embedding.weight"].permute(2, 3, 1, 0),
        "embedding/bias": state[V + "embeddings.patch_embedding.bias"],
        "pos_embedding": table.reshape(math.isqrt(table.shape[0]), -1, table.shape[1]) if naflex else table[None],
        "Transformer/encoder_norm/scale": state[V + "post_layernorm.weight"],
        "Transformer/encoder_norm/bias": state[V + "post_layernorm.bias"],
    }

    def qkv(w: torch.Tensor) -> torch.Tensor:  # torch (out, in) -> (in, heads, head_dim)
        return w.t().reshape(D, H, hd)

    def out_k(w: torch.Tensor) -> torch.Tensor:  # torch (out, in) -> (heads, head_dim, out)
        return w.t().reshape(H, hd, D)

    blocks: list[dict[str, torch.Tensor]] = []
    for i in range(config.num_hidden_layers):
        s = f"{V}encoder.layers.{i}."
        a = "MultiHeadDotProductAttention_0/"
        blocks.append(
            {
                "LayerNorm_0/scale": state[s + "layer_norm1.weight"],
                "LayerNorm_0/bias": state[s + "layer_norm1.bias"],
                "LayerNorm_1/scale": state[s + "layer_norm2.weight"],
                "LayerNorm_1/bias": state[s + "layer_norm2.bias"],
                **{f"{a}{n}/kernel": qkv(state[s + f"self_attn.{p}_proj.weight"]) for n, p in _QKV},
                **{f"{a}{n}/bias": state[s + f"self_attn.{p}_proj.bias"].reshape(H, hd) for n, p in _QKV},
                f"{a}out/kernel": out_k(state[s + "self_attn.out_proj.weight"]),
                f"{a}out/bias": state[s + "self_attn.out_proj.bias"],
                "MlpBlock_0/Dense_0/kernel": state[s + "mlp.fc1.weight"].t(),
                "MlpBlock_0/Dense_0/bias": state[s + "mlp.fc1.bias"],
                "MlpBlock_0/Dense_1/kernel": state[s + "mlp.fc2.weight"].t(),
                "MlpBlock_0/Dense_1/bias": state[s + "mlp.fc2.bias"],
            }
        )
    if scanned:
        for name in blocks[0]:
            out[f"Transformer/encoderblock/{name}"] = torch.stack([b[name] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    if config.vision_use_head:
        h = V + "head."
        w, b = state[h + "attention.in_proj_weight"].chunk(3), state[h + "attention.in_proj_bias"].chunk(3)
        a = "MAPHead_0/MultiHeadDotProductAttention_0/"
        out["MAPHead_0/probe"] = state[h + "probe"]
        for j, n in enumerate(("query", "key", "value")):
            out[f"{a}{n}/kernel"] = qkv(w[j])
            out[f"{a}{n}/bias"] = b[j].reshape(H, hd)
        out[f"{a}out/kernel"] = out_k(state[h + "attention.out_proj.weight"])
        out[f"{a}out/bias"] = state[h + "attention.out_proj.bias"]
        out["MAPHead_0/LayerNorm_0/scale"] = state[h + "layernorm.weight"]
        out["MAPHead_0/LayerNorm_0/bias"] = state[h + "layernorm.bias"]
        out["MAPHead_0/MlpBlock_0/Dense_0/kernel"] = state[h + "mlp.fc1.weight"].t()
        out["MAPHead_0/MlpBlock_0/Dense_0/bias"] = state[h + "mlp.fc1.bias"]
        out["MAPHead_0/MlpBlock_0/Dense_1/kernel"] = state[h + "mlp.fc2.weight"].t()
        out["MAPHead_0/MlpBlock_0/Dense_1/bias"] = state[h + "mlp.fc2.bias"]
    arrays = {root + k: _np(v, dtype) for k, v in out.items()}
    arrays.update(extra or {})
    return arrays


_QKV = (("query", "q"), ("key", "k"), ("value", "v"))


def to_timm(state: dict[str, torch.Tensor], config: SiglipVisionConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {
        "patch_embed.proj.weight": state[V + "embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": state[V + "embeddings.patch_embedding.bias"],
        "pos_embed": state[V + "embeddings.position_embedding.weight"][None],
        "norm.weight": state[V + "post_layernorm.weight"],
        "norm.bias": state[V + "post_layernorm.bias"],
    }
    for i in range(config.num_hidden_layers):
        s, t = f"{V}encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[t + f"attn.qkv.{part}"] = torch.cat([state[s + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
            out[t + f"attn.proj.{part}"] = state[s + f"self_attn.out_proj.{part}"]
            out[t + f"norm1.{part}"] = state[s + f"layer_norm1.{part}"]
            out[t + f"norm2.{part}"] = state[s + f"layer_norm2.{part}"]
            out[t + f"mlp.fc1.{part}"] = state[s + f"mlp.fc1.{part}"]
            out[t + f"mlp.fc2.{part}"] = state[s + f"mlp.fc2.{part}"]
    if config.vision_use_head:
        h, D = V + "head.", config.hidden_size
        out["attn_pool.latent"] = state[h + "probe"]
        w, b = state[h + "attention.in_proj_weight"], state[h + "attention.in_proj_bias"]
        out["attn_pool.q.weight"], out["attn_pool.kv.weight"] = w[:D], w[D:]
        out["attn_pool.q.bias"], out["attn_pool.kv.bias"] = b[:D], b[D:]
        for part in ("weight", "bias"):
            out[f"attn_pool.proj.{part}"] = state[h + f"attention.out_proj.{part}"]
            out[f"attn_pool.norm.{part}"] = state[h + f"layernorm.{part}"]
            out[f"attn_pool.mlp.fc1.{part}"] = state[h + f"mlp.fc1.{part}"]
            out[f"attn_pool.mlp.fc2.{part}"] = state[h + f"mlp.fc2.{part}"]
    return {prefix + k: v.clone() for k, v in out.items()}


def save_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    """safetensors shards + model.safetensors.index.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    """The real hub cache layout: models--org--name/{refs/main, blobs/<hash>, snapshots/<commit>/<file>}.
    Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else None
        src = content if isinstance(content, Path) else None
        digest = hashlib.sha256(data if data is not None else src.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if data is not None:
            blob.write_bytes(data)
        else:
            os.replace(src, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap
