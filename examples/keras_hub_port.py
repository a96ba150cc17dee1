"""keras-hub's SigLIP vision tower (`keras_hub.models.SigLIPVisionEncoder`) judged through activation files.

A real third-party port, run as its users run it: Keras 3 on the JAX or the torch backend. This adapter only
moves the exported weights into keras-hub's layers and writes each site's output; the arithmetic is
keras-hub's and the backend's.

    siglip-parity export-inputs exported/ --preset google/siglip-base-patch16-224
    python examples/keras_hub_port.py exported/ keras_jax.npz --backend jax
    siglip-parity --candidate-activations keras_jax.npz --inputs exported/

Needs keras-hub and the backend (`make runtimes` builds a venv with both). `--bug gelu` builds the tower with
`intermediate_activation="gelu"` (Keras' exact GELU) where SigLIP uses the tanh approximation: the harness
must fail it and name the GELU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

V = "vision_model."


def _load_weights(encoder, w: dict[str, np.ndarray], config: dict) -> None:
    """HF names and layouts → keras-hub's variables (Dense kernels are [in, out]; MultiHeadAttention keeps
    [in, heads, head_dim] and [heads, head_dim, out]; Conv2D [kh, kw, in, out])."""
    heads = config["num_attention_heads"]

    def dense(layer, prefix: str) -> None:
        layer.set_weights([w[prefix + "weight"].T, w[prefix + "bias"]])

    def norm(layer, prefix: str) -> None:
        layer.set_weights([w[prefix + "weight"], w[prefix + "bias"]])

    def mha(layer, q, k, v, o) -> None:  # (weight [out, in], bias [out]) each
        d_in = q[0].shape[1]
        hd = q[0].shape[0] // heads
        values = []
        for weight, bias in (q, k, v):
            values += [weight.T.reshape(d_in, heads, hd), bias.reshape(heads, hd)]
        values += [o[0].T.reshape(heads, hd, o[0].shape[0]), o[1]]
        layer.set_weights(values)

    emb = encoder.embedding
    emb.patch_embedding.set_weights(
        [w[V + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0), w[V + "embeddings.patch_embedding.bias"]]
    )
    emb.position_embedding.set_weights([w[V + "embeddings.position_embedding.weight"]])
    for i, block in enumerate(encoder.encoder_layers):
        p = f"{V}encoder.layers.{i}."
        norm(block.layer_norm1, p + "layer_norm1.")
        norm(block.layer_norm2, p + "layer_norm2.")
        a = p + "self_attn."
        mha(block.self_attn, *[(w[f"{a}{n}_proj.weight"], w[f"{a}{n}_proj.bias"]) for n in ("q", "k", "v", "out")])
        dense(block.mlp.fc1, p + "mlp.fc1.")
        dense(block.mlp.fc2, p + "mlp.fc2.")
    norm(encoder.post_layer_norm, V + "post_layernorm.")
    h = V + "head."
    head = encoder.head
    d = w[h + "probe"].shape[-1]
    packed, bias = w[h + "attention.in_proj_weight"], w[h + "attention.in_proj_bias"]
    head.probe.assign(w[h + "probe"])
    mha(
        head.attention,
        *[(packed[j * d : (j + 1) * d], bias[j * d : (j + 1) * d]) for j in range(3)],
        (w[h + "attention.out_proj.weight"], w[h + "attention.out_proj.bias"]),
    )
    norm(head.layer_norm, h + "layernorm.")
    dense(head.mlp.fc1, h + "mlp.fc1.")
    dense(head.mlp.fc2, h + "mlp.fc2.")


class KerasSites:
    """keras-hub's layers called one at a time, in the order `SigLIPEncoderLayer.call` calls them."""

    def __init__(self, encoder):
        from keras import ops

        self.e, self.ops = encoder, ops

    def layer(self, i: int, x, record: dict | None = None):
        block, ops = self.e.encoder_layers[i], self.ops
        s = f"{V}encoder.layers.{i}."
        steps = {"layer_norm1": block.layer_norm1(x)}
        steps["self_attn"] = block.self_attn(steps["layer_norm1"], steps["layer_norm1"], steps["layer_norm1"])
        h = ops.add(x, steps["self_attn"])
        steps["layer_norm2"] = block.layer_norm2(h)
        steps["mlp"] = block.mlp(steps["layer_norm2"])
        out = ops.add(h, steps["mlp"])
        if record is not None:
            record.update({s + k: v for k, v in steps.items()})
            record[s.rstrip(".")] = out
        return out

    def propagated(self, images) -> dict:
        out = {V + "embeddings": self.e.embedding(images)}
        x = out[V + "embeddings"]
        for i in range(len(self.e.encoder_layers)):
            x = self.layer(i, x, out)
        out[V + "post_layernorm"] = self.e.post_layer_norm(x)
        out[V + "head"] = self.e.head(out[V + "post_layernorm"])
        return out

    def isolated(self, site: str, x):
        name = site.removeprefix(V)
        if name == "embeddings":
            return self.e.embedding(x)
        if name == "post_layernorm":
            return self.e.post_layer_norm(x)
        if name == "head":
            return self.e.head(x)
        parts = name.split(".")  # encoder.layers.i[.sub]
        block = self.e.encoder_layers[int(parts[2])]
        if len(parts) == 3:
            return self.layer(int(parts[2]), x)
        if parts[3] == "self_attn":
            return block.self_attn(x, x, x)
        return getattr(block, parts[3])(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", help="the folder siglip-parity export-inputs wrote")
    ap.add_argument("out", help="where to write the activations (.npz)")
    ap.add_argument("--backend", choices=["jax", "torch"], default="jax", help="the Keras backend (default: jax)")
    ap.add_argument("--bug", choices=["gelu"], help="plant a known porting bug")
    args = ap.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend  # before keras is imported
    import keras
    import keras_hub

    export = Path(args.export)
    manifest = json.loads((export / "manifest.json").read_text())
    if not manifest["weights"].get("file"):
        raise SystemExit(
            "this adapter reads the exported weights.safetensors (export synthetic weights, or --with-weights)"
        )
    if (
        not manifest["config"].get("vision_use_head", True)
        or manifest["config"].get("model_type") == "siglip2_vision_model"
    ):
        raise SystemExit("keras-hub's SigLIPVisionEncoder is the SigLIP (1) tower with its MAP head")
    from safetensors.numpy import load_file

    c = manifest["config"]
    inputs = load_file(str(export / "inputs.safetensors"))
    pixels = inputs["pixel_values"].astype(np.float32)
    encoder = keras_hub.models.SigLIPVisionEncoder(
        patch_size=c["patch_size"],
        hidden_dim=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        intermediate_dim=c["intermediate_size"],
        intermediate_activation="gelu" if args.bug == "gelu" else "gelu_approximate",
        layer_norm_epsilon=c.get("layer_norm_eps", 1e-6),
        image_shape=(pixels.shape[2], pixels.shape[3], pixels.shape[1]),
    )
    _load_weights(encoder, load_file(str(export / manifest["weights"]["file"])), c)
    sites = KerasSites(encoder)
    arrays = {
        f"propagated/{k}": v
        for k, v in sites.propagated(keras.ops.convert_to_tensor(pixels.transpose(0, 2, 3, 1))).items()
    }
    for site in manifest["sites"]:
        x = inputs[site["input"]].astype(np.float32)
        if site["name"] == V + "embeddings":
            x = x.transpose(0, 2, 3, 1)  # channels last, keras-hub's default
        arrays[f"isolated/{site['name']}"] = sites.isolated(site["name"], keras.ops.convert_to_tensor(x))
    meta = json.dumps(
        {
            "framework": f"keras-hub {keras_hub.__version__} SigLIPVisionEncoder (examples/keras_hub_port.py)",
            "runtime": f"keras {keras.__version__} on {args.backend} {_backend_version(args.backend)}",
        }
    )
    np.savez(
        args.out,
        __meta__=np.array(meta),
        **{k: np.ascontiguousarray(keras.ops.convert_to_numpy(v), dtype=np.float32) for k, v in arrays.items()},
    )
    print(f"wrote {args.out}: {len(arrays)} arrays")


def _backend_version(backend: str) -> str:
    import importlib

    return importlib.import_module(backend).__version__


if __name__ == "__main__":
    main()
