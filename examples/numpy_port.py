"""A SigLIP vision encoder in numpy alone, judged through the activation-file protocol.

It stands for any port outside PyTorch (JAX, MLX, Core ML, a C++ runtime): it knows nothing of torch or of
siglip-scratch, only the files `siglip-parity export-inputs` writes and the file format the harness reads.

    siglip-parity export-inputs exported/ --preset google/siglip-base-patch16-224
    python examples/numpy_port.py exported/ activations.npz
    siglip-parity --candidate-activations activations.npz          # finds exported/ via --inputs, see below
    siglip-parity --candidate-activations activations.npz --inputs exported/

`--bug eps` plants a LayerNorm eps of 1e-5 (PyTorch's default) in layer 1's second norm, the kind of
slip the harness must catch and name; `--bug gelu` the exact (erf) GELU in layer 1's MLP, where SigLIP uses
the tanh approximation.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

V = "vision_model."


class NumpySiglip:
    """The tower's arithmetic in float32 numpy, one method per site of the site contract."""

    def __init__(self, weights: dict[str, np.ndarray], config: dict, bug: str | None = None):
        self.w = {k: v.astype(np.float32) for k, v in weights.items()}
        self.c = config
        self.heads = config["num_attention_heads"]
        self.eps = config.get("layer_norm_eps", 1e-6)
        self.bug = bug

    # -- the pieces ------------------------------------------------------------------------------------
    def _ln(self, x: np.ndarray, prefix: str) -> np.ndarray:
        eps = 1e-5 if self.bug == "eps" and prefix == V + "encoder.layers.1.layer_norm2." else self.eps
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + np.float32(eps)) * self.w[prefix + "weight"] + self.w[prefix + "bias"]

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self.w[prefix + "weight"].T + self.w[prefix + "bias"]

    @staticmethod
    def _gelu_tanh(x: np.ndarray) -> np.ndarray:
        return np.float32(0.5) * x * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x**3)))

    @staticmethod
    def _softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        B, Lq, D = q.shape
        hd = D // self.heads

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(B, t.shape[1], self.heads, hd).transpose(0, 2, 1, 3)

        a = self._softmax(split(q) @ split(k).transpose(0, 1, 3, 2) * np.float32(hd**-0.5)) @ split(v)
        return a.transpose(0, 2, 1, 3).reshape(B, Lq, D)

    # -- the sites -------------------------------------------------------------------------------------
    def embeddings(self, pixels: np.ndarray) -> np.ndarray:  # [B, C, H, W] -> [B, N, D]
        kernel = self.w[V + "embeddings.patch_embedding.weight"]  # [D, C, p, p]
        D, C, p, _ = kernel.shape
        B, _, H, W = pixels.shape
        patches = pixels.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        tokens = patches @ kernel.reshape(D, -1).T + self.w[V + "embeddings.patch_embedding.bias"]
        return tokens + self.w[V + "embeddings.position_embedding.weight"]

    def layer_norm1(self, i: int, x: np.ndarray) -> np.ndarray:
        return self._ln(x, f"{V}encoder.layers.{i}.layer_norm1.")

    def layer_norm2(self, i: int, x: np.ndarray) -> np.ndarray:
        return self._ln(x, f"{V}encoder.layers.{i}.layer_norm2.")

    def self_attn(self, i: int, x: np.ndarray) -> np.ndarray:
        a = f"{V}encoder.layers.{i}.self_attn."
        q, k, v = (self._linear(x, a + f"{n}_proj.") for n in "qkv")
        return self._linear(self._attend(q, k, v), a + "out_proj.")

    @staticmethod
    def _gelu_erf(x: np.ndarray) -> np.ndarray:
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return (0.5 * x * (1 + erf(x / np.sqrt(2)))).astype(np.float32)

    def mlp(self, i: int, x: np.ndarray) -> np.ndarray:
        m = f"{V}encoder.layers.{i}.mlp."
        act = self._gelu_erf if self.bug == "gelu" and i == 1 else self._gelu_tanh
        return self._linear(act(self._linear(x, m + "fc1.")), m + "fc2.")

    def layer(self, i: int, x: np.ndarray, record: dict | None = None) -> np.ndarray:
        s = f"{V}encoder.layers.{i}."
        steps = {}
        steps["layer_norm1"] = self.layer_norm1(i, x)
        steps["self_attn"] = self.self_attn(i, steps["layer_norm1"])
        h = x + steps["self_attn"]
        steps["layer_norm2"] = self.layer_norm2(i, h)
        steps["mlp"] = self.mlp(i, steps["layer_norm2"])
        out = h + steps["mlp"]
        if record is not None:
            record.update({s + k: v for k, v in steps.items()})
            record[s.rstrip(".")] = out
        return out

    def post_layernorm(self, x: np.ndarray) -> np.ndarray:
        return self._ln(x, V + "post_layernorm.")

    def head(self, x: np.ndarray) -> np.ndarray:  # [B, N, D] -> [B, D]
        h = V + "head."
        D = x.shape[-1]
        w, b = self.w[h + "attention.in_proj_weight"], self.w[h + "attention.in_proj_bias"]
        probe = np.broadcast_to(self.w[h + "probe"], (x.shape[0], 1, D))
        q = probe @ w[:D].T + b[:D]
        k = x @ w[D : 2 * D].T + b[D : 2 * D]
        v = x @ w[2 * D :].T + b[2 * D :]
        pooled = self._linear(self._attend(q, k, v), h + "attention.out_proj.")
        y = self._linear(
            self._gelu_tanh(self._linear(self._ln(pooled, h + "layernorm."), h + "mlp.fc1.")), h + "mlp.fc2."
        )
        return (pooled + y)[:, 0]

    # -- the two runs ------------------------------------------------------------------------------------
    def propagated(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        out = {V + "embeddings": self.embeddings(pixels)}
        x = out[V + "embeddings"]
        for i in range(self.c["num_hidden_layers"]):
            x = self.layer(i, x, out)
        out[V + "post_layernorm"] = self.post_layernorm(x)
        if self.c.get("vision_use_head", True):
            out[V + "head"] = self.head(out[V + "post_layernorm"])
        return out

    def isolated(self, site: str, x: np.ndarray) -> np.ndarray:
        """One site alone on the reference's input to it."""
        name = site.removeprefix(V)
        if name in ("embeddings", "post_layernorm", "head"):
            return getattr(self, name)(x)
        parts = name.split(".")  # encoder.layers.i[.sub]
        i = int(parts[2])
        return self.layer(i, x) if len(parts) == 3 else getattr(self, parts[3])(i, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", help="the folder siglip-parity export-inputs wrote")
    ap.add_argument("out", help="where to write the activations (.npz)")
    ap.add_argument("--bug", choices=["eps", "gelu"], help="plant a known porting bug")
    ap.add_argument(
        "--names",
        choices=["prefixed", "plain", "layers"],
        default="prefixed",
        help="prefixed (default): isolated/<site> and propagated/<site>; plain: the end-to-end run only, names "
        "without a prefix; layers: the end-to-end layer outputs only (what a llama.cpp graph callback dumps)",
    )
    args = ap.parse_args()
    export = Path(args.export)
    manifest = json.loads((export / "manifest.json").read_text())
    if not manifest["weights"].get("file"):
        raise SystemExit(
            "this example reads the exported weights.safetensors (export synthetic weights, or --with-weights)"
        )
    inputs = load_file(str(export / "inputs.safetensors"))
    port = NumpySiglip(load_file(str(export / manifest["weights"]["file"])), manifest["config"], bug=args.bug)
    pixels = inputs["pixel_values"].astype(np.float32)
    propagated = port.propagated(pixels)
    if args.names == "plain":
        arrays = dict(propagated)
    elif args.names == "layers":
        arrays = {k: v for k, v in propagated.items() if k.rpartition(".")[2].isdigit()}
    else:
        arrays = {f"propagated/{k}": v for k, v in propagated.items()}
        for site in manifest["sites"]:
            x = inputs[site["input"]].astype(np.float32)
            arrays[f"isolated/{site['name']}"] = port.isolated(site["name"], x)
    meta = json.dumps({"framework": "numpy (examples/numpy_port.py)", "runtime": f"numpy {np.__version__}"})
    np.savez(
        args.out, __meta__=np.array(meta), **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    )
    print(f"wrote {args.out}: {len(arrays)} arrays")


if __name__ == "__main__":
    main()
