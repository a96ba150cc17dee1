"""mlx-vlm's PaliGemma vision tower (`mlx_vlm.models.paligemma.vision`) judged through activation files.

A real third-party port on another runtime (MLX, its CPU build on Linux). This adapter loads the exported
weights with mlx-vlm's own `sanitize`, calls mlx-vlm's modules in the order its `EncoderLayer` calls them and
writes each site's output; the arithmetic is MLX's.

    siglip-parity export-inputs exported/ --preset google/paligemma-3b-pt-224
    python examples/mlx_vlm_port.py exported/ mlx.npz
    siglip-parity --candidate-activations mlx.npz --inputs exported/

As shipped (mlx-vlm 0.7), `SigLipVisionModel.post_layernorm` is `nn.LayerNorm(hidden_size)`, MLX's default
eps 1e-5 where the config says 1e-6: the harness fails it at `post_layernorm` and names the eps.
`--fix-post-layernorm-eps` builds that norm with the config's eps, and the tower passes. `--bug gelu` plants
MLX's exact GELU (`approx="none"`) in layer 1's MLP, where SigLIP uses the tanh approximation. The tower has
no MAP head: on an export with one (a SigLIP preset, smaller and quicker on MLX's CPU build) the head is not
written and the report shows it NOT EXPOSED.

mlx-vlm's `SigLipVisionModel.__call__` keeps only the first image of a batch (`Encoder` returns `x[0]`), which
its PaliGemma does not notice with one image; the adapter calls the modules itself, so every image is judged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

V = "vision_model."


class MlxSites:
    """mlx-vlm's modules, one call per site of the site contract."""

    def __init__(self, tower):
        self.t = tower  # SigLipVisionModel

    def layer(self, i: int, x, record: dict | None = None):
        block = self.t.encoder.layers[i]
        s = f"{V}encoder.layers.{i}."
        steps = {"layer_norm1": block.layer_norm1(x)}
        steps["self_attn"] = block.self_attn(steps["layer_norm1"])
        h = x + steps["self_attn"]
        steps["layer_norm2"] = block.layer_norm2(h)
        steps["mlp"] = block.mlp(steps["layer_norm2"])
        out = h + steps["mlp"]
        if record is not None:
            record.update({s + k: v for k, v in steps.items()})
            record[s.rstrip(".")] = out
        return out

    def propagated(self, images) -> dict:
        out = {V + "embeddings": self.t.embeddings(images)}
        x = out[V + "embeddings"]
        for i in range(len(self.t.encoder.layers)):
            x = self.layer(i, x, out)
        out[V + "post_layernorm"] = self.t.post_layernorm(x)
        return out

    def isolated(self, site: str, x):
        name = site.removeprefix(V)
        if name == "embeddings":
            return self.t.embeddings(x)
        if name == "post_layernorm":
            return self.t.post_layernorm(x)
        parts = name.split(".")  # encoder.layers.i[.sub]
        if len(parts) == 3:
            return self.layer(int(parts[2]), x)
        return getattr(self.t.encoder.layers[int(parts[2])], parts[3])(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", help="the folder siglip-parity export-inputs wrote")
    ap.add_argument("out", help="where to write the activations (.npz)")
    ap.add_argument("--fix-post-layernorm-eps", action="store_true", help="build post_layernorm with the config's eps")
    ap.add_argument("--bug", choices=["gelu"], help="plant a known porting bug")
    args = ap.parse_args()
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_vlm
    from mlx_vlm.models.paligemma.config import VisionConfig
    from mlx_vlm.models.paligemma.vision import VisionModel
    from safetensors.numpy import load_file

    export = Path(args.export)
    manifest = json.loads((export / "manifest.json").read_text())
    c = manifest["config"]
    if not manifest["weights"].get("file"):
        raise SystemExit(
            "this adapter reads the exported weights.safetensors (export synthetic weights, or --with-weights)"
        )
    inputs = load_file(str(export / "inputs.safetensors"))
    pixels = inputs["pixel_values"].astype(np.float32)
    config = VisionConfig(
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        patch_size=c["patch_size"],
        image_size=pixels.shape[-1],
        layer_norm_eps=c.get("layer_norm_eps", 1e-6),
    )
    model = VisionModel(config)
    weights = model.sanitize({k: mx.array(v) for k, v in load_file(str(export / manifest["weights"]["file"])).items()})
    model.load_weights([(k, v) for k, v in weights.items() if not k.startswith(V + "head.")])
    tower = model.vision_model
    if args.fix_post_layernorm_eps:
        fixed = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        fixed.update(tower.post_layernorm.parameters())
        tower.post_layernorm = fixed
    if args.bug == "gelu":
        tower.encoder.layers[1].mlp.activation_fn = nn.GELU(approx="none")
    sites = MlxSites(tower)
    arrays = {f"propagated/{k}": v for k, v in sites.propagated(mx.array(pixels.transpose(0, 2, 3, 1))).items()}
    for site in manifest["sites"]:
        x = inputs[site["input"]].astype(np.float32)
        if site["name"] == V + "embeddings":
            x = x.transpose(0, 2, 3, 1)  # MLX convolutions are channels last
        if site["name"] != V + "head":  # PaliGemma's tower has none: the report says NOT EXPOSED
            arrays[f"isolated/{site['name']}"] = sites.isolated(site["name"], mx.array(x))
    mx.eval(list(arrays.values()))
    meta = json.dumps(
        {
            "framework": f"mlx-vlm {mlx_vlm.__version__} PaliGemma SigLipVisionModel (examples/mlx_vlm_port.py)",
            "runtime": f"mlx {mx.__version__} ({mx.default_device()})",
        }
    )
    np.savez(args.out, __meta__=np.array(meta), **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    print(f"wrote {args.out}: {len(arrays)} arrays")


if __name__ == "__main__":
    main()
